"""Embedded storage: SQLite metadata and one fsynced file per envelope, in one data folder.

Layout of the data folder (mode 0700; files 0600)::

    relay.db        metadata (WAL, synchronous=FULL: a commit is on disk when it returns)
    nonces.db       seen request nonces (WAL, synchronous=NORMAL: survives a crash of the
                    process; a power loss may forget the last second of nonces, which are
                    only valid for the short signature window anyway)
    tmp/            bodies being received
    objects/xx/…    committed bodies, named by random ids (never by anything a sender chose)

An upload is written to ``tmp/``, fsynced, renamed into ``objects/`` and the folder fsynced, and
only then recorded in ``relay.db``: a crash at any point leaves at worst an unreferenced file,
removed at the next start. One process owns a data folder (a lock file says so).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ...._errors import StorageError
from ...._fs import fsync_dir
from ._base import (
    COLLECTED,
    EXPIRED,
    WAITING,
    BodyReader,
    Conflict,
    QuotaExceeded,
    Storage,
    StoredMessage,
    Upload,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["SQLiteStorage"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    mailbox TEXT NOT NULL, message_id TEXT NOT NULL, sender TEXT NOT NULL,
    size INTEGER NOT NULL, digest BLOB NOT NULL, received_at INTEGER NOT NULL,
    state TEXT NOT NULL, state_at INTEGER NOT NULL, object TEXT, body BLOB,
    PRIMARY KEY (mailbox, message_id)
);
CREATE INDEX IF NOT EXISTS messages_box ON messages (mailbox, state, received_at);
CREATE INDEX IF NOT EXISTS messages_sender ON messages (sender, message_id);
CREATE INDEX IF NOT EXISTS messages_state ON messages (state, received_at);
CREATE TABLE IF NOT EXISTS keys (
    fingerprint TEXT PRIMARY KEY, bundle BLOB NOT NULL, published INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS key_identifiers (
    identifier TEXT NOT NULL, fingerprint TEXT NOT NULL, PRIMARY KEY (identifier, fingerprint)
);
"""
_COLUMNS = "mailbox, message_id, sender, size, digest, received_at, state, state_at"


def _row(r: Any) -> StoredMessage:
    return StoredMessage(*r[:8])


#: Bodies up to this size are kept in the database row itself: one fsync (the commit) instead
#: of three (file, folder, commit) for the many small envelopes.
INLINE_MAX = 64 * 1024


class _FileUpload(Upload):
    def __init__(self, root: Path) -> None:
        self.name = secrets.token_hex(16)
        self.tmp = root / "tmp" / self.name
        self.buffer: bytearray | None = bytearray()
        self.fd: int | None = None
        self.final: Path | None = None

    def write(self, data: bytes) -> None:
        if self.buffer is not None:
            self.buffer += data
            if len(self.buffer) <= INLINE_MAX:
                return
            data, self.buffer = bytes(self.buffer), None
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        assert self.fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def finish(self, objects: Path) -> str | None:
        """fsync, move into objects/ and fsync the folder; returns the object name (None for
        a body small enough to live in its row)."""
        if self.buffer is not None:
            return None
        assert self.fd is not None
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        folder = objects / self.name[:2]
        folder.mkdir(mode=0o700, exist_ok=True)
        self.final = folder / self.name
        os.replace(self.tmp, self.final)
        fsync_dir(folder)
        return f"{self.name[:2]}/{self.name}"

    def abort(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        for path in (self.tmp, self.final):
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()


class _BytesReader(BodyReader):
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def close(self) -> None:
        pass


class _FileReader(BodyReader):
    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class SQLiteStorage(Storage):
    """The embedded storage in a data folder (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for sub in ("tmp", "objects"):
                (self.root / sub).mkdir(mode=0o700, exist_ok=True)
            self._lockfile = (self.root / "relay.lock").open("a")
            if fcntl is not None:
                try:
                    fcntl.flock(self._lockfile.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    raise StorageError("another relay process is using this data folder") from exc
            self._db = self._connect("relay.db", "FULL")
            self._db.executescript(_SCHEMA)
            self._nonces = self._connect("nonces.db", "NORMAL")
            self._nonces.execute(
                "CREATE TABLE IF NOT EXISTS nonces (keyid TEXT NOT NULL, nonce TEXT NOT NULL,"
                " expires INTEGER NOT NULL, PRIMARY KEY (keyid, nonce)) WITHOUT ROWID"
            )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the relay database: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"cannot use the relay data folder: {exc.strerror}") from exc
        self._lock = threading.Lock()
        self._nonce_lock = threading.Lock()
        self._recover()

    def _connect(self, name: str, synchronous: str) -> sqlite3.Connection:
        path = self.root / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        return db

    def _recover(self) -> None:
        """Remove what a crash left: partial bodies in tmp/ and bodies never recorded."""
        for entry in os.scandir(self.root / "tmp"):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
        known = {
            r[0] for r in self._db.execute("SELECT object FROM messages WHERE object IS NOT NULL")
        }
        for folder in os.scandir(self.root / "objects"):
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder.path):
                if f"{folder.name}/{entry.name}" not in known:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StorageError(f"relay database failure: {exc}") from exc

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"relay database failure: {exc}") from exc

    # -- keys ------------------------------------------------------------------------------
    def publish_key(
        self, fingerprint: str, bundle: bytes, identifiers: Sequence[str], published: int
    ) -> None:
        with self._tx() as db:
            row = db.execute(
                "SELECT published FROM keys WHERE fingerprint = ?", (fingerprint,)
            ).fetchone()
            if row is not None and row[0] > published:
                return
            db.execute(
                "INSERT OR REPLACE INTO keys VALUES (?, ?, ?)", (fingerprint, bundle, published)
            )
            db.execute("DELETE FROM key_identifiers WHERE fingerprint = ?", (fingerprint,))
            db.executemany(
                "INSERT OR IGNORE INTO key_identifiers VALUES (?, ?)",
                [(i, fingerprint) for i in identifiers],
            )

    def key(self, fingerprint: str) -> bytes | None:
        rows = self._query("SELECT bundle FROM keys WHERE fingerprint = ?", (fingerprint,))
        return bytes(rows[0][0]) if rows else None

    def keys_for(self, identifier: str) -> list[bytes]:
        rows = self._query(
            "SELECT k.bundle FROM key_identifiers i JOIN keys k ON k.fingerprint = i.fingerprint"
            " WHERE i.identifier = ? ORDER BY k.published DESC LIMIT 20",
            (identifier,),
        )
        return [bytes(r[0]) for r in rows]

    def remember_nonce(self, keyid: str, nonce: str, expires: int) -> bool:
        with self._nonce_lock:
            try:
                self._nonces.execute("INSERT INTO nonces VALUES (?, ?, ?)", (keyid, nonce, expires))
            except sqlite3.IntegrityError:
                return False
            except sqlite3.Error as exc:
                raise StorageError(f"relay database failure: {exc}") from exc
        return True

    # -- messages --------------------------------------------------------------------------
    def find(self, mailbox: str, message_id: str) -> StoredMessage | None:
        rows = self._query(
            "SELECT mailbox, message_id, sender, size, digest, received_at, state, state_at FROM messages WHERE mailbox = ? AND message_id = ?",
            (mailbox, message_id),
        )
        return _row(rows[0]) if rows else None

    def begin_upload(self) -> Upload:
        try:
            return _FileUpload(self.root)
        except OSError as exc:
            raise StorageError(f"cannot store an envelope: {exc.strerror}") from exc

    def commit_upload(
        self,
        upload: Upload,
        *,
        mailbox: str,
        message_id: str,
        sender: str,
        digest: bytes,
        size: int,
        now: int,
        quota: int,
    ) -> tuple[StoredMessage, bool]:
        assert isinstance(upload, _FileUpload)
        try:
            name = upload.finish(self.root / "objects")
        except OSError as exc:
            upload.abort()
            raise StorageError(f"cannot store an envelope: {exc.strerror}") from exc
        try:
            with self._tx() as db:
                row = db.execute(
                    "SELECT mailbox, message_id, sender, size, digest, received_at, state, state_at FROM messages WHERE mailbox = ? AND message_id = ?",
                    (mailbox, message_id),
                ).fetchone()
                if row is not None:
                    existing = _row(row)
                    if existing.sender == sender and existing.digest == digest:
                        upload.abort()
                        return existing, False
                    raise Conflict
                (used,) = db.execute(
                    "SELECT COALESCE(SUM(size), 0) FROM messages WHERE mailbox = ? AND state = ?",
                    (mailbox, WAITING),
                ).fetchone()
                if used + size > quota:
                    raise QuotaExceeded
                record = StoredMessage(mailbox, message_id, sender, size, digest, now, WAITING, now)
                inline = bytes(upload.buffer) if upload.buffer is not None else None
                db.execute(
                    "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (mailbox, message_id, sender, size, digest, now, WAITING, now, name, inline),
                )
                return record, True
        except BaseException:
            upload.abort()
            raise

    def usage(self, mailbox: str) -> int:
        rows = self._query(
            "SELECT COALESCE(SUM(size), 0) FROM messages WHERE mailbox = ? AND state = ?",
            (mailbox, WAITING),
        )
        return int(rows[0][0])

    def waiting(self, mailbox: str, limit: int) -> list[StoredMessage]:
        rows = self._query(
            "SELECT mailbox, message_id, sender, size, digest, received_at, state, state_at FROM messages WHERE mailbox = ? AND state = ?"
            " ORDER BY received_at, message_id LIMIT ?",
            (mailbox, WAITING, limit),
        )
        return [_row(r) for r in rows]

    def open_body(self, mailbox: str, message_id: str) -> BodyReader | None:
        rows = self._query(
            "SELECT object, size, body FROM messages"
            " WHERE mailbox = ? AND message_id = ? AND state = ?",
            (mailbox, message_id, WAITING),
        )
        if rows and rows[0][2] is not None:
            return _BytesReader(bytes(rows[0][2]))
        if not rows or rows[0][0] is None:
            return None
        try:
            fd = os.open(self.root / "objects" / str(rows[0][0]), os.O_RDONLY)
        except FileNotFoundError:
            return None  # acknowledged meanwhile
        except OSError as exc:
            raise StorageError(f"cannot read an envelope: {exc.strerror}") from exc
        return _FileReader(fd, int(rows[0][1]))

    def _retire(self, db: sqlite3.Connection, rows: list[Any], state: str, now: int) -> list[str]:
        db.executemany(
            "UPDATE messages SET state = ?, state_at = ?, object = NULL, body = NULL"
            " WHERE mailbox = ? AND message_id = ? AND state = ?",
            [(state, now, r[0], r[1], WAITING) for r in rows],
        )
        return [str(r[2]) for r in rows if r[2] is not None]

    def _unlink(self, names: list[str]) -> None:
        folders = set()
        for name in names:
            path = self.root / "objects" / name
            with contextlib.suppress(OSError):
                path.unlink()
                folders.add(path.parent)
        for folder in folders:
            with contextlib.suppress(OSError):
                fsync_dir(folder)

    def acknowledge(self, mailbox: str, message_id: str, now: int) -> bool:
        with self._tx() as db:
            rows = db.execute(
                "SELECT mailbox, message_id, object FROM messages"
                " WHERE mailbox = ? AND message_id = ? AND state = ?",
                (mailbox, message_id, WAITING),
            ).fetchall()
            names = self._retire(db, rows, COLLECTED, now)
        self._unlink(names)
        return bool(rows)

    def uploads(self, sender: str, message_ids: Sequence[str]) -> list[StoredMessage]:
        if not message_ids:
            return []
        marks = ",".join("?" * len(message_ids))
        rows = self._query(
            f"SELECT {_COLUMNS} FROM messages WHERE sender = ? AND message_id IN ({marks})"  # noqa: S608 - only "?" marks are interpolated
            " ORDER BY message_id, mailbox",
            (sender, *message_ids),
        )
        return [_row(r) for r in rows]

    # -- maintenance -----------------------------------------------------------------------
    def expire(self, received_before: int, now: int, limit: int = 500) -> int:
        with self._tx() as db:
            rows = db.execute(
                "SELECT mailbox, message_id, object FROM messages"
                " WHERE state = ? AND received_at < ? ORDER BY received_at LIMIT ?",
                (WAITING, received_before, limit),
            ).fetchall()
            names = self._retire(db, rows, EXPIRED, now)
        self._unlink(names)
        return len(rows)

    def purge(self, now: int, tombstones_before: int) -> None:
        with self._nonce_lock:
            try:
                self._nonces.execute("DELETE FROM nonces WHERE expires < ?", (now,))
            except sqlite3.Error as exc:
                raise StorageError(f"relay database failure: {exc}") from exc
        with self._tx() as db:
            db.execute(
                "DELETE FROM messages WHERE state IN (?, ?) AND state_at < ?",
                (COLLECTED, EXPIRED, tombstones_before),
            )

    def stats(self) -> tuple[int, int]:
        rows = self._query(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages WHERE state = ?", (WAITING,)
        )
        return int(rows[0][0]), int(rows[0][1])

    def close(self) -> None:
        with self._lock:
            self._db.close()
        with self._nonce_lock:
            self._nonces.close()
        self._lockfile.close()
