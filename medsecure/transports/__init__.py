"""Transports move opaque envelope bytes: drop folders (:class:`FileTransport`), relays
(:class:`RelayTransport`, :class:`AsyncRelayTransport`; their :class:`ClockSkew` error), mail (:class:`MailTransport`: SMTP, IMAP
or Maildir, the end-to-end and MSSanté profiles, DSN and MDN reports) and, for tests of the
software that embeds medsecure, :class:`MockTransport`.

``MailTransport`` is loaded on first use (``import medsecure.transports`` stays cheap).
"""

import importlib as _importlib
import typing as _typing

from .._errors import ClockSkew
from ._base import AsyncTransport, DeliveryReport, Incoming, Transport, UnsupportedItem
from ._file import FileTransport
from ._mock import AsyncMockTransport, Delivery, MockTransport
from ._relay import AsyncRelayTransport, RelayTransport, UploadState

if _typing.TYPE_CHECKING:
    from ._mail import MailTransport

__all__ = [
    "AsyncMockTransport",
    "AsyncRelayTransport",
    "AsyncTransport",
    "ClockSkew",
    "Delivery",
    "DeliveryReport",
    "FileTransport",
    "Incoming",
    "MailTransport",
    "MockTransport",
    "RelayTransport",
    "Transport",
    "UnsupportedItem",
    "UploadState",
]

_LAZY = {"MailTransport": "._mail"}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'medsecure.transports' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(globals()))
