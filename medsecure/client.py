"""The client and what it returns (public module).

``Client`` (and the result types it hands back) live here; :mod:`medsecure` re-exports the
ones most programs need (``Client``, ``ReceivedMessage``, ``SendResult``, ``RecipientStatus``).
"""

from ._client import Client, default_home
from ._results import (
    OutboxEntry,
    QuarantinedEnvelope,
    ReceivedDocument,
    ReceivedMessage,
    RecipientStatus,
    SendResult,
    StatusEvent,
)

__all__ = [
    "Client",
    "OutboxEntry",
    "QuarantinedEnvelope",
    "ReceivedDocument",
    "ReceivedMessage",
    "RecipientStatus",
    "SendResult",
    "StatusEvent",
    "default_home",
]
