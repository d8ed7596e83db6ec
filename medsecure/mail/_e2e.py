"""The medsecure end-to-end mail profile: an envelope carried as an attachment.

What mail servers see: the sender's and recipients' addresses, the date, a random-looking
Message-ID (the medsecure message id, a ULID, ``@`` the sender's domain), a fixed neutral
subject, a fixed bilingual text, and one attachment ``<message id>.msec`` of media type
``application/vnd.medsecure.envelope`` whose bytes are the sealed envelope. Nothing names the
patient, the document, its type or its title: those travel inside the envelope only.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import BinaryIO

from ._headers import (
    check_parties,
    normalize_message_id,
    opening_headers,
    raw_header_line,
)
from ._mime import MessageStream, Multipart, base64_body, leaf, read_chunks, render, text_body

__all__ = [
    "E2E_SUBJECT",
    "E2E_TEXT",
    "ENVELOPE_MEDIA_TYPE",
    "ENVELOPE_SUFFIX",
    "build_e2e_message",
]

#: Media type of the envelope attachment (a vendor tree type, RFC 6838 §3.2).
ENVELOPE_MEDIA_TYPE = "application/vnd.medsecure.envelope"
ENVELOPE_SUFFIX = ".msec"
#: The subject of every end-to-end message: it says nothing about the content.
E2E_SUBJECT = "Message sécurisé / Secure message"
#: The text part of every end-to-end message (French, then English).
E2E_TEXT = (
    "Ce message contient un document médical chiffré de bout en bout.\n"
    "Ouvrez-le avec un logiciel compatible medsecure.\n"
    "\n"
    "This message holds an end-to-end encrypted medical document.\n"
    "Open it with medsecure-compatible software.\n"
)
_MESSAGE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def build_e2e_message(
    envelope: BinaryIO,
    *,
    sender: str,
    recipients: Sequence[str],
    message_id: str,
    date: dt.datetime,
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
    mail_message_id: str | None = None,
    product_reference: str | None = None,
) -> MessageStream:
    """An RFC 5322 message carrying one sealed envelope, produced as a stream.

    ``envelope`` is read chunk by chunk while the stream is consumed (a 200 MiB envelope is
    never held whole). ``message_id`` is the medsecure message id (letters, digits, ``.``,
    ``_``, ``-``): it names the attachment and, unless ``mail_message_id`` is given, forms the
    Message-ID ``<message_id@sender-domain>`` so that a retry carries the same id.
    ``in_reply_to`` / ``references`` thread a reply (a signed receipt, for instance).
    ``product_reference`` adds ``X-MSS-NIL`` (required by MSSanté operators on every message).
    """
    check_parties(sender, recipients)
    if not isinstance(message_id, str) or not _MESSAGE_ID_RE.fullmatch(message_id):
        raise ValueError("message_id must be letters, digits, '.', '_' or '-' (1 to 128)")
    domain = sender.rsplit("@", 1)[1]
    mid = normalize_message_id(mail_message_id or f"{message_id}@{domain}")
    filename = message_id + ENVELOPE_SUFFIX
    headers = opening_headers(
        (None, sender),
        recipients,
        date,
        mid,
        E2E_SUBJECT,
        in_reply_to=in_reply_to,
        references=references,
    )
    if product_reference is not None:
        headers.append(raw_header_line("X-MSS-NIL", product_reference))
    body = Multipart(
        "mixed",
        [
            leaf(
                "text/plain",
                text_body(E2E_TEXT),
                encoding="quoted-printable",
                params=[("charset", "utf-8")],
            ),
            leaf(
                ENVELOPE_MEDIA_TYPE,
                base64_body(lambda: read_chunks(envelope)),
                encoding="base64",
                disposition="attachment",
                filename=filename,
            ),
        ],
    )
    shown = {
        "From": sender,
        "To": ", ".join(recipients),
        "Subject": E2E_SUBJECT,
        "Message-ID": mid,
    }
    return MessageStream(render(headers, body), message_id=mid, headers=shown)
