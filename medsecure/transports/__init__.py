"""Transports move opaque envelope bytes: drop folders (:class:`FileTransport`) and, for tests of
the software that embeds medsecure, :class:`MockTransport`. Relay and mail transports plug into
the same :class:`Transport` protocol."""

from ._base import AsyncTransport, DeliveryReport, Incoming, Transport, UnsupportedItem
from ._file import FileTransport
from ._mock import AsyncMockTransport, Delivery, MockTransport
from ._relay import AsyncRelayTransport, RelayTransport, UploadState

__all__ = [
    "AsyncMockTransport",
    "AsyncRelayTransport",
    "AsyncTransport",
    "Delivery",
    "DeliveryReport",
    "FileTransport",
    "Incoming",
    "MockTransport",
    "RelayTransport",
    "Transport",
    "UnsupportedItem",
    "UploadState",
]
