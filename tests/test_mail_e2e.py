"""The medsecure end-to-end mail profile: build, parse, and what servers can see."""

from __future__ import annotations

import email
import email.policy
import io
import os
import re

import pytest
from mailkit import MATRICULE, WHEN

from medsecure.mail import (
    E2E_SUBJECT,
    ENVELOPE_MEDIA_TYPE,
    MailFormatError,
    build_e2e_message,
    parse_message,
)

SENDER = "dr.martin@medecin.mssante.fr"
RECIPIENT = "dr.durand@clinique-exemple.mssante.fr"
MESSAGE_ID = "01HXR4T3M5K8Q9V2W6Y7Z0ABCD"


def build(envelope: bytes, **over: object) -> bytes:
    args: dict[str, object] = {
        "sender": SENDER,
        "recipients": [RECIPIENT],
        "message_id": MESSAGE_ID,
        "date": WHEN,
    }
    args.update(over)
    return build_e2e_message(io.BytesIO(envelope), **args).read()  # type: ignore[arg-type]


def test_round_trip_keeps_the_envelope_and_the_thread() -> None:
    envelope = os.urandom(200_003)
    raw = build(
        envelope,
        in_reply_to="<01HXQ000000000000000000000@medecin.mssante.fr>",
        references=["older@example.org"],
        recipients=[RECIPIENT, "secretariat@clinique-exemple.mssante.fr"],
    )
    out = io.BytesIO()
    parsed = parse_message(io.BytesIO(raw), envelope_out=out)
    assert out.getvalue() == envelope
    assert parsed.kind == "medsecure"
    assert parsed.message_id == f"{MESSAGE_ID}@medecin.mssante.fr"
    assert parsed.envelope_name == MESSAGE_ID
    assert parsed.envelope_size == len(envelope)
    assert parsed.sender == SENDER
    assert parsed.recipients == (RECIPIENT, "secretariat@clinique-exemple.mssante.fr")
    assert parsed.date == WHEN
    assert parsed.subject == E2E_SUBJECT
    assert parsed.in_reply_to == ("01HXQ000000000000000000000@medecin.mssante.fr",)
    assert parsed.references == (
        "older@example.org",
        "01HXQ000000000000000000000@medecin.mssante.fr",
    )
    assert parsed.text is not None and "chiffré de bout en bout" in parsed.text
    assert "end-to-end encrypted" in parsed.text


def test_the_standard_library_reads_the_same_message() -> None:
    envelope = os.urandom(5000)
    raw = build(envelope)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Subject"] == E2E_SUBJECT
    attachments = list(msg.iter_attachments())
    assert len(attachments) == 1
    assert attachments[0].get_content_type() == ENVELOPE_MEDIA_TYPE
    assert attachments[0].get_filename() == f"{MESSAGE_ID}.msec"
    assert attachments[0].get_content() == envelope
    assert not msg.defects


def test_lines_are_crlf_and_at_most_78_columns() -> None:
    raw = build(os.urandom(10_000))
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78


def test_servers_see_nothing_about_the_patient_or_the_document() -> None:
    # the envelope is opaque; what a server sees are the header blocks and the text part
    raw = build(os.urandom(1000))
    visible = raw.decode("ascii").lower()
    for secret in (
        MATRICULE,
        "dupont",
        "hélène",
        "helene",
        "compte rendu",
        "consultation",
        "11488-4",
        ".pdf",
        ".xml",
    ):
        assert secret.lower() not in visible
    headers = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    names = {line.split(":", 1)[0] for line in headers.split("\r\n") if line and line[0] != " "}
    assert names == {
        "From",
        "To",
        "Date",
        "Message-ID",
        "Subject",
        "MIME-Version",
        "Content-Type",
    }


def test_the_message_id_is_stable_across_retries() -> None:
    a = build_e2e_message(
        io.BytesIO(b"x"), sender=SENDER, recipients=[RECIPIENT], message_id=MESSAGE_ID, date=WHEN
    )
    b = build_e2e_message(
        io.BytesIO(b"x"), sender=SENDER, recipients=[RECIPIENT], message_id=MESSAGE_ID, date=WHEN
    )
    assert a.message_id == b.message_id == f"{MESSAGE_ID}@medecin.mssante.fr"


def test_product_reference_adds_x_mss_nil() -> None:
    raw = build(b"envelope", product_reference="NIL-12345")
    assert b"\r\nX-MSS-NIL: NIL-12345\r\n" in raw
    assert parse_message(io.BytesIO(raw)).mssante.nil == "NIL-12345"


def test_chunks_and_read_give_the_same_bytes() -> None:
    envelope = os.urandom(300_000)
    args = {"sender": SENDER, "recipients": [RECIPIENT], "message_id": MESSAGE_ID, "date": WHEN}
    stream = build_e2e_message(io.BytesIO(envelope), **args)  # type: ignore[arg-type]
    chunked = b"".join(stream.iter_chunks())
    stream2 = build_e2e_message(io.BytesIO(envelope), **args)  # type: ignore[arg-type]
    small = bytearray()
    while piece := stream2.read(997):
        small += piece

    # boundaries are random: compare with them blanked out
    def blank(data: bytes) -> bytes:
        return re.sub(rb"=_ms_[0-9a-f]{32}", b"B", data)

    assert blank(chunked) == blank(bytes(small))


def test_a_message_with_lf_line_ends_parses_too() -> None:
    envelope = os.urandom(70_000)
    raw = build(envelope).replace(b"\r\n", b"\n")
    out = io.BytesIO()
    parse_message(io.BytesIO(raw), envelope_out=out)
    assert out.getvalue() == envelope


def test_an_empty_envelope_round_trips() -> None:
    out = io.BytesIO()
    parsed = parse_message(io.BytesIO(build(b"")), envelope_out=out)
    assert out.getvalue() == b"" and parsed.envelope_size == 0


@pytest.mark.parametrize(
    "over",
    [
        {"sender": "not an address"},
        {"sender": "a@b.fr\r\nBcc: x@y.fr"},
        {"recipients": []},
        {"recipients": "x@y.fr"},
        {"message_id": "../etc/passwd"},
        {"message_id": "has space"},
        {"in_reply_to": "no-at-sign"},
    ],
)
def test_bad_arguments_are_value_errors(over: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        build(b"x", **over)


def test_naive_date_is_refused() -> None:
    import datetime as dt

    with pytest.raises(ValueError):
        build(b"x", date=dt.datetime(2024, 1, 1))


def test_two_envelopes_in_one_message_are_malformed() -> None:
    raw = build(b"abc")
    _head, _sep, _rest = raw.partition(b"--=_ms_")
    boundary = re.search(rb'boundary="(=_ms_[0-9a-f]{32})"', raw)
    assert boundary is not None
    b = boundary.group(1)
    part = raw.split(b"--" + b + b"\r\n")[2].split(b"\r\n--" + b + b"--")[0]
    doubled = raw.replace(
        b"\r\n--" + b + b"--", b"\r\n--" + b + b"\r\n" + part + b"\r\n--" + b + b"--"
    )
    with pytest.raises(MailFormatError, match="more than one"):
        parse_message(io.BytesIO(doubled), envelope_out=io.BytesIO())
