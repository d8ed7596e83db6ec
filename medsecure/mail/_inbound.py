"""Reading a received message: a medsecure envelope, a delivery report, or an MSSanté mail.

:func:`parse_message` walks the raw message once (see ``_parser``) and

* decodes the medsecure envelope attachment (``application/vnd.medsecure.envelope``) into the
  caller's ``envelope_out`` file, in bounded memory;
* collects the parts of a ``multipart/report`` (DSN or MDN) and turns them into
  :class:`~medsecure.mail.DeliveryReport` values;
* hands every other attachment to the caller's ``attachment_sink`` (or discards it), and keeps
  the first text/plain body (bounded) and the MSSanté ``X-MSS-*`` fields.

Everything read here is hostile until proven otherwise: only :class:`MailFormatError` comes out
for malformed input, and its message never quotes the content.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Literal

from ._e2e import ENVELOPE_MEDIA_TYPE, ENVELOPE_SUFFIX
from ._errors import MailFormatError
from ._headers import (
    all_addresses,
    decode_text,
    first_address,
    parse_date,
    parse_message_ids,
)
from ._parser import Decision, MailLimits, PartInfo, param_of, walk
from ._reports import DSN_TYPES, MDN_TYPES, ORIGINAL_TYPES, DeliveryReport, reports_from_parts

__all__ = ["MailPart", "MssanteHeaders", "ParsedMessage", "parse_message", "parse_report"]

_ORIGINAL_CAP = 64 * 1024


@dataclass(frozen=True)
class MailPart:
    """A leaf part of a parsed message (decoded ``size`` in bytes)."""

    media_type: str
    filename: str | None
    disposition: str | None
    size: int
    charset: str | None
    stored: bool
    """Whether its content was written to a sink (the envelope file or an attachment sink)."""


@dataclass(frozen=True)
class MssanteHeaders:
    """The ``X-MSS-*`` fields of a message (Référentiel socle MSSanté #2 §3.8, §3.4.2.3)."""

    codecda: tuple[str, ...] = ()
    ins: Literal["O", "N"] | None = None
    nil: str | None = None
    mes: str | None = None


@dataclass(frozen=True)
class ParsedMessage:
    """What a received message is and says.

    ``kind`` is ``medsecure`` (an envelope attachment was found and decoded), ``report`` (a DSN
    or MDN: see ``reports``) or ``mail`` (anything else, e.g. an MSSanté message). Message ids
    are bare ``id@host``. ``envelope_name`` is the attachment's file name without ``.msec``
    (the sender's medsecure message id), when it has that form.
    """

    kind: Literal["medsecure", "report", "mail"]
    message_id: str | None
    date: dt.datetime | None
    sender: str | None
    recipients: tuple[str, ...]
    subject: str | None
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    disposition_notification_to: str | None
    envelope_name: str | None
    envelope_size: int | None
    reports: tuple[DeliveryReport, ...]
    parts: tuple[MailPart, ...]
    text: str | None
    mssante: MssanteHeaders


AttachmentSink = Callable[[PartInfo], BinaryIO | None]


def _mssante(top: object) -> MssanteHeaders:
    from email.message import Message

    assert isinstance(top, Message)
    codecda_raw = decode_text(top.get("X-MSS-CODECDA"))
    codecda = tuple(c.strip() for c in (codecda_raw or "").split(",") if c.strip())
    ins_raw = (decode_text(top.get("X-MSS-INS")) or "").strip().upper()
    ins: Literal["O", "N"] | None = "O" if ins_raw == "O" else "N" if ins_raw == "N" else None
    nil = decode_text(top.get("X-MSS-NIL"))
    mes = decode_text(top.get("X-MSS-MES"))
    return MssanteHeaders(
        codecda=codecda,
        ins=ins,
        nil=nil.strip() if nil else None,
        mes=mes.strip().upper() if mes else None,
    )


def parse_message(
    source: BinaryIO,
    *,
    envelope_out: BinaryIO | None = None,
    attachment_sink: AttachmentSink | None = None,
    limits: MailLimits | None = None,
) -> ParsedMessage:
    """Parse a raw message read from ``source`` (binary, read once, in chunks).

    The medsecure envelope attachment, if any, is decoded into ``envelope_out`` (not stored
    when None; a message with two envelopes is malformed). Other attachments go to the file
    ``attachment_sink(info)`` returns (None: skipped). Raises :class:`MailFormatError` for a
    malformed message or a limit exceeded; ``OSError`` from the streams passes through.
    """
    limits = limits or MailLimits()
    envelopes = 0
    text_buf = io.BytesIO()
    text_taken = False
    text_charset: str | None = None
    status_parts: list[tuple[str, io.BytesIO]] = []
    original = io.BytesIO()
    original_taken = False
    stored: dict[int, bool] = {}
    count = 0

    def handler(info: PartInfo) -> Decision:
        nonlocal envelopes, text_taken, text_charset, original_taken, count
        index = count
        count += 1
        stored[index] = False
        if info.media_type == ENVELOPE_MEDIA_TYPE:
            envelopes += 1
            if envelopes > 1:
                raise MailFormatError("more than one medsecure envelope in one message")
            stored[index] = envelope_out is not None
            return Decision(envelope_out)
        if info.report_type is not None and "multipart/report" in info.parents:
            if info.media_type in DSN_TYPES or info.media_type in MDN_TYPES:
                buf = io.BytesIO()
                status_parts.append((info.media_type, buf))
                return Decision(buf, cap=limits.max_report_part)
            if info.media_type in ORIGINAL_TYPES and not original_taken:
                original_taken = True
                return Decision(original, cap=_ORIGINAL_CAP, truncate=True)
        is_attachment = info.disposition == "attachment" or (
            info.filename is not None and info.disposition != "inline"
        )
        if info.media_type == "text/plain" and not is_attachment and not text_taken:
            text_taken = True
            text_charset = param_of(info.headers, "charset")
            return Decision(text_buf, cap=limits.max_text, truncate=True)
        if attachment_sink is not None and info.media_type != "multipart/alternative":
            sink = attachment_sink(info)
            if sink is not None:
                stored[index] = True
                return Decision(sink)
        return Decision(None)

    top, leaves = walk(source, handler, limits)
    message_id_raw = top.get("Message-ID")
    ids = parse_message_ids(str(message_id_raw)) if message_id_raw is not None else ()
    message_id = ids[0] if ids else None

    envelope_name = None
    envelope_size = None
    parts = []
    for i, leaf in enumerate(leaves):
        info = leaf.info
        charset = param_of(info.headers, "charset")
        parts.append(
            MailPart(
                media_type=info.media_type,
                filename=info.filename,
                disposition=info.disposition,
                size=leaf.size,
                charset=charset,
                stored=stored.get(i, False),
            )
        )
        if info.media_type == ENVELOPE_MEDIA_TYPE:
            envelope_size = leaf.size
            name = info.filename or ""
            if name.endswith(ENVELOPE_SUFFIX) and len(name) > len(ENVELOPE_SUFFIX):
                envelope_name = name[: -len(ENVELOPE_SUFFIX)]

    top_type = str(top.get("Content-Type", "")).split(";", 1)[0].strip().lower()
    reports: list[DeliveryReport] = []
    if top_type == "multipart/report" or status_parts:
        report_type = (param_of(top, "report-type") or "").lower() or None
        reports = reports_from_parts(
            report_type,
            [(t, b.getvalue()) for t, b in status_parts],
            original.getvalue() if original_taken else None,
            message_id,
        )

    text = None
    if text_taken:
        raw = text_buf.getvalue()
        try:
            text = raw.decode(text_charset or "utf-8")
        except (LookupError, UnicodeError, ValueError):  # unknown or garbled charset names too
            text = raw.decode("iso-8859-1")

    if reports:
        kind: Literal["medsecure", "report", "mail"] = "report"
    elif envelopes:
        kind = "medsecure"
    else:
        kind = "mail"
    dnt = top.get("Disposition-Notification-To")
    return ParsedMessage(
        kind=kind,
        message_id=message_id,
        date=parse_date(top.get("Date")),
        sender=first_address(top.get("From")),
        recipients=all_addresses(", ".join(str(v) for v in top.get_all("To", []))),
        subject=decode_text(top.get("Subject")),
        in_reply_to=parse_message_ids(top.get("In-Reply-To")),
        references=parse_message_ids(top.get("References")),
        disposition_notification_to=first_address(str(dnt)) if dnt is not None else None,
        envelope_name=envelope_name,
        envelope_size=envelope_size,
        reports=tuple(reports),
        parts=tuple(parts),
        text=text,
        mssante=_mssante(top),
    )


def parse_report(
    source: BinaryIO, *, limits: MailLimits | None = None
) -> tuple[DeliveryReport, ...]:
    """The delivery reports of a DSN or MDN message; :class:`MailFormatError` if the message is
    not a report (or is malformed)."""
    parsed = parse_message(source, limits=limits)
    if parsed.kind != "report":
        raise MailFormatError("not a delivery report (no multipart/report with a status part)")
    return parsed.reports
