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
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

from ...._errors import StorageError
from ...._fs import SYNC_EVERY, _sync_pool, fsync_dir

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
    "BufferedUpload",
    "BytesReader",
    "FileReader",
    "FileUpload",
    "GroupCommit",
    "INLINE_MAX",
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


class Conflict(Exception):
    """The message id is already used in this mailbox by another sender or another body."""


class QuotaExceeded(Exception):
    """Accepting the envelope would exceed the mailbox quota."""


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
        self.wake = threading.Event()


class GroupCommit(Generic[C]):
    """Group commit: work submitted from many threads runs in shared transactions.

    :meth:`submit` blocks until the transaction holding its work is durable. Whoever submits
    while no batch is being committed becomes the leader: it takes every queued work item, runs
    them in one transaction (``run_batch``), wakes the submitters of that batch (each waits on
    its own event: no thundering herd) and hands the lead to the oldest waiting submitter, if
    any; work submitted meanwhile queues for the next batch. Nothing waits for a timer: under
    light load a batch holds one item and costs what a plain commit costs; under load one fsync
    serves many uploads.

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
    ) -> None:
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
            work.wake.wait()
        while not work.done:
            # the leader: commit what is queued (its own work first among it) until its own
            # work is done
            with self._lock:
                batch, self._queue = self._queue[: self._max], self._queue[self._max :]
            self._commit(batch)
        if work.lead:
            with self._lock:
                if self._queue:
                    heir = self._queue[0]
                    heir.lead = True
                    heir.wake.set()
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
        for w in batch:
            w.done = True
            w.wake.set()


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
        self,
        fingerprint: str,
        bundle: bytes,
        identifiers: Sequence[str],
        published: int,
        seen: int,
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
    @abc.abstractmethod
    def remember_nonce(self, keyid: str, nonce: str, expires: int) -> bool:
        """Record a nonce; False if it was already recorded (a replay)."""

    # -- messages --------------------------------------------------------------------------
    @abc.abstractmethod
    def find(self, mailbox: str, message_id: str) -> StoredMessage | None:
        """A message in any state."""

    @abc.abstractmethod
    def begin_upload(self, size: int) -> Upload:
        """Start writing a body of ``size`` bytes (announced, checked by the caller). For
        ``size <= INLINE_MAX`` this must not block (the app calls it on its event loop)."""

    @abc.abstractmethod
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
        """Make the (complete, verified) body durable and visible. Returns the record and
        whether it is new; an identical replay returns the original record (and discards the
        upload). Raises :class:`Conflict` or :class:`QuotaExceeded` (the upload is discarded)."""

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
        # Start write-back early (as medsecure._fs.DurableWriter does): an fdatasync every
        # SYNC_EVERY bytes on a background thread while the body keeps arriving, so that the
        # final fsync, which the answer waits for, has little left to flush.
        self._unsynced += len(data)
        if self._unsynced >= SYNC_EVERY and (self._sync is None or self._sync.done()):
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
