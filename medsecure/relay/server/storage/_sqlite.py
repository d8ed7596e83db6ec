"""Embedded storage: SQLite metadata and one fsynced file per envelope, in one data folder.

Layout of the data folder (mode 0700; files 0600)::

    relay.db        metadata and small bodies (WAL, synchronous=FULL: a commit is on disk when
                    it returns)
    nonces.db       seen request nonces (WAL, synchronous=NORMAL: survives a crash of the
                    process; a power loss may forget the last second of nonces, which are
                    only valid for the short signature window anyway)
    tmp/            bodies being received
    objects/xx/…    committed bodies, named by random ids (never by anything a sender chose)

A body up to ``INLINE_MAX`` is kept in its row. A larger one is written to ``tmp/``, fsynced,
renamed into ``objects/`` and the folder fsynced, and only then recorded in ``relay.db``: a crash
at any point leaves at worst an unreferenced file, removed at the next start. One process owns a
data folder (a lock file says so).

Writes that answer a client (upload commits, acknowledgements) go through a group commit: the
uploads that arrive while one transaction is being fsynced share the next one (one fsync for
many uploads, each still answered only once its own row is durable). Reads use a small pool of
their own connections, so that they never wait behind a commit's fsync (WAL lets readers run
beside the writer).
"""

from __future__ import annotations

import contextlib
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
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
    FileUpload,
    GroupCommit,
    NewMessage,
    QuotaExceeded,
    SqlStorage,
    StoredMessage,
    Upload,
    admit,
    open_file_body,
    prepare_body_folders,
    sql_statements,
    stored_message,
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
    identifier TEXT NOT NULL, fingerprint TEXT NOT NULL, first_seen INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (identifier, fingerprint)
);
"""


class SQLiteStorage(SqlStorage):
    """The embedded storage in a data folder (see the module docstring)."""

    _sql = sql_statements(
        mark="?",
        location="object",
        messages="messages",
        usage="usage",
        keys="keys",
        key_identifiers="key_identifiers",
    )

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        try:
            prepare_body_folders(self.root)
            self._lockfile = (self.root / "relay.lock").open("a")
            if fcntl is not None:
                try:
                    fcntl.flock(self._lockfile.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    raise StorageError("another relay process is using this data folder") from exc
            self._db = self._connect("relay.db", "FULL")
            self._db.executescript(_SCHEMA)
            self._migrate_usage()
            self._migrate_claims()
            # one connection, in one process (the lock file): exclusive locking spares each
            # insert the file locks and shared-memory index that WAL keeps for other readers
            self._nonces = self._connect("nonces.db", "NORMAL", exclusive=True)
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
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all_readers: list[sqlite3.Connection] = []
        self._closed = False
        self.commits: GroupCommit[sqlite3.Connection] = GroupCommit(
            self._run_batch, refusals=(Conflict, QuotaExceeded)
        )
        self._recover()

    def _migrate_usage(self) -> None:
        """The per-mailbox totals (bytes and envelopes waiting), kept by every transaction that
        adds or retires an envelope, so that a quota check reads one row instead of summing a
        mailbox's envelopes. A database from before them gets them computed once."""
        db = self._db
        known = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'usage'").fetchone()
        if known is not None:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "CREATE TABLE usage (mailbox TEXT PRIMARY KEY, bytes INTEGER NOT NULL,"
                " count INTEGER NOT NULL) WITHOUT ROWID"
            )
            db.execute(
                "INSERT INTO usage SELECT mailbox, SUM(size), COUNT(*) FROM messages"
                " WHERE state = ? GROUP BY mailbox",
                (WAITING,),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _migrate_claims(self) -> None:
        """The time the relay first saw each claim of an identifier (the order of key look-ups
        by identifier). Claims recorded before it count as seen at time 0: before any other."""
        db = self._db
        columns = {r[1] for r in db.execute("PRAGMA table_info(key_identifiers)")}
        if "first_seen" not in columns:
            db.execute(
                "ALTER TABLE key_identifiers ADD COLUMN first_seen INTEGER NOT NULL DEFAULT 0"
            )
        db.execute(
            "CREATE INDEX IF NOT EXISTS key_identifiers_seen"
            " ON key_identifiers (identifier, first_seen, fingerprint)"
        )

    def _connect(self, name: str, synchronous: str, exclusive: bool = False) -> sqlite3.Connection:
        path = self.root / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        if exclusive:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")  # before the first access in WAL mode
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

    def _run_batch(self, batch: list[Any], execute: Callable[[sqlite3.Connection], None]) -> None:
        # one transaction, one fsync (synchronous=FULL) for every upload of the batch
        with self._tx() as db:
            execute(db)

    def _reader(self) -> sqlite3.Connection:
        try:
            return self._readers.get_nowait()
        except queue.Empty:
            pass
        if self._closed:
            raise StorageError("the relay database is closed")
        db = sqlite3.connect(
            self.root / "relay.db", check_same_thread=False, isolation_level=None, timeout=30
        )
        db.execute("PRAGMA query_only=1")
        with self._lock:
            self._all_readers.append(db)
        return db

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[Any]:
        # Reads run on pooled connections of their own: in WAL mode they see the last commit
        # and never wait for the writer's fsync. At most one connection per worker thread.
        try:
            db = self._reader()
        except sqlite3.Error as exc:
            raise StorageError(f"relay database failure: {exc}") from exc
        try:
            return db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"relay database failure: {exc}") from exc
        finally:
            self._readers.put(db)

    # -- keys ------------------------------------------------------------------------------
    def publish_key(
        self, fingerprint: str, bundle: bytes, identifiers: Sequence[str], published: int, seen: int
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
            claimed = set(identifiers)
            held = [
                r[0]
                for r in db.execute(
                    "SELECT identifier FROM key_identifiers WHERE fingerprint = ?", (fingerprint,)
                )
            ]
            db.executemany(
                "DELETE FROM key_identifiers WHERE identifier = ? AND fingerprint = ?",
                [(i, fingerprint) for i in held if i not in claimed],
            )
            db.executemany(
                "INSERT OR IGNORE INTO key_identifiers VALUES (?, ?, ?)",
                [(i, fingerprint, seen) for i in claimed],
            )

    def _ids_in(self, ids: Sequence[str]) -> tuple[str, Sequence[Any]]:
        return f"IN ({','.join('?' * len(ids))})", ids

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
    def _begin_large(self) -> Upload:
        return FileUpload(self.root)

    def _place(self, upload: Upload) -> tuple[str | None, int | None]:
        assert isinstance(upload, FileUpload)
        return upload.finish(self.root / "objects"), None

    def _record(self, upload: Upload, message: NewMessage) -> tuple[StoredMessage, bool]:
        def record(db: sqlite3.Connection) -> tuple[StoredMessage, bool]:
            m = message
            row = db.execute(self._sql["find"], (m.mailbox, m.message_id)).fetchone()

            def used() -> int:
                total = db.execute(self._sql["usage"], (m.mailbox,)).fetchone()
                return int(total[0]) if total else 0

            stored, new = admit(m, stored_message(row) if row else None, used)
            if new:
                db.execute(
                    "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*stored.values(), m.file, m.body),
                )
                db.execute(
                    "INSERT INTO usage VALUES (?, ?, 1) ON CONFLICT (mailbox) DO UPDATE"
                    " SET bytes = bytes + excluded.bytes, count = count + 1",
                    (m.mailbox, m.size),
                )
            return stored, new

        result: tuple[StoredMessage, bool] = self.commits.submit(record, message.mailbox)
        return result

    def _open_large(self, size: int, location: Sequence[Any]) -> BodyReader | None:
        name = location[0]
        return None if name is None else open_file_body(self.root / "objects" / str(name), size)

    def _retire(self, db: sqlite3.Connection, rows: list[Any], state: str, now: int) -> list[str]:
        """Retire waiting envelopes (rows of mailbox, message id, object, size)."""
        db.executemany(
            "UPDATE messages SET state = ?, state_at = ?, object = NULL, body = NULL"
            " WHERE mailbox = ? AND message_id = ? AND state = ?",
            [(state, now, r[0], r[1], WAITING) for r in rows],
        )
        db.executemany(
            "UPDATE usage SET bytes = bytes - ?, count = count - 1 WHERE mailbox = ?",
            [(r[3], r[0]) for r in rows],
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
        def retire(db: sqlite3.Connection) -> tuple[list[Any], list[str]]:
            rows = db.execute(
                "SELECT mailbox, message_id, object, size FROM messages"
                " WHERE mailbox = ? AND message_id = ? AND state = ?",
                (mailbox, message_id, WAITING),
            ).fetchall()
            return rows, self._retire(db, rows, COLLECTED, now)

        rows, names = self.commits.submit(retire, mailbox)
        self._unlink(names)
        return bool(rows)

    # -- maintenance -----------------------------------------------------------------------
    def expire(self, received_before: int, now: int, limit: int = 500) -> int:
        with self._tx() as db:
            rows = db.execute(
                "SELECT mailbox, message_id, object, size FROM messages"
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
            db.execute(self._sql["tombstones"], (COLLECTED, EXPIRED, tombstones_before))
            db.execute("DELETE FROM usage WHERE count = 0")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for reader in self._all_readers:
                reader.close()
            self._db.close()
        with self._nonce_lock:
            self._nonces.close()
        self._lockfile.close()
