"""Receipts as pure rules: their kinds and reason codes, how one is built, how an incoming one
is checked against what was sent, and how receipts fold into a recipient's status.

A receipt is an ordinary medsecure message (manifest kind ``receipt``), signed by the recipient
and sealed to the sender, naming the message id it answers (``of``) and the envelope id — the
hash of the envelope header, bound to the whole ciphertext by the sender's signature — so it
cannot be replayed for another message or for other content. Nothing here does I/O: the
outbox and the inbox call these functions with rows they read, and store what they return.

Status folding, for one recipient (see :func:`fold`)::

    queued ─► sent ─► delivered ─► read          (receipts or delivery reports, on time)
       │        │         └─────────► rejected   (a rejected receipt wins, with its reason)
       └────────┴──► failed | expired            (final: later receipts are kept as "late")
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .envelope._message import Manifest, new_message_id

__all__ = [
    "RECEIPT_KINDS",
    "REJECTION_CODES",
    "Folded",
    "ReceiptRequest",
    "build",
    "check",
    "fold",
]

#: What a recipient can answer.
RECEIPT_KINDS = ("delivered", "read", "rejected")
#: What a sender can ask for (``rejected`` comes whenever any receipt was asked).
REQUESTABLE = ("delivered", "read")
#: Why a recipient refuses a message.
REJECTION_CODES = (
    "unknown-patient",
    "unreadable-document",
    "verification-failed",
    "not-for-me",
    "other",
)
_ORDER = {"queued": 0, "sent": 1, "delivered": 2, "read": 3}
FINAL = ("failed", "expired")


@dataclass(frozen=True)
class ReceiptRequest:
    """A receipt the inbox decided to send (queued durably, then sealed by the outbox)."""

    of: str
    envelope_id: str
    status: str
    reason: str | None = None


def build(request: ReceiptRequest, *, sender_idnps: str, to_idnps: str, now: float) -> Manifest:
    """The manifest of a receipt answering ``request.of``."""
    at = dt.datetime.fromtimestamp(now, dt.UTC)
    extra: dict[str, Any] = {
        "status": request.status,
        "of": request.of,
        "envelope": request.envelope_id,
        "at": int(now * 1000),
    }
    if request.reason:
        extra["reason"] = request.reason
    return Manifest(
        message_id=new_message_id(at),
        created=at,
        sender_idnps=sender_idnps,
        recipients=(to_idnps,),
        subject=None,
        body=None,
        in_reply_to=request.of,
        documents=(),
        receipts=(),
        kind="receipt",
        extra=extra,
    )


def check(
    extra: Mapping[str, Any],
    *,
    sender_idnps: str,
    sent: Mapping[str, Any] | None,
    delivery: Mapping[str, Any] | None,
) -> str | None:
    """Why a verified receipt must be ignored, or None when it applies.

    ``sent`` is the outbox row of the message it names (None if unknown), ``delivery`` the
    delivery row of that message to the receipt's signer (None if they were not a recipient).
    The manifest parser has already checked the fields' types and bounds."""
    if sent is None:
        return "receipt for an unknown message"
    if delivery is None:
        return f"receipt from {sender_idnps}, who is not a recipient of the message"
    if sent["envelope_id"] != extra.get("envelope"):
        return "receipt for other content than the envelope sent"
    return None


@dataclass(frozen=True)
class Folded:
    """A recipient's status once receipts are folded in."""

    status: str
    reason: str | None
    on_time: tuple[str, ...]
    late: tuple[str, ...]


def fold(delivery_status: str, receipts: Sequence[Any]) -> Folded:
    """Fold receipts (rows with ``status``, ``reason``, ``late``, oldest first) into the
    delivery's status: a final status (failed, expired) is never rewritten; a rejection wins;
    otherwise the furthest of queued < sent < delivered < read."""
    on_time = [r for r in receipts if not r["late"]]
    late = tuple(r["status"] for r in receipts if r["late"])
    status, reason = delivery_status, None
    rejected = [r for r in on_time if r["status"] == "rejected"]
    if rejected:
        status, reason = "rejected", rejected[0]["reason"]
    elif status not in FINAL and on_time:
        best = max(on_time, key=lambda r: _ORDER.get(r["status"], 0))
        if _ORDER.get(best["status"], 0) > _ORDER.get(status, 0):
            status = best["status"]
    return Folded(status, reason, tuple(r["status"] for r in on_time), late)


def is_late(delivery_status: str) -> bool:
    """A receipt arriving while the delivery is in this status is recorded as late."""
    return delivery_status in FINAL
