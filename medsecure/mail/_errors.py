"""Errors of the mail formats (defined in :mod:`medsecure._errors` with the rest of the tree,
re-exported by :mod:`medsecure.mail`).

Both sit under :class:`~medsecure.TransportError` because the mail transport is where they
surface: a message that cannot be parsed is quarantined by the receiver (never lost), and a
message that must not be sent fails its recipient for good.
"""

from __future__ import annotations

from .._errors import MailFormatError, PatientMailboxForbidden

__all__ = ["MailFormatError", "PatientMailboxForbidden"]
