"""Errors of the mail formats.

Both sit under :class:`~medsecure.TransportError` because the mail transport is where they
surface: a message that cannot be parsed is quarantined by the receiver (never lost), and a
message that must not be sent fails its recipient for good.
"""

from __future__ import annotations

from .._errors import DeliveryRejected, TransportError

__all__ = ["MailFormatError", "PatientMailboxForbidden"]


class MailFormatError(TransportError):
    """A mail message, a MIME structure, a delivery report or an IHE XDM package is malformed
    or exceeds a limit. The message says what is wrong, never what the message contained."""


class PatientMailboxForbidden(DeliveryRejected):
    """The message must not go to the patient's mailbox: the patient's recorded opposition, or
    a document marked ``INVISIBLE_PATIENT`` (not visible to the patient)."""
