"""Delivery reports: DSNs (RFC 3464) and MDNs (RFC 8098, with the ANS MSSanté forms).

Both become :class:`DeliveryReport` values the outbox folds into a recipient's status with
:func:`fold_status`, a pure rule: a report never silently contradicts a final state (a late
``delayed`` after ``delivered`` changes nothing; ``failed`` after ``delivered`` is reported as a
conflict for the caller to record).

The ANS IG "Transmission de documents CDA par courriel MSSanté" (ansforge/
IG-hl7v2-volet-trans-lps-doc-cda-courriel-mss, ``struct-msg-mdn.md``) fixes the disposition
forms: success ``automatic-action/MDN-sent-automatically; processed``, error
``automatic-action/MDN-sent-automatically; processed/Error: <code>^<label>`` (error codes from
its ``error-codes.md``: 900–906 application errors, e.g. 902 "Identifiant patient inconnu"),
plus ``Original-Message-ID``, ``Final-Recipient`` and ``Original-Recipient``.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from typing import Literal

from ._errors import MailFormatError
from ._headers import (
    check_address,
    normalize_message_id,
    opening_headers,
    raw_header_line,
)
from ._mime import Leaf, MessageStream, Multipart, bytes_body, leaf, render, text_body
from ._parser import parse_header_block

__all__ = [
    "DeliveryReport",
    "FoldResult",
    "ReportStatus",
    "build_mdn",
    "fold_status",
    "reports_from_parts",
]

ReportStatus = Literal[
    "delivered",
    "relayed",
    "expanded",
    "delayed",
    "failed",
    "displayed",
    "read",
    "processed",
    "dispatched",
    "deleted",
]
_FINAL: frozenset[str] = frozenset(
    {"delivered", "failed", "read", "processed", "dispatched", "deleted"}
)
# How far a message got; a higher rank supersedes a lower one. ``failed`` is final on its own.
_RANK = {
    "delayed": 0,
    "relayed": 1,
    "expanded": 1,
    "delivered": 2,
    "dispatched": 3,
    "deleted": 3,
    "processed": 3,
    "read": 4,
}


@dataclass(frozen=True)
class DeliveryReport:
    """One recipient's outcome from a DSN or an MDN.

    ``original_message_id`` is the bare ``id@host`` of the reported message (the DSN's
    returned headers or the MDN's Original-Message-ID); ``original_envelope_id`` the DSN's
    ``Original-Envelope-Id`` (the SMTP ``ENVID`` the sender set). ``status`` is one of
    ``delivered``, ``relayed``, ``expanded``, ``delayed``, ``failed`` (DSN actions) or
    ``read`` (MDN *displayed*), ``processed``, ``dispatched``, ``deleted``, ``failed`` (an MDN
    with an error). ``reason`` is the server's diagnostic or the MDN's error label;
    ``status_code`` the DSN status (``5.1.1``) or the MDN error code (``902``).
    """

    kind: Literal["dsn", "mdn"]
    original_message_id: str | None
    recipient: str | None
    status: ReportStatus
    reason: str | None = None
    status_code: str | None = None
    original_recipient: str | None = None
    original_envelope_id: str | None = None
    report_message_id: str | None = None
    disposition: str | None = None
    """The raw MDN Disposition field."""

    @property
    def final(self) -> bool:
        """Whether this status ends the recipient's story (``delayed`` and ``relayed`` do not)."""
        return self.status in _FINAL

    @property
    def permanent(self) -> bool | None:
        """For a DSN, whether the status code is a permanent failure (5.x.x)."""
        if self.kind != "dsn" or not self.status_code:
            return None
        return self.status_code.startswith("5")


@dataclass(frozen=True)
class FoldResult:
    """The recipient's status after a report: ``status``; ``changed`` if it moved;
    ``conflict`` if the report contradicts a final state (recorded, not applied)."""

    status: str | None
    changed: bool
    conflict: bool


def fold_status(current: str | None, report: DeliveryReport) -> FoldResult:
    """Fold one report into a recipient's current status (pure; duplicates are harmless).

    ``failed`` is final: nothing moves it, and a later success is a conflict. A success moves
    the status forward only (``read`` after ``delivered``, never back); ``failed`` after a
    final success is a conflict.
    """
    new = report.status
    if current == new:
        return FoldResult(current, False, False)
    if current == "failed":
        return FoldResult(current, False, new in _RANK and new != "delayed")
    if new == "failed":
        if current in _FINAL:
            return FoldResult(current, False, True)
        return FoldResult(new, True, False)
    if current is None or current not in _RANK:
        return FoldResult(new, True, False)
    if _RANK[new] > _RANK[current]:
        return FoldResult(new, True, False)
    return FoldResult(current, False, False)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

_STATUS_RE = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_DISPOSITION_RE = re.compile(
    r"\s*(?P<action>[A-Za-z-]+)\s*/\s*(?P<sending>[A-Za-z-]+)\s*;\s*(?P<type>[A-Za-z-]+)"
    r"(?:\s*/\s*(?P<modifier>.*))?\s*$",
    re.S,
)
_DSN_ACTIONS: dict[str, ReportStatus] = {
    "failed": "failed",
    "delayed": "delayed",
    "delivered": "delivered",
    "relayed": "relayed",
    "expanded": "expanded",
}
_MDN_TYPES: dict[str, ReportStatus] = {
    "displayed": "read",
    "processed": "processed",
    "dispatched": "dispatched",
    "deleted": "deleted",
}
DSN_TYPES = ("message/delivery-status", "message/global-delivery-status")
MDN_TYPES = ("message/disposition-notification", "message/global-disposition-notification")
ORIGINAL_TYPES = ("text/rfc822-headers", "message/rfc822", "message/global-headers")


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("iso-8859-1")


def _blocks(raw: bytes) -> list[Message]:
    """The header-like blocks of a report part, separated by blank lines."""
    text = raw.replace(b"\r\n", b"\n")
    out = []
    for block in re.split(rb"\n[ \t]*\n", text):
        block = block.strip(b"\n")
        if block.strip():
            out.append(parse_header_block(block.replace(b"\n", b"\r\n") + b"\r\n"))
    return out


def _field(msg: Message, name: str) -> str | None:
    value = msg.get(name)
    if value is None:
        return None
    text = _text(str(value).encode("ascii", "surrogateescape"))
    return " ".join(text.split()) or None


def _address_field(msg: Message, name: str) -> str | None:
    value = _field(msg, name)
    if value is None:
        return None
    _type, sep, addr = value.partition(";")
    addr = (addr if sep else value).strip().strip("<>").strip()
    return addr or None


def _msg_id(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return normalize_message_id(value)
    except ValueError:
        return None


def _original_message_id(original: bytes | None) -> str | None:
    if not original:
        return None
    head = original.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    try:
        msg = parse_header_block(head.replace(b"\n", b"\r\n"))
    except MailFormatError:
        return None
    return _msg_id(_field(msg, "Message-ID"))


def parse_dsn(
    raw: bytes, original: bytes | None, report_message_id: str | None
) -> list[DeliveryReport]:
    """The per-recipient reports of a ``message/delivery-status`` body (RFC 3464 §2)."""
    blocks = _blocks(raw)
    if len(blocks) < 2:
        raise MailFormatError("a delivery-status part has no per-recipient fields")
    per_message = blocks[0]
    envid = _field(per_message, "Original-Envelope-Id")
    original_id = _original_message_id(original)
    out = []
    for block in blocks[1:]:
        action = (_field(block, "Action") or "").lower().split()
        if not action or action[0] not in _DSN_ACTIONS:
            raise MailFormatError("a delivery-status recipient has no valid Action")
        recipient = _address_field(block, "Final-Recipient")
        if recipient is None:
            raise MailFormatError("a delivery-status recipient has no Final-Recipient")
        status_field = _field(block, "Status") or ""
        m = _STATUS_RE.search(status_field)
        diagnostic = _field(block, "Diagnostic-Code")
        if diagnostic:
            _kind, sep, rest = diagnostic.partition(";")
            diagnostic = rest.strip() if sep else diagnostic
        out.append(
            DeliveryReport(
                kind="dsn",
                original_message_id=original_id,
                recipient=recipient,
                status=_DSN_ACTIONS[action[0]],
                reason=diagnostic,
                status_code=".".join(m.groups()) if m else None,
                original_recipient=_address_field(block, "Original-Recipient"),
                original_envelope_id=envid,
                report_message_id=report_message_id,
            )
        )
    return out


def parse_mdn(raw: bytes, original: bytes | None, report_message_id: str | None) -> DeliveryReport:
    """The report of a ``message/disposition-notification`` body (RFC 8098 §3, ANS forms)."""
    blocks = _blocks(raw)
    if not blocks:
        raise MailFormatError("an empty disposition-notification part")
    fields = blocks[0]
    disposition = _field(fields, "Disposition")
    if disposition is None:
        raise MailFormatError("a disposition notification has no Disposition field")
    m = _DISPOSITION_RE.match(disposition)
    if m is None or m.group("type").lower() not in _MDN_TYPES:
        raise MailFormatError("a disposition notification has a malformed Disposition field")
    status: ReportStatus = _MDN_TYPES[m.group("type").lower()]
    reason = None
    code = None
    modifier = (m.group("modifier") or "").strip()
    error_field = _field(fields, "Error")
    if modifier.lower().startswith("error") or error_field:
        status = "failed"
        # ANS form "processed/Error: 902^label"; RFC form "processed/error" + "Error:" field
        detail = modifier[5:].lstrip(" :") if modifier.lower().startswith("error") else ""
        detail = detail or (error_field or "")
        if "^" in detail:
            code, _, label = detail.partition("^")
            code = code.strip() or None
            reason = label.strip() or None
        else:
            reason = detail.strip() or None
    original_id = _msg_id(_field(fields, "Original-Message-ID")) or _original_message_id(original)
    return DeliveryReport(
        kind="mdn",
        original_message_id=original_id,
        recipient=_address_field(fields, "Final-Recipient"),
        status=status,
        reason=reason,
        status_code=code,
        original_recipient=_address_field(fields, "Original-Recipient"),
        report_message_id=report_message_id,
        disposition=disposition,
    )


def reports_from_parts(
    report_type: str | None,
    status_parts: Sequence[tuple[str, bytes]],
    original: bytes | None,
    report_message_id: str | None,
) -> list[DeliveryReport]:
    """Reports from the captured parts of a multipart/report."""
    out: list[DeliveryReport] = []
    for media_type, raw in status_parts:
        if media_type in DSN_TYPES:
            out.extend(parse_dsn(raw, original, report_message_id))
        elif media_type in MDN_TYPES:
            out.append(parse_mdn(raw, original, report_message_id))
    if not out:
        kind = report_type or "unknown"
        raise MailFormatError(f"a multipart/report ({kind}) without a usable report part")
    return out


# --------------------------------------------------------------------------------------------
# Producing MDNs
# --------------------------------------------------------------------------------------------

_MDN_TEXT_OK = (
    "Le message {mid} a été traité par le destinataire.\n"
    "The message {mid} was processed by the recipient.\n"
)
_MDN_TEXT_ERROR = (
    "Le message {mid} n'a pas pu être intégré automatiquement pour la raison suivante :\n"
    "{code} {label}\n\n"
    "The message {mid} could not be integrated automatically: {code} {label}\n"
)


def _ascii_field(text: str) -> str:
    """Transliterate to 7-bit ASCII (RFC 8098 §3.1: the notification part is 7-bit)."""
    folded = unicodedata.normalize("NFKD", text)
    out = "".join(ch for ch in folded if ch.isascii() and (ch.isprintable() or ch == " "))
    return " ".join(out.split())


def build_mdn(
    *,
    sender: str,
    to: str,
    original_message_id: str,
    final_recipient: str,
    date: dt.datetime,
    message_id: str,
    original_recipient: str | None = None,
    disposition: Literal["processed", "displayed", "dispatched", "deleted"] = "processed",
    error: tuple[str, str] | None = None,
    automatic: bool = True,
    reporting_ua: str | None = None,
    subject: str | None = None,
    text: str | None = None,
    original_headers: bytes | None = None,
    header_charset: str = "utf-8",
    product_reference: str | None = None,
) -> MessageStream:
    """An MDN (RFC 8098 ``multipart/report; report-type=disposition-notification``).

    ``sender`` is the reporting mailbox (From), ``to`` the original's Disposition-Notification-To.
    With ``error=(code, label)`` the disposition is the ANS error form
    ``processed/Error: code^label`` (label transliterated to ASCII there; the text part keeps
    it whole). ``message_id`` is this MDN's own id (bare ``id@host``). ``subject`` defaults
    to a neutral one; the ANS subject forms (``[KO Intégration système !][code] XDM/1.0/DDM+…``)
    name the patient and are the caller's choice (see :func:`mssante_subject`).
    ``original_headers`` (the original's header block) becomes a ``text/rfc822-headers`` part.
    ``product_reference`` adds ``X-MSS-NIL`` (MSSanté: on every message).
    """
    check_address(sender, "sender")
    check_address(to, "MDN recipient")
    check_address(final_recipient, "final recipient")
    if original_recipient is not None:
        check_address(original_recipient, "original recipient")
    original = normalize_message_id(original_message_id)
    own_id = normalize_message_id(message_id)
    if disposition not in ("processed", "displayed", "dispatched", "deleted"):
        raise ValueError("disposition must be processed, displayed, dispatched or deleted")
    modes = (
        "automatic-action/MDN-sent-automatically"
        if automatic
        else "manual-action/MDN-sent-manually"
    )
    value = f"{modes}; {disposition}"
    if error is not None:
        code, label = error
        if not re.fullmatch(r"[0-9A-Za-z_.-]{1,16}", code):
            raise ValueError("the error code must be a short token such as '902'")
        value += f"/Error: {code}^{_ascii_field(label)}"
    fields = []
    if reporting_ua:
        fields.append(raw_header_line("Reporting-UA", _ascii_field(reporting_ua)))
    if original_recipient:
        fields.append(raw_header_line("Original-Recipient", f"rfc822;{original_recipient}"))
    fields.append(raw_header_line("Final-Recipient", f"rfc822;{final_recipient}"))
    fields.append(raw_header_line("Original-Message-ID", f"<{original}>"))
    fields.append(raw_header_line("Disposition", value))
    notification = "".join(fields).encode("ascii")

    if text is None:
        if error is None:
            text = _MDN_TEXT_OK.format(mid=f"<{original}>")
        else:
            text = _MDN_TEXT_ERROR.format(mid=f"<{original}>", code=error[0], label=error[1])
    parts: list[Leaf | Multipart] = [
        leaf(
            "text/plain",
            text_body(text),
            encoding="quoted-printable",
            params=[("charset", "utf-8")],
        ),
        leaf("message/disposition-notification", bytes_body(notification), encoding="7bit"),
    ]
    if original_headers is not None:
        head = original_headers.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
        if not head.isascii():
            raise ValueError("original_headers must be the original's 7-bit header block")
        parts.append(
            leaf("text/rfc822-headers", bytes_body(head.replace(b"\n", b"\r\n")), encoding="7bit")
        )
    body = Multipart(
        "report",
        parts,
        params=[("report-type", "disposition-notification")],
    )
    if subject is None:
        subject = (
            "Accusé de traitement / Disposition notification"
            if error is None
            else "Erreur de traitement / Processing error"
        )
    headers = opening_headers(
        (None, sender), [to], date, own_id, subject, charset=header_charset, in_reply_to=original
    )
    if automatic:
        headers.append(raw_header_line("Auto-Submitted", "auto-replied"))
    if product_reference is not None:
        headers.append(raw_header_line("X-MSS-NIL", product_reference))
    shown = {
        "From": sender,
        "To": to,
        "Subject": subject,
        "Message-ID": own_id,
        "Disposition": value,
    }
    return MessageStream(render(headers, body), message_id=own_id, headers=shown)
