"""The mail transport's rules, as pure functions: which waiting message is what, and what a mail
delivery report means for the outbox.

Nothing here does I/O. :class:`~medsecure.transports.MailTransport` peeks at each message's
header, asks :func:`classify_header` what it is, and, for a delivery report, turns what
:func:`medsecure.mail.parse_message` found into the outbox's
:class:`~medsecure.transports.DeliveryReport` values with :func:`delivery_reports`.

* A medsecure end-to-end message has the fixed subject of the profile and a
  ``multipart/mixed`` body (the envelope attachment itself is checked when the message is
  taken: one that lacks it is malformed and goes to quarantine).
* A delivery report (``multipart/report``: a DSN or an MDN) is read whole (it is small) and
  kept only when it names a message this client sent: the DSN's ``Original-Envelope-Id`` (the
  ``ENVID`` the transport sets to the medsecure message id) or the ``<message id@domain>``
  form of the reported Message-ID.
* Everything else is foreign: a human's mail in the same mailbox, a report about a message
  someone else sent. It is never listed, read whole, flagged or moved.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ..envelope._message import MESSAGE_ID_RE
from ..mail import E2E_SUBJECT
from ..mail import DeliveryReport as MailReport
from ..mail._config import server_text
from ..mail._errors import MailFormatError
from ..mail._headers import decode_text, parse_message_ids
from ..mail._parser import media_type_of, parse_header_block
from ._base import DeliveryReport

__all__ = ["REPORT_STATUS", "Peek", "classify_header", "delivery_reports", "medsecure_id"]

#: A mail report's status (``medsecure.mail.DeliveryReport.status``) → the outbox's.
#: ``processed``/``dispatched``/``deleted`` (MDN) mean the message reached the reader's
#: software; ``relayed``/``expanded`` (DSN) only that it went on beyond where reports follow.
REPORT_STATUS: dict[str, str] = {
    "delivered": "delivered",
    "processed": "delivered",
    "dispatched": "delivered",
    "deleted": "delivered",
    "read": "read",
    "displayed": "read",
    "failed": "failed",
    "delayed": "delayed",
    "relayed": "delayed",
    "expanded": "delayed",
}

Kind = Literal["envelope", "report", "foreign"]


@dataclass(frozen=True)
class Peek:
    """What a message's header says it is: ``envelope`` (with the medsecure message id of its
    Message-ID as an untrusted hint), ``report``, or ``foreign``."""

    kind: Kind
    message_id: str | None = None


def _header_block(raw: bytes) -> bytes:
    """The header block of a (possibly truncated) header peek, without the blank line."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = raw.find(sep)
        if end >= 0:
            return raw[: end + len(sep) // 2]
    # truncated at the peek limit: drop the last, possibly cut, line
    cut = max(raw.rfind(b"\n"), 0)
    return raw[: cut + 1] if cut else raw


def classify_header(raw: bytes) -> Peek:
    """What a waiting message is, from the start of its header. Never raises: a header that
    cannot be read is foreign (left alone, as every message medsecure cannot claim)."""
    try:
        msg = parse_header_block(_header_block(raw))
    except MailFormatError:
        return Peek("foreign")
    media_type = media_type_of(msg)
    if media_type == "multipart/report":
        return Peek("report")
    if media_type == "multipart/mixed" and (decode_text(msg.get("Subject")) or "") == E2E_SUBJECT:
        ids = parse_message_ids(msg.get("Message-ID"))
        local = ids[0].split("@", 1)[0] if ids else ""
        return Peek("envelope", local if MESSAGE_ID_RE.fullmatch(local) else None)
    return Peek("foreign")


_XTEXT_RE = re.compile(r"\+([0-9A-F]{2})")


def medsecure_id(report: MailReport) -> str | None:
    """The medsecure message id a mail report is about, or None when it names none: the DSN's
    ``Original-Envelope-Id`` (xtext, RFC 3461 §4) first, then the reported Message-ID's
    ``<id@domain>`` form."""
    envid = report.original_envelope_id
    if envid:
        bare = _XTEXT_RE.sub(lambda m: chr(int(m.group(1), 16)), envid.strip())
        if MESSAGE_ID_RE.fullmatch(bare):
            return bare
    original = report.original_message_id
    if original:
        local = original.split("@", 1)[0]
        if MESSAGE_ID_RE.fullmatch(local):
            return local
    return None


def _reason(report: MailReport) -> str | None:
    parts = [p for p in (report.status_code, report.reason) if p]
    if not parts:
        return None
    # the server's or reader's words: one line, bounded, any mail address masked (a patient
    # mailbox's local part is an INS)
    return server_text(" ".join(parts)) or None


def delivery_reports(reports: Iterable[MailReport]) -> list[DeliveryReport]:
    """The outbox's reports for the mail reports that name a medsecure message (others are
    dropped: they are about mail someone else sent)."""
    out = []
    for report in reports:
        message_id = medsecure_id(report)
        status = REPORT_STATUS.get(report.status)
        if message_id is None or status is None:
            continue
        out.append(
            DeliveryReport(
                message_id=message_id,
                # the ORCPT the transport set is the endpoint's address exactly; the final
                # recipient may be an alias the mailbox forwards to
                recipient=report.original_recipient or report.recipient,
                status=status,
                source=report.kind,
                reason=_reason(report) if status in ("failed", "delayed") else None,
            )
        )
    return out
