"""The storage interface of the relay server: metadata and envelope bodies.

Two implementations: :mod:`._sqlite` (embedded: SQLite metadata, one fsynced file per envelope)
and :mod:`._postgres` (several stateless instances over PostgreSQL: metadata in tables, bodies in
large objects or in a shared folder). Every method is synchronous and blocking (but
:meth:`Storage.begin_upload` of a small body); the ASGI app calls them in worker threads. A body
is written through an :class:`Upload` and becomes visible only when :meth:`Storage.commit_upload`
records it, after the bytes are durable: no partial envelope is ever listed.

Small bodies (up to :data:`INLINE_MAX`) are buffered in memory and stored in their metadata row;
commits go through a :class:`GroupCommit`, so that the uploads that arrive while one
transaction is being made durable share the next transaction and its single fsync.
"""

from __future__ import annotations

import abc
import contextlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, Generic, TypeVar

from ...._errors import StorageError
from ...._fs import _sync_pool, fsync_dir

__all__ = [
    "COLLECTED",
    "EXPIRED",
    "WAITING",
    "BodyReader",
    "Conflict",
    "QuotaExceeded",
    "Storage",
    "StoredMessage",
    "Upload",
    "prepare_body_folders",
    "should_gather",
    "BufferedUpload",
    "BytesReader",
    "FileReader",
    "FileUpload",
    "GroupCommit",
    "INLINE_MAX",
    "NewMessage",
    "NonceReplayed",
    "RateLimited",
    "SqlStorage",
    "admit",
    "open_file_body",
    "sql_statements",
    "stored_message",
]

#: Bodies up to this size are buffered in memory while they arrive and kept in their metadata
#: row: one durable commit (shared with other uploads) instead of a file, its fsync, a rename
#: and a folder fsync. 64 KiB per concurrent upload bounds the memory this takes.
INLINE_MAX: Final = 64 * 1024

WAITING: Final = "waiting"
COLLECTED: Final = "collected"
EXPIRED: Final = "expired"


@dataclass(frozen=True)
class StoredMessage:
    """What the relay knows about one envelope: routing metadata only, never content."""

    mailbox: str
    message_id: str
    sender: str
    size: int
    digest: bytes
    received_at: int
    state: str
    state_at: int

    def values(self) -> tuple[str, str, str, int, bytes, int, str, int]:
        """The fields in the order of :data:`COLUMNS`."""
        return (
            self.mailbox,
            self.message_id,
            self.sender,
            self.size,
            self.digest,
            self.received_at,
            self.state,
            self.state_at,
        )


def stored_message(row: Sequence[Any]) -> StoredMessage:
    """A :class:`StoredMessage` from a row of :data:`COLUMNS` (as either database returns it)."""
    r = row
    return StoredMessage(r[0], r[1], r[2], int(r[3]), bytes(r[4]), int(r[5]), r[6], int(r[7]))


#: The columns of a :class:`StoredMessage`, in its order.
COLUMNS: Final = "mailbox, message_id, sender, size, digest, received_at, state, state_at"


@dataclass(frozen=True)
class NewMessage:
    """An envelope to record: its routing metadata, the time, the mailbox's quota, and where
    its durable body is (``body`` kept inline, else a ``file`` name or a large ``object``)."""

    mailbox: str
    message_id: str
    sender: str
    digest: bytes
    size: int
    now: int
    quota: int
    body: bytes | None = None
    file: str | None = None
    object: int | None = None
    #: (key id, nonce, expiry) of the request, for a backend that records it in the commit's
    #: transaction (:attr:`Storage.nonces_in_commits`)
    nonce: tuple[str, str, int] | None = None
    #: takes the caller's rate token once its nonce is known to be fresh: the seconds to wait
    #: (0 if taken; see :meth:`Storage.commit_upload`)
    charge: Callable[[], float] | None = field(default=None, compare=False)

    def stored(self) -> StoredMessage:
        """The record of this envelope once accepted (waiting since now)."""
        return StoredMessage(
            self.mailbox,
            self.message_id,
            self.sender,
            self.size,
            self.digest,
            self.now,
            WAITING,
            self.now,
        )


class Conflict(Exception):
    """The message id is already used in this mailbox by another sender or another body."""


class QuotaExceeded(Exception):
    """Accepting the envelope would exceed the mailbox quota."""


class NonceReplayed(Exception):
    """The request's nonce was already recorded: the upload is a replay (nothing was kept)."""


class RateLimited(Exception):
    """The caller's rate is spent (its nonce was fresh, and is spent): retry after ``wait`` s."""

    def __init__(self, wait: float) -> None:
        super().__init__(wait)
        self.wait = wait


class Upload(abc.ABC):
    """A body being written; nothing of it is visible until committed."""

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Append bytes."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Discard what was written (idempotent)."""


class BufferedUpload(Upload):
    """A small body (at most :data:`INLINE_MAX` bytes), kept in memory until committed."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> None:
        if len(self.buffer) + len(data) > INLINE_MAX:
            raise ValueError("a buffered upload holds at most INLINE_MAX bytes")
        self.buffer += data

    def abort(self) -> None:
        self.buffer = bytearray()


C = TypeVar("C")


class _Work:
    __slots__ = ("done", "error", "fn", "key", "lead", "result", "wake")

    def __init__(self, fn: Any, key: str) -> None:
        self.fn = fn
        self.key = key
        self.done = False
        self.lead = False
        self.result: Any = None
        self.error: BaseException | None = None
        # A one-shot signal, released once to wake its submitter (to lead, or because its work
        # is done): a bare lock costs a fraction of a threading.Event, which is built on a
        # Python-level Condition.
        self.wake = threading.Lock()
        self.wake.acquire()


def should_gather(gather: float, previous: int, queued: int, until: int) -> bool:
    """Whether a group-commit leader waits ``gather`` seconds for more work before it takes
    the ``queued`` items: only if gathering is on, the ``previous`` batch held more than one
    item (the backend is under load) and fewer than ``until`` items wait already."""
    return gather > 0 and previous > 1 and queued < until


class GroupCommit(Generic[C]):
    """Group commit: work submitted from many threads runs in shared transactions.

    :meth:`submit` blocks until the transaction holding its work is durable. Whoever submits
    while no batch is being committed becomes the leader: it takes every queued work item, runs
    them in one transaction (``run_batch``), wakes the submitters of that batch (each waits on
    its own event: no thundering herd) and hands the lead to the oldest waiting submitter, if
    any; work submitted meanwhile queues for the next batch. Nothing waits for a timer: under
    light load a batch holds one item and costs what a plain commit costs; under load one fsync
    serves many uploads.

    ``gather`` (seconds, 0 by default) is for a backend whose every transaction costs CPU of
    its own (PostgreSQL's processes): under load — the previous batch held more than one item —
    a leader that finds fewer than ``gather_until`` items queued waits ``gather`` once before
    it takes them, so that the batches grow and the transactions are fewer. Under light load
    (batches of one) nothing ever waits.

    ``run_batch(items, execute)`` opens a transaction, calls ``execute(conn)`` (which runs each
    item against ``conn`` and records its result or its refusal), commits durably, and raises if
    the transaction failed, in which case every item of the batch fails with that error. A work
    function must raise its refusals (conflict, quota) before it writes anything, so that a
    refused item leaves nothing in the shared transaction; any other exception fails the batch.
    """

    def __init__(
        self,
        run_batch: Callable[[list[_Work], Callable[[C], None]], None],
        *,
        refusals: tuple[type[BaseException], ...] = (),
        max_batch: int = 256,
        gather: float = 0.0,
        gather_until: int = 8,
    ) -> None:
        self._gather = gather
        self._gather_until = gather_until
        self._last = 0  # the items of the previous batch
        self._sleep = time.sleep
        self._run_batch = run_batch
        self._refusals = refusals
        self._max = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Work] = []
        self._leading = False
        self.batches = 0
        self.items = 0

    def submit(self, fn: Any, key: str = "") -> Any:
        """Run ``fn(conn)`` in the next shared transaction; return its result once durable.

        ``key`` names what the work locks (a mailbox), for backends that take locks in order.
        A backend whose ``run_batch`` sets each item's result itself may submit plain values
        instead of functions (PostgreSQL records a whole batch in a few statements).
        """
        work = _Work(fn, key)
        with self._lock:
            self._queue.append(work)
            if not self._leading:
                self._leading = work.lead = True
        if not work.lead:
            work.wake.acquire()  # released once: see _commit and the hand-over below
        while not work.done:
            # the leader: commit what is queued (its own work first among it) until its own
            # work is done
            if should_gather(self._gather, self._last, len(self._queue), self._gather_until):
                self._sleep(self._gather)  # under load: let the batch grow
            with self._lock:
                batch, self._queue = self._queue[: self._max], self._queue[self._max :]
            self._commit(batch)
        if work.lead:
            with self._lock:
                if self._queue:
                    heir = self._queue[0]
                    heir.lead = True
                    heir.wake.release()  # a queued submitter, not done: it waits, once
                else:
                    self._leading = False
        if work.error is not None:
            raise work.error
        return work.result

    def _commit(self, batch: list[_Work]) -> None:
        def execute(conn: C) -> None:
            for w in batch:
                try:
                    w.result = w.fn(conn)
                except self._refusals as exc:
                    w.error = exc

        try:
            self._run_batch(batch, execute)
        except BaseException as exc:
            # the transaction did not become durable: nothing of it counts
            for w in batch:
                w.result = None
                w.error = StorageError(f"relay database failure: {type(exc).__name__}")
                w.error.__cause__ = exc
        self.batches += 1
        self.items += len(batch)
        self._last = len(batch)
        for w in batch:
            w.done = True
            # The submitters that lead (this one, and an heir whose wait already ended with the
            # lead) do not wait; every other one waits once, for this.
            if not w.lead:
                w.wake.release()


def admit(
    message: NewMessage, existing: StoredMessage | None, used: Callable[[], int]
) -> tuple[StoredMessage, bool]:
    """Whether to record ``message``, decided under its mailbox's lock before anything is
    written (every backend applies this rule): an identical replay (same sender, same body)
    answers with the ``existing`` record (not new); any other reuse of the id is a
    :class:`Conflict`; a mailbox that would hold more than its quota (``used()`` bytes wait
    there now) :class:`QuotaExceeded`; else the new record."""
    if existing is not None:
        if existing.sender == message.sender and existing.digest == message.digest:
            return existing, False
        raise Conflict
    if used() + message.size > message.quota:
        raise QuotaExceeded
    return message.stored(), True


class BodyReader(abc.ABC):
    """Reads a stored body by ranges."""

    size: int

    @abc.abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (fewer only at the end, or if the body went
        away: an acknowledged envelope is deleted even while it is being downloaded)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources."""


class Storage(abc.ABC):
    """Metadata and bodies of one relay (see the module docstring)."""

    # -- keys ------------------------------------------------------------------------------
    @abc.abstractmethod
    def publish_key(
        self, fingerprint: str, bundle: bytes, identifiers: Sequence[str], published: int, seen: int
    ) -> None:
        """Store (or replace with a newer) key bundle. Each identifier it claims is recorded with
        the time the relay first saw this identity claim it (``seen``, Unix time in
        microseconds, for a new claim; a claim the bundle keeps keeps its time, one it drops is
        forgotten)."""

    @abc.abstractmethod
    def key(self, fingerprint: str) -> bytes | None:
        """The bundle published under ``fingerprint``."""

    @abc.abstractmethod
    def keys_for(
        self, identifier: str, after: tuple[int, str] | None, limit: int
    ) -> list[tuple[int, str, bytes]]:
        """(first seen, fingerprint, bundle) of the bundles claiming an IDNPS, in the order of
        (first seen, fingerprint), from just after ``after`` (a pair of those), at most
        ``limit``."""

    # -- replay protection -----------------------------------------------------------------
    #: True for a backend that records a small upload's nonce in the transaction that records
    #: its envelope (``commit_upload(nonce=...)``), sparing a transaction of its own: the app
    #: then checks that nonce at the commit rather than before the body's checks.
    nonces_in_commits: ClassVar[bool] = False

    @abc.abstractmethod
    def remember_nonce(self, keyid: str, nonce: str, expires: int) -> bool:
        """Record a nonce; False if it was already recorded (a replay)."""

    # -- messages --------------------------------------------------------------------------
    @abc.abstractmethod
    def find(self, mailbox: str, message_id: str) -> StoredMessage | None:
        """A message in any state."""

    def begin_upload(self, size: int) -> Upload:
        """Start writing a body of ``size`` bytes (announced, checked by the caller). For
        ``size <= INLINE_MAX`` this does not block (the app calls it on its event loop): the
        body is buffered in memory."""
        if size <= INLINE_MAX:
            return BufferedUpload()
        try:
            return self._begin_large()
        except OSError as exc:
            raise StorageError(f"cannot store an envelope: {exc.strerror}") from exc

    @abc.abstractmethod
    def _begin_large(self) -> Upload:
        """An upload of a body larger than :data:`INLINE_MAX`."""

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
        nonce: tuple[str, str, int] | None = None,
        charge: Callable[[], float] | None = None,
    ) -> tuple[StoredMessage, bool]:
        """Make the (complete, verified) body durable and visible. Returns the record and
        whether it is new; an identical replay returns the original record (and discards the
        upload). Raises :class:`Conflict` or :class:`QuotaExceeded` (the upload is discarded).

        ``nonce`` (key id, nonce, expiry), if given, is recorded with the envelope, and an
        upload whose nonce was already recorded raises :class:`NonceReplayed` and keeps
        nothing. A backend that does not record nonces in its commits
        (:attr:`nonces_in_commits` false) records it first, on its own.

        ``charge``, if given, is called once the nonce is known to be fresh, before the
        envelope's own checks: it takes the caller's rate token and returns the seconds to wait
        if there was none (then :class:`RateLimited`, nothing kept, the nonce spent). A replay
        is refused before it: it never holds its sender's tokens, however long its commit
        waits."""
        if not self.nonces_in_commits:
            if nonce is not None and not self.remember_nonce(*nonce):
                upload.abort()
                raise NonceReplayed
            if charge is not None and (wait := charge()) > 0:
                upload.abort()
                raise RateLimited(wait)
        file: str | None = None
        oid: int | None = None
        inline = bytes(upload.buffer) if isinstance(upload, BufferedUpload) else None
        if inline is None:
            try:
                # the body's own fsyncs run here, in parallel with other uploads' commits
                file, oid = self._place(upload)
            except OSError as exc:
                upload.abort()
                raise StorageError(f"cannot store an envelope: {exc.strerror}") from exc
        message = NewMessage(
            mailbox, message_id, sender, digest, size, now, quota, inline, file, oid, nonce, charge
        )
        try:
            stored, new = self._record(upload, message)
        except BaseException:
            upload.abort()
            raise
        if not new:
            upload.abort()  # an identical replay: the first copy stands
        return stored, new

    @abc.abstractmethod
    def _place(self, upload: Upload) -> tuple[str | None, int | None]:
        """Make a large body durable (an :class:`OSError` fails the upload): its file name or
        its large object."""

    @abc.abstractmethod
    def _record(self, upload: Upload, message: NewMessage) -> tuple[StoredMessage, bool]:
        """Record ``message`` durably (see :func:`admit`); the record and whether it is new."""

    @abc.abstractmethod
    def usage(self, mailbox: str) -> int:
        """Bytes waiting in a mailbox."""

    @abc.abstractmethod
    def waiting(self, mailbox: str, limit: int) -> list[StoredMessage]:
        """Waiting messages, oldest first."""

    @abc.abstractmethod
    def open_body(self, mailbox: str, message_id: str) -> BodyReader | None:
        """A reader for a waiting message's body, or None."""

    @abc.abstractmethod
    def acknowledge(self, mailbox: str, message_id: str, now: int) -> bool:
        """Mark a waiting message collected and delete its body; False if it was not waiting."""

    @abc.abstractmethod
    def uploads(self, sender: str, message_ids: Sequence[str]) -> list[StoredMessage]:
        """The sender's messages with these ids, in every mailbox and state."""

    # -- maintenance -----------------------------------------------------------------------
    @abc.abstractmethod
    def expire(self, received_before: int, now: int, limit: int = 500) -> int:
        """Expire (delete the bodies of) waiting messages received before a time; how many."""

    @abc.abstractmethod
    def purge(self, now: int, tombstones_before: int) -> None:
        """Forget expired nonces and old records of collected or expired messages."""

    @abc.abstractmethod
    def stats(self) -> tuple[int, int]:
        """(waiting messages, waiting bytes) over all mailboxes."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


# The statements both SQL backends run as they are, written with "?" marks and the table names
# as fields; :func:`sql_statements` puts in each backend's names and marks (once, at import).
_STATEMENTS: Final = {
    "key": "SELECT bundle FROM {keys} WHERE fingerprint = ?",
    "keys_for": "SELECT i.first_seen, i.fingerprint, k.bundle FROM {key_identifiers} i"
    " JOIN {keys} k ON k.fingerprint = i.fingerprint"
    " WHERE i.identifier = ? AND (i.first_seen, i.fingerprint) > (?, ?)"
    " ORDER BY i.first_seen, i.fingerprint LIMIT ?",
    "find": "SELECT {columns} FROM {messages} WHERE mailbox = ? AND message_id = ?",
    "usage": "SELECT bytes FROM {usage} WHERE mailbox = ?",
    "waiting": "SELECT {columns} FROM {messages} WHERE mailbox = ? AND state = ?"
    " ORDER BY received_at, message_id LIMIT ?",
    "body": "SELECT size, body, {location} FROM {messages}"
    " WHERE mailbox = ? AND message_id = ? AND state = ?",
    "uploads": "SELECT {columns} FROM {messages} WHERE sender = ? AND message_id {{ids}}"
    " ORDER BY message_id, mailbox",
    "tombstones": "DELETE FROM {messages} WHERE state IN (?, ?) AND state_at < ?",
    "stats": "SELECT COALESCE(SUM(count), 0), COALESCE(SUM(bytes), 0) FROM {usage}",
}


def sql_statements(*, mark: str, location: str, **tables: str) -> dict[str, str]:
    """The shared statements in one backend's dialect: its parameter ``mark``, the columns
    that say where a large body is (``location``) and its table names (``messages``,
    ``usage``, ``keys``, ``key_identifiers``)."""
    return {
        name: sql.format(columns=COLUMNS, location=location, **tables).replace("?", mark)
        for name, sql in _STATEMENTS.items()
    }


class SqlStorage(Storage):
    """What the SQL backends share: their read statements (:func:`sql_statements`). A backend
    supplies the statements (``_sql``), runs them (:meth:`_query`) and opens a large body
    (:meth:`_open_large`)."""

    _sql: ClassVar[dict[str, str]]

    @abc.abstractmethod
    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """The rows of a read (on a connection that never waits for a commit)."""

    @abc.abstractmethod
    def _ids_in(self, ids: Sequence[str]) -> tuple[str, Sequence[Any]]:
        """A condition that a column is one of ``ids``, and its parameters."""

    @abc.abstractmethod
    def _open_large(self, size: int, location: Sequence[Any]) -> BodyReader | None:
        """A reader of a large body, from the ``location`` columns of its row."""

    # -- keys ------------------------------------------------------------------------------
    def key(self, fingerprint: str) -> bytes | None:
        rows = self._query(self._sql["key"], (fingerprint,))
        return bytes(rows[0][0]) if rows else None

    def keys_for(
        self, identifier: str, after: tuple[int, str] | None, limit: int
    ) -> list[tuple[int, str, bytes]]:
        seen, fingerprint = after if after is not None else (-1, "")
        rows = self._query(self._sql["keys_for"], (identifier, seen, fingerprint, limit))
        return [(int(r[0]), str(r[1]), bytes(r[2])) for r in rows]

    # -- messages --------------------------------------------------------------------------
    def find(self, mailbox: str, message_id: str) -> StoredMessage | None:
        rows = self._query(self._sql["find"], (mailbox, message_id))
        return stored_message(rows[0]) if rows else None

    def usage(self, mailbox: str) -> int:
        rows = self._query(self._sql["usage"], (mailbox,))
        return int(rows[0][0]) if rows else 0

    def waiting(self, mailbox: str, limit: int) -> list[StoredMessage]:
        rows = self._query(self._sql["waiting"], (mailbox, WAITING, limit))
        return [stored_message(r) for r in rows]

    def open_body(self, mailbox: str, message_id: str) -> BodyReader | None:
        rows = self._query(self._sql["body"], (mailbox, message_id, WAITING))
        if not rows:
            return None
        size, body, *location = rows[0]
        if body is not None:
            return BytesReader(bytes(body))
        return self._open_large(int(size), location)

    def uploads(self, sender: str, message_ids: Sequence[str]) -> list[StoredMessage]:
        if not message_ids:
            return []
        condition, ids = self._ids_in(message_ids)
        rows = self._query(self._sql["uploads"].format(ids=condition), (sender, *ids))
        return [stored_message(r) for r in rows]

    # -- maintenance -----------------------------------------------------------------------
    def stats(self) -> tuple[int, int]:
        rows = self._query(self._sql["stats"])
        return int(rows[0][0]), int(rows[0][1])


def open_file_body(path: Path, size: int) -> BodyReader | None:
    """A reader of a body kept in a file (None if it was acknowledged meanwhile)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read an envelope: {exc.strerror}") from exc
    return FileReader(fd, size)


def prepare_body_folders(root: Path) -> None:
    """Make ``root`` (0700) with ``tmp/`` and ``objects/00`` … ``objects/ff``, each made durable
    in its parent: an upload then never creates a folder whose entry a crash could lose."""
    made = False
    for folder in (root, root / "tmp", root / "objects"):
        if not folder.is_dir():
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            made = True
    for i in range(256):
        sub = root / "objects" / f"{i:02x}"
        if not sub.is_dir():
            sub.mkdir(mode=0o700, exist_ok=True)
            made = True
    if made:
        for folder in (root / "objects", root, root.parent):
            fsync_dir(folder)


#: A relay body is synced in steps this large while it arrives. Not the client's SYNC_EVERY
#: (16 MiB): on the machine measured (docs/performance.md), syncing a 1 GiB upload every 16 MiB
#: held it to 271-286 MB/s where the same upload with one final fsync, or a sync every 128 MiB,
#: ran at 426-446 MB/s, the baseline's speed; 128 MiB still bounds what the final fsync waits for.
BODY_SYNC_EVERY: Final = 128 << 20


class FileUpload(Upload):
    """A large body written to ``root/tmp/<random name>``; :meth:`finish` makes it durable in
    ``root/objects/``. The name is random: never anything a sender chose."""

    def __init__(self, root: Path, name: str | None = None) -> None:
        self.name = name or secrets.token_hex(16)
        self.tmp = root / "tmp" / self.name
        self.final: Path | None = None
        self.fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._unsynced = 0
        self._sync: Future[None] | None = None

    def write(self, data: bytes) -> None:
        assert self.fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        # Start write-back early: an fdatasync every BODY_SYNC_EVERY bytes on a background
        # thread while the body keeps arriving, so that the final fsync, which the answer waits
        # for, has a bounded amount left to flush.
        self._unsynced += len(data)
        if self._unsynced >= BODY_SYNC_EVERY and (self._sync is None or self._sync.done()):
            self._collect()
            self._sync = _sync_pool().submit(os.fdatasync, self.fd)
            self._unsynced = 0

    def _collect(self) -> None:
        if self._sync is not None:
            sync, self._sync = self._sync, None
            sync.result()  # an I/O error of the background sync fails the upload

    def finish(self, objects: Path) -> str:
        """fsync, move into objects/ and fsync the folder; returns the object name."""
        assert self.fd is not None
        self._collect()
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        folder = objects / self.name[:2]  # made by prepare_body_folders
        self.final = folder / self.name
        os.replace(self.tmp, self.final)
        fsync_dir(folder)
        return f"{self.name[:2]}/{self.name}"

    def abort(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self._collect()  # never close a descriptor a background sync still uses
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        for path in (self.tmp, self.final):
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()


class BytesReader(BodyReader):
    """A body kept in its row."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def close(self) -> None:
        pass


class FileReader(BodyReader):
    """A body in a file (an open descriptor: an acknowledgement may unlink it meanwhile)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
