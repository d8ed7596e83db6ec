"""Transports move opaque envelope bytes: drop folders (:class:`FileTransport`) and, for tests of
the software that embeds medsecure, :class:`MockTransport`. Relay and mail transports plug into
the same :class:`Transport` protocol."""

from ._base import DeliveryReport, Incoming, Transport, UnsupportedItem
from ._file import FileTransport
from ._mock import Delivery, MockTransport

__all__ = [
    "Delivery",
    "DeliveryReport",
    "FileTransport",
    "Incoming",
    "MockTransport",
    "Transport",
    "UnsupportedItem",
]
