"""The transport protocol: move opaque envelope bytes to an endpoint, and back.

A transport never sees plaintext and never decides trust. In the spirit of httpx's
``BaseTransport``, four operations and a context manager:

* ``deliver(endpoint, envelope, *, message_id, size)`` — push one envelope to a recipient's
  endpoint. Raises :class:`~medsecure.DeliveryRejected` for a permanent refusal and
  :class:`~medsecure.TransportUnavailable` for a transient failure (the outbox retries it).
  Delivery must be idempotent by ``message_id``: delivering the same envelope twice is harmless.
* ``list()`` — what waits in the local mailbox, as :class:`Incoming` items: envelopes, and
  (for transports that have them) delivery reports and items that are neither, which the
  client reports once and leaves alone.
* ``fetch(item)`` — a binary stream of one waiting envelope.
* ``acknowledge(item)`` — the envelope (or report) is durably stored by the receiver: remove it.

Which endpoints a transport serves is its own declaration: :attr:`Transport.kinds` (or an
override of :meth:`Transport.accepts`). Endpoint kinds are open strings; the client routes each
recipient to the endpoints some configured transport accepts, never through a fixed list.

Optional capabilities, with defaults here that any transport may improve:

* :meth:`Transport.take` — put a durable copy of a waiting envelope at a path; a drop folder on
  the same file system hard-links it instead of copying (after checking it is a regular file).
* :meth:`Transport.poll` — what the far side says about envelopes delivered earlier (a relay:
  collected, still waiting, or expired uncollected). The default knows nothing.

Every adapter translates its own foreign exceptions (``OSError``, ``httpx``, ``smtplib`` …)
into the error tree: an exception of another type escaping a transport is treated by the
client as a transient failure of that transport and logged as a bug.
"""

from __future__ import annotations

import abc
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, ClassVar, Literal

from .._closing import AsyncClosing, Closing
from .._errors import StorageError, TransportError
from .._fs import new_file

if TYPE_CHECKING:
    from ..models import Endpoint

__all__ = ["AsyncTransport", "DeliveryReport", "Incoming", "Transport", "UnsupportedItem"]


@dataclass(frozen=True)
class DeliveryReport:
    """A delivery report a transport received about a message this client sent (a mail DSN or
    MDN). Untrusted: the outbox applies it only to a message and recipient it knows, and never
    lets it contradict a final status silently."""

    message_id: str
    """The outbox message id the report names."""
    recipient: str | None
    """Who it is about, as the transport knows them (e.g. a mail address), when it says."""
    status: str
    """``delivered``, ``read``, ``failed``, ``delayed`` or ``processed``."""
    source: str
    """``dsn``, ``mdn`` …: what kind of report it was."""
    reason: str | None = None
    """The server's or reader's explanation, when there is one."""


@dataclass(frozen=True)
class Incoming:
    """Something waiting in the local mailbox. Everything in it is an untrusted hint."""

    handle: str
    message_id: str | None
    size: int | None = None
    kind: Literal["envelope", "report", "unsupported"] = "envelope"
    """``envelope``: fetch and verify it; ``report``: :attr:`report` says what happened to a
    message sent earlier; ``unsupported``: not something medsecure takes (a symbolic link, a
    FIFO, a foreign file): the client reports it once and leaves it where it is."""
    report: DeliveryReport | None = None
    problem: str | None = None
    """For ``unsupported`` items: why it is left alone (never contains a file's content)."""


class UnsupportedItem(TransportError):
    """What the mailbox offers under this handle is not an envelope the transport can hand
    over (a symbolic link, a FIFO, a device, a folder). It is left where it is."""


class _Routing:
    """What a transport declares, sync or async: the endpoint kinds it serves and its name."""

    #: Endpoint kinds this transport can deliver to.
    kinds: ClassVar[frozenset[str]] = frozenset()

    @property
    def name(self) -> str:
        """A stable name for this mailbox (used to remember what was already reported)."""
        return type(self).__name__

    def accepts(self, endpoint: Endpoint) -> bool:
        """Whether this transport can deliver to ``endpoint``."""
        return endpoint.kind in self.kinds


class Transport(_Routing, Closing, abc.ABC):
    """Base class of transports."""

    @abc.abstractmethod
    def deliver(
        self, endpoint: Endpoint, envelope: BinaryIO, *, message_id: str, size: int
    ) -> None:
        """Deliver one envelope (see the module docstring for the error contract)."""

    @abc.abstractmethod
    def list(self) -> Sequence[Incoming]:
        """What waits in the local mailbox, oldest first."""

    @abc.abstractmethod
    def fetch(self, item: Incoming) -> BinaryIO:
        """Open a waiting envelope."""

    @abc.abstractmethod
    def acknowledge(self, item: Incoming) -> None:
        """Remove an envelope (or a report) the receiver has stored durably."""

    def take(self, item: Incoming, target: Path) -> None:
        """Put a durable copy of the waiting envelope at ``target`` (a path that does not
        exist yet, in the receiver's inbox). The default copies :meth:`fetch`'s stream and
        fsyncs it; raises :class:`UnsupportedItem` for what is not an envelope and
        :class:`~medsecure.TransportUnavailable` if it is gone (taken by another reader)."""
        with self.fetch(item) as src:
            try:
                with new_file(target) as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            except OSError as exc:
                raise StorageError(f"cannot store an incoming envelope: {exc.strerror}") from exc

    def poll(self, endpoint: Endpoint, message_ids: Sequence[str]) -> dict[str, str]:
        """States of envelopes delivered earlier to ``endpoint``, by message id: ``waiting``,
        ``collected`` or ``expired`` (unknown ids are left out). Untrusted hints: the outbox
        uses ``expired`` to end a delivery and ``collected`` as an unsigned delivery report.
        The default (a transport that cannot tell) answers nothing."""
        return {}

    def close(self) -> None:  # optional hook
        """Release resources."""


class AsyncTransport(_Routing, AsyncClosing, abc.ABC):
    """The asynchronous twin of :class:`Transport`, for :class:`~medsecure.AsyncClient`: the
    same operations as coroutines. Reading a waiting envelope is :meth:`take` (write it to a
    path), so that large envelopes stream to disk without passing through the caller."""

    @abc.abstractmethod
    async def deliver(
        self, endpoint: Endpoint, envelope: BinaryIO, *, message_id: str, size: int
    ) -> None:
        """Deliver one envelope (the error contract of :meth:`Transport.deliver`)."""

    @abc.abstractmethod
    async def list(self) -> Sequence[Incoming]:
        """What waits in the local mailbox, oldest first."""

    @abc.abstractmethod
    async def take(self, item: Incoming, target: Path) -> None:
        """Write a durable copy of a waiting envelope at ``target`` (see :meth:`Transport.take`)."""

    @abc.abstractmethod
    async def acknowledge(self, item: Incoming) -> None:
        """Remove an envelope (or a report) the receiver has stored durably."""

    async def poll(self, endpoint: Endpoint, message_ids: Sequence[str]) -> dict[str, str]:
        """See :meth:`Transport.poll`."""
        return {}

    async def aclose(self) -> None:  # optional hook
        """Release resources."""
