"""A transport for tests of the code that embeds medsecure (like ``httpx.MockTransport``)."""

from __future__ import annotations

import inspect
import io
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from .._errors import TransportUnavailable
from ..models import Endpoint
from ._base import AsyncTransport, Incoming, Transport

__all__ = ["AsyncMockTransport", "Delivery", "MockTransport"]


@dataclass(frozen=True)
class Delivery:
    """What ``MockTransport`` hands to its handler for each delivery."""

    endpoint: Endpoint
    message_id: str
    envelope: bytes


class MockTransport(Transport):
    """Calls ``handler(delivery)`` for every delivery; the handler may raise
    :class:`~medsecure.DeliveryRejected` or :class:`~medsecure.TransportUnavailable`.

    Incoming envelopes are whatever the test puts with :meth:`push`. ``MockTransport.loopback()``
    builds a handler that pushes every delivery back to the same mailbox.
    """

    kinds: ClassVar[frozenset[str]] = frozenset({"drop", "relay", "mail"})

    def __init__(self, handler: Callable[[Delivery], None] | None = None) -> None:
        self.handler = handler
        self.deliveries: list[Delivery] = []
        self._inbox: dict[str, tuple[str | None, bytes]] = {}
        self._counter = 0
        self._lock = threading.Lock()

    @classmethod
    def loopback(cls) -> MockTransport:
        """A mock whose deliveries land in its own mailbox."""
        mock = cls()
        mock.handler = lambda d: mock.push(d.envelope, message_id=d.message_id)
        return mock

    def push(self, envelope: bytes, *, message_id: str | None = None) -> None:
        """Make an envelope appear in the local mailbox."""
        with self._lock:
            self._counter += 1
            self._inbox[f"{self._counter:08d}"] = (message_id, bytes(envelope))

    def deliver(
        self, endpoint: Endpoint, envelope: BinaryIO, *, message_id: str, size: int
    ) -> None:
        delivery = Delivery(endpoint=endpoint, message_id=message_id, envelope=envelope.read())
        if self.handler is not None:
            self.handler(delivery)
        with self._lock:
            self.deliveries.append(delivery)

    def list(self) -> Sequence[Incoming]:
        with self._lock:
            return [
                Incoming(handle=h, message_id=mid, size=len(data))
                for h, (mid, data) in sorted(self._inbox.items())
            ]

    def fetch(self, item: Incoming) -> BinaryIO:
        with self._lock:
            entry = self._inbox.get(item.handle)
        if entry is None:
            raise TransportUnavailable("the envelope is gone")
        return io.BytesIO(entry[1])

    def acknowledge(self, item: Incoming) -> None:
        with self._lock:
            self._inbox.pop(item.handle, None)


class AsyncMockTransport(AsyncTransport):
    """The asynchronous twin of :class:`MockTransport` (for tests of asyncio code): deliveries
    go to ``handler`` (a plain function or a coroutine function) and are recorded; incoming
    envelopes are what the test :meth:`push`-es."""

    kinds: ClassVar[frozenset[str]] = frozenset({"drop", "relay", "mail"})

    def __init__(self, handler: Callable[[Delivery], Any] | None = None) -> None:
        self._sync = MockTransport()
        self.handler = handler

    @property
    def deliveries(self) -> list[Delivery]:
        return self._sync.deliveries

    def push(self, envelope: bytes, *, message_id: str | None = None) -> None:
        """Make an envelope appear in the local mailbox."""
        self._sync.push(envelope, message_id=message_id)

    async def deliver(
        self, endpoint: Endpoint, envelope: BinaryIO, *, message_id: str, size: int
    ) -> None:
        delivery = Delivery(endpoint=endpoint, message_id=message_id, envelope=envelope.read())
        if self.handler is not None:
            result = self.handler(delivery)
            if inspect.isawaitable(result):
                await result
        self._sync.deliveries.append(delivery)

    async def list(self) -> Sequence[Incoming]:
        return self._sync.list()

    async def take(self, item: Incoming, target: Path) -> None:
        self._sync.take(item, target)

    async def acknowledge(self, item: Incoming) -> None:
        self._sync.acknowledge(item)
