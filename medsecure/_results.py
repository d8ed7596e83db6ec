"""What the client hands back: statuses of sent messages, received messages and documents.

These are plain values. A :class:`ReceivedMessage` acts on the inbox (acknowledge, mark read,
reject) through callables it was built with, never through a reference to the client, so the
same type serves the sync and the async client.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ._closing import Closing
from ._fs import atomic_output
from ._identity import PublicIdentity
from .models import Code, Patient, Practitioner

__all__ = [
    "OutboxEntry",
    "QuarantinedEnvelope",
    "ReceivedDocument",
    "ReceivedMessage",
    "RecipientStatus",
    "SendResult",
    "StatusEvent",
]


@dataclass(frozen=True)
class RecipientStatus:
    """Where a message stands for one recipient."""

    recipient: str
    status: str
    """``queued``, ``sent``, ``delivered``, ``read``, ``rejected``, ``failed`` or ``expired``."""
    endpoint: str | None = None
    attempts: int = 0
    error: str | None = None
    receipts: tuple[str, ...] = ()
    """Signed receipts (and delivery reports) received from this recipient (``delivered``,
    ``read``, ``rejected``)."""
    late_receipts: tuple[str, ...] = ()
    """Receipts that arrived after the message had expired or failed: recorded, never hidden,
    and never rewriting the final status."""
    reason: str | None = None
    """The recipient's reason code for a rejection."""
    skipped: tuple[str, ...] = ()
    """Why endpoints were passed over for the next one, oldest first: each one line naming the
    endpoint and its refusal (``relay https://relay.example/wrong: the relay answered 404 …``),
    never anything the message holds. A message ``sent`` over a fallback endpoint says here
    what was wrong with the ones before it."""


@dataclass(frozen=True)
class StatusEvent:
    """A change of a recipient's status, as recorded (``Client.events()``, ``on_status``)."""

    id: int
    message_id: str
    recipient: str
    status: str
    at: dt.datetime
    late: bool = False
    detail: str | None = None


@dataclass(frozen=True)
class SendResult:
    """What ``Client.send`` did: the message id and each recipient's status."""

    message_id: str
    recipients: tuple[RecipientStatus, ...]

    @property
    def all_sent(self) -> bool:
        """Whether every recipient's delivery was handed over (``sent`` or further along)."""
        return all(r.status in ("sent", "delivered", "read") for r in self.recipients)


@dataclass(frozen=True)
class OutboxEntry:
    """One message of the outbox with its recipients' statuses."""

    message_id: str
    created: dt.datetime
    size: int
    recipients: tuple[RecipientStatus, ...]


@dataclass(frozen=True)
class QuarantinedEnvelope:
    """An incoming envelope that failed verification, kept with the reason."""

    id: int
    received_at: dt.datetime
    reason: str
    path: Path
    message_id: str | None = None


@dataclass(frozen=True)
class ReceivedDocument:
    """A verified document; its bytes are read from the inbox on demand."""

    id: str
    media_type: str
    size: int
    filename: str | None
    title: str | None
    document_type: Code | None
    created: dt.datetime | None
    author: str | None
    patient: Patient | None
    confidentiality: str
    replaces: str | None
    _file: Path = field(repr=False)
    _offset: int = field(repr=False)

    def open(self) -> BinaryIO:
        """A binary stream of exactly this document."""
        fh = self._file.open("rb")
        fh.seek(self._offset)
        return _Range(fh, self.size)  # type: ignore[return-value]

    def read(self) -> bytes:
        """The whole document in memory (use :meth:`open` or :meth:`save` for large ones)."""
        with self.open() as fh:
            return fh.read()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the document to ``path`` atomically (temporary file, fsync, rename), 0600."""
        target = Path(path)
        with self.open() as src, atomic_output(target, mode=0o600) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return target


class _Range(Closing):
    """``size`` bytes of an open file from its current position."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self._fh = fh
        self._left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            n = self._left
        data = self._fh.read(n)
        self._left -= len(data)
        return data

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")[: self._left]
        got = self._fh.readinto(view)  # type: ignore[attr-defined]
        self._left -= got
        return int(got)

    def close(self) -> None:
        self._fh.close()


@dataclass
class ReceivedMessage:
    """A verified incoming message. Call :meth:`ack` once the application has processed it."""

    message_id: str
    subject: str | None
    body: str | None
    sender: Practitioner
    sender_key: PublicIdentity
    documents: tuple[ReceivedDocument, ...]
    created: dt.datetime
    received_at: dt.datetime
    in_reply_to: str | None
    receipts_requested: tuple[str, ...]
    _ack: Callable[[], None] = field(repr=False)
    _mark_read: Callable[[], None] = field(repr=False)
    _reject: Callable[[str], None] = field(repr=False)

    def ack(self) -> None:
        """Mark the message processed: it leaves ``receive()`` and its files are removed."""
        self._ack()

    def mark_read(self) -> None:
        """Record that a person read the message; sends the ``read`` receipt if the sender asked
        for one and this client's policy allows read receipts."""
        self._mark_read()

    def reject(self, reason: str = "other") -> None:
        """Refuse the message (``unknown-patient``, ``unreadable-document``, ``not-for-me``,
        ``other``): a ``rejected`` receipt goes back if receipts were asked, then it is acked."""
        self._reject(reason)
