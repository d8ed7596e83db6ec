"""The storage interface of the relay server: metadata and envelope bodies.

Two implementations: :mod:`._sqlite` (embedded: SQLite metadata, one fsynced file per envelope)
and :mod:`._postgres` (several stateless instances over PostgreSQL: metadata in tables, bodies in
large objects). Every method is synchronous and blocking; the ASGI app calls them in worker
threads. A body is written through an :class:`Upload` and becomes visible only when
:meth:`Storage.commit_upload` records it, after the bytes are durable: no partial envelope is
ever listed.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

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
]

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
        self, fingerprint: str, bundle: bytes, identifiers: Sequence[str], published: int
    ) -> None:
        """Store (or replace with a newer) key bundle."""

    @abc.abstractmethod
    def key(self, fingerprint: str) -> bytes | None:
        """The bundle published under ``fingerprint``."""

    @abc.abstractmethod
    def keys_for(self, identifier: str) -> list[bytes]:
        """Bundles claiming an IDNPS (newest first, at most 20)."""

    # -- replay protection -----------------------------------------------------------------
    @abc.abstractmethod
    def remember_nonce(self, keyid: str, nonce: str, expires: int) -> bool:
        """Record a nonce; False if it was already recorded (a replay)."""

    # -- messages --------------------------------------------------------------------------
    @abc.abstractmethod
    def find(self, mailbox: str, message_id: str) -> StoredMessage | None:
        """A message in any state."""

    @abc.abstractmethod
    def begin_upload(self) -> Upload:
        """Start writing a body."""

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
