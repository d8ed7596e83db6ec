"""The transport protocol: move opaque envelope bytes to an endpoint, and back.

A transport never sees plaintext and never decides trust. Three operations and a context
manager, in the spirit of httpx's ``BaseTransport``:

* ``deliver(endpoint, envelope, *, message_id, size)`` — push one envelope to a recipient's
  endpoint. Raises :class:`~medsecure.DeliveryRejected` for a permanent refusal and
  :class:`~medsecure.TransportUnavailable` for a transient failure (the outbox retries it).
  Delivery must be idempotent by ``message_id``: delivering the same envelope twice is harmless.
* ``list()`` — envelopes waiting in the local mailbox (:class:`Incoming` handles).
* ``fetch(item)`` — a binary stream of one waiting envelope.
* ``acknowledge(item)`` — the envelope is durably stored by the receiver: remove it.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, ClassVar, Self

from ..models import Endpoint

__all__ = ["Incoming", "Transport"]


@dataclass(frozen=True)
class Incoming:
    """An envelope waiting in the local mailbox. ``message_id`` is an untrusted routing hint."""

    handle: str
    message_id: str | None
    size: int | None = None


class Transport(abc.ABC):
    """Base class of transports."""

    #: Endpoint kinds this transport can deliver to.
    kinds: ClassVar[frozenset[str]] = frozenset()

    def accepts(self, endpoint: Endpoint) -> bool:
        """Whether this transport can deliver to ``endpoint``."""
        return endpoint.kind in self.kinds

    @abc.abstractmethod
    def deliver(
        self, endpoint: Endpoint, envelope: BinaryIO, *, message_id: str, size: int
    ) -> None:
        """Deliver one envelope (see the module docstring for the error contract)."""

    @abc.abstractmethod
    def list(self) -> Sequence[Incoming]:
        """Envelopes waiting in the local mailbox, oldest first."""

    @abc.abstractmethod
    def fetch(self, item: Incoming) -> BinaryIO:
        """Open a waiting envelope."""

    @abc.abstractmethod
    def acknowledge(self, item: Incoming) -> None:
        """Remove an envelope the receiver has stored durably."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
