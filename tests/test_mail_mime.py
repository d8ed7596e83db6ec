"""The streaming MIME walker and header codecs: encodings, strictness, limits, hostile input."""

from __future__ import annotations

import base64
import contextlib
import email
import email.policy
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mailkit import SAMPLES, WHEN, pdf_document

from medsecure.mail import (
    MailFormatError,
    MailLimits,
    build_e2e_message,
    build_mssante_message,
    parse_message,
)
from medsecure.mail._headers import (
    decode_text,
    encode_params,
    header_line,
    normalize_message_id,
)

SENDER = "dr.martin@medecin.mssante.fr"
TO = "dr.durand@clinique-exemple.mssante.fr"


def message(
    body: bytes, ctype: bytes = b"multipart/mixed; boundary=b", extra: bytes = b""
) -> bytes:
    return (
        b"From: a@b.fr\r\nTo: c@d.fr\r\nSubject: t\r\nMIME-Version: 1.0\r\n"
        + extra
        + b"Content-Type: "
        + ctype
        + b"\r\n\r\n"
        + body
    )


GOOD = message(
    b"preamble\r\n--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
    b"--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; "
    b'filename="x.bin"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
    + base64.encodebytes(b"\x00\x01binary" * 10).replace(b"\n", b"\r\n")
    + b"--b--\r\nepilogue\r\n"
)


def collect(raw: bytes, limits: MailLimits | None = None) -> tuple[object, dict[str, bytes]]:
    got: dict[str, io.BytesIO] = {}
    parsed = parse_message(
        io.BytesIO(raw),
        attachment_sink=lambda info: got.setdefault(info.filename or "?", io.BytesIO()),
        limits=limits,
    )
    return parsed, {k: v.getvalue() for k, v in got.items()}


def test_a_well_formed_message_parses() -> None:
    parsed, files = collect(GOOD)
    assert files == {"x.bin": b"\x00\x01binary" * 10}
    assert parsed.text == "hello"  # type: ignore[attr-defined]


def test_close_delimiter_without_final_line_break() -> None:
    raw = GOOD.replace(b"--b--\r\nepilogue\r\n", b"--b--")
    _parsed, files = collect(raw)
    assert files["x.bin"] == b"\x00\x01binary" * 10


def test_transport_padding_after_a_delimiter_is_allowed() -> None:
    raw = GOOD.replace(b"--b\r\nContent-Type: application", b"--b  \t\r\nContent-Type: application")
    _parsed, files = collect(raw)
    assert files["x.bin"] == b"\x00\x01binary" * 10


def test_a_dash_line_that_is_not_a_delimiter_stays_in_the_body() -> None:
    raw = message(
        b"--b\r\nContent-Type: text/plain\r\n\r\nline\r\n--bx not a delimiter\r\n-- \r\nsig\r\n--b--\r\n"
    )
    parsed, _ = collect(raw)
    assert parsed.text == "line\r\n--bx not a delimiter\r\n-- \r\nsig"  # type: ignore[attr-defined]


def test_quoted_printable_is_decoded_across_chunks() -> None:
    text = ("é" * 40_000 + "\n") * 3
    body = text.encode("utf-8")
    import binascii

    qp = binascii.b2a_qp(body, istext=True).replace(b"\n", b"\r\n")
    raw = message(
        b"--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: "
        b"quoted-printable\r\n\r\n" + qp + b"\r\n--b--\r\n"
    )
    parsed, _ = collect(raw)
    assert parsed.text == text.replace("\n", "\r\n")  # type: ignore[attr-defined]


# -- headers: UTF-8 and ISO-8859-1, both ways --------------------------------------------------


@pytest.mark.parametrize("charset", ["utf-8", "iso-8859-1"])
def test_subject_and_file_names_round_trip(charset: str) -> None:
    name = "Résultats d'échographie — très longue désignation du fichier joint numéro 12.pdf"
    if charset == "iso-8859-1":
        name = name.replace("—", "-")
    doc = pdf_document(filename=name)
    stream = build_mssante_message(
        sender=SENDER,
        sender_name="Secrétariat du Dr Bérangère",
        recipients=[TO],
        body="Bonjour",
        date=WHEN,
        message_id="m1@medecin.mssante.fr",
        product_reference="NIL-1",
        documents=[doc],
        subject="Résultats à intégrer — Hélène",
        header_charset=charset,
    )
    raw = stream.read()
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    if charset == "iso-8859-1":
        assert b"iso-8859-1''" in raw
    parsed, files = collect(raw)
    assert parsed.subject == "Résultats à intégrer — Hélène"  # type: ignore[attr-defined]
    assert list(files) == [name]
    assert files[name] == doc.content
    # the standard library agrees
    std = email.message_from_bytes(raw, policy=email.policy.default)
    assert std["Subject"] == "Résultats à intégrer — Hélène"
    assert [a.get_filename() for a in std.iter_attachments()] == [name]
    assert "Bérangère" in str(std["From"])


def test_latin1_sample_with_rfc2047_and_rfc2231_file_names() -> None:
    with open(SAMPLES / "latin1_headers.eml", "rb") as fh:
        parsed = parse_message(fh)
    assert parsed.subject == "Résultats d'analyses à intégrer"
    assert parsed.sender == "secretariat@cabinet.mssante.fr"
    assert [p.filename for p in parsed.parts] == [
        None,
        "résultats mai.pdf",
        "compte rendu échographie abdominale (1).pdf",
    ]
    assert parsed.text == "Bonjour Docteur,\nci-joint les résultats."  # an LF (Maildir) file
    assert parsed.mssante.nil == "LGC-OLD-17"


def test_raw_8bit_headers_are_read_as_utf8_or_latin1() -> None:
    for raw_subject, expected in [("Réponse".encode(), "Réponse"), (b"R\xe9ponse", "Réponse")]:
        raw = message(b"--b\r\n\r\nx\r\n--b--\r\n", extra=b"X-Dummy: 1\r\n").replace(
            b"Subject: t", b"Subject: " + raw_subject
        )
        parsed, _ = collect(raw)
        assert parsed.subject == expected  # type: ignore[attr-defined]


def test_header_encoding_helpers() -> None:
    line = header_line("Subject", " ".join(["mot"] * 60))
    assert all(len(part) <= 78 for part in line.split("\r\n"))
    assert decode_text(header_line("Subject", "=?not really?=")[9:]) == "=?not really?="
    segs = encode_params([("filename", "é" * 80)])
    assert len(segs) > 1 and all(len(s) <= 78 for s in segs)
    with pytest.raises(ValueError):
        header_line("Subject", "a\r\nBcc: x@y.fr")
    with pytest.raises(ValueError):
        encode_params([("filename", "a\nb")])
    assert decode_text("=?unknown-charset?q?abc?=") == "=?unknown-charset?q?abc?="
    assert normalize_message_id(" <a.b@c.d > ") == "a.b@c.d"
    with pytest.raises(ValueError):
        normalize_message_id("<no-at>")


# -- malformed MIME: a clear error, nothing silently lost -------------------------------------


MALFORMED = {
    "no boundary parameter": message(b"--b\r\n\r\nx\r\n--b--\r\n", ctype=b"multipart/mixed"),
    "boundary with a bad character": message(
        b"--b\r\n\r\nx\r\n--b--\r\n", ctype=b'multipart/mixed; boundary="a\x01b"'
    ),
    "never terminated": message(b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n"),
    "no delimiter at all": message(b"just text\r\n"),
    "no body part": message(b"--b--\r\n"),
    "reused boundary": message(
        b"--b\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n--b--\r\n"
    ),
    "outer boundary inside an inner part": message(
        b"--b\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n--c\r\n\r\nx\r\n--b--\r\n"
    ),
    "invalid base64": message(b"--b\r\nContent-Transfer-Encoding: base64\r\n\r\nAB*D\r\n--b--\r\n"),
    "truncated base64": message(
        b"--b\r\nContent-Transfer-Encoding: base64\r\n\r\nQUJDR\r\n--b--\r\n"
    ),
    "data after base64 padding": message(
        b"--b\r\nContent-Transfer-Encoding: base64\r\n\r\nQQ==\r\nQUJD\r\n--b--\r\n"
    ),
    "unknown transfer encoding": message(
        b"--b\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nabc\r\n--b--\r\n"
    ),
    "header line without a name": message(b"--b\r\nnot a header\r\n\r\nx\r\n--b--\r\n"),
    "no header at all": b"\r\nbody only\r\n",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_mime_is_a_clear_error(name: str) -> None:
    with pytest.raises(MailFormatError) as err:
        parse_message(io.BytesIO(MALFORMED[name]))
    assert str(err.value)


def test_a_message_truncated_in_the_envelope_is_an_error() -> None:
    raw = build_e2e_message(
        io.BytesIO(b"x" * 50_000),
        sender=SENDER,
        recipients=[TO],
        message_id="M1",
        date=WHEN,
    ).read()
    for cut in (len(raw) // 2, len(raw) - 5, len(raw) - 60):
        with pytest.raises(MailFormatError):
            parse_message(io.BytesIO(raw[:cut]), envelope_out=io.BytesIO())


def test_limits_are_enforced() -> None:
    many = message(b"".join(b"--b\r\n\r\nx\r\n" for _ in range(20)) + b"--b--\r\n")
    with pytest.raises(MailFormatError, match="parts"):
        parse_message(io.BytesIO(many), limits=MailLimits(max_parts=10))
    deep = b"".join(
        b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
        for i in range(12)
    )
    with pytest.raises(MailFormatError, match="nesting"):
        parse_message(io.BytesIO(message(deep, ctype=b"multipart/mixed; boundary=b0")))
    long_line = message(b"--b\r\n\r\n" + b"x" * 20_000 + b"\r\n--b--\r\n")
    with pytest.raises(MailFormatError, match="line"):
        parse_message(io.BytesIO(long_line))
    long_unterminated = message(b"--b\r\n\r\n" + b"x" * 300_000)
    with pytest.raises(MailFormatError, match="line"):
        parse_message(io.BytesIO(long_unterminated))
    big_headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 70) for i in range(5000)) + GOOD
    with pytest.raises(MailFormatError, match="header block"):
        parse_message(io.BytesIO(big_headers))
    with pytest.raises(MailFormatError, match="larger than"):
        parse_message(io.BytesIO(GOOD), limits=MailLimits(max_message_bytes=100))


def test_report_parts_are_bounded() -> None:
    status = b"Reporting-MTA: dns; x\r\n\r\n" + b"X-Pad: " + b"a" * 900 + b"\r\n"
    raw = message(
        b"--b\r\n\r\ntext\r\n--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        + status * 400
        + b"--b--\r\n",
        ctype=b"multipart/report; report-type=delivery-status; boundary=b",
    )
    with pytest.raises(MailFormatError, match="report part"):
        parse_message(io.BytesIO(raw))


# -- hostile input: only MailFormatError ------------------------------------------------------


def _only_mail_errors(raw: bytes) -> None:
    with contextlib.suppress(MailFormatError):
        parse_message(
            io.BytesIO(raw), envelope_out=io.BytesIO(), attachment_sink=lambda i: io.BytesIO()
        )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_mail_format_error(data: bytes) -> None:
    _only_mail_errors(data)


SEEDS = [
    GOOD,
    *(path.read_bytes() for path in sorted(SAMPLES.glob("*.eml"))),
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(SEEDS),
    st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(0, 40), st.binary(max_size=12)),
        min_size=1,
        max_size=6,
    ),
)
def test_mutated_messages_raise_only_mail_format_error(
    seed: bytes, edits: list[tuple[int, int, bytes]]
) -> None:
    raw = bytearray(seed)
    for pos, cut, insert in edits:
        pos %= len(raw) + 1
        raw[pos : pos + cut] = insert
    _only_mail_errors(bytes(raw))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                b"--b\r\n",
                b"--b--\r\n",
                b"--c\r\n",
                b"--c--\r\n",
                b"Content-Type: multipart/mixed; boundary=c\r\n",
                b"Content-Type: message/delivery-status\r\n",
                b"Content-Type: application/vnd.medsecure.envelope\r\n",
                b"Content-Transfer-Encoding: base64\r\n",
                b"Content-Transfer-Encoding: quoted-printable\r\n",
                b"Action: failed\r\n",
                b"Final-Recipient: rfc822; x@y.fr\r\n",
                b"Disposition: a/b; processed/error\r\n",
                b"QUJD\r\n",
                b"=C3=A9=\r\n",
                b"\r\n",
                b"text\r\n",
            ]
        ),
        max_size=30,
    )
)
def test_structured_garbage_raises_only_mail_format_error(lines: list[bytes]) -> None:
    raw = message(
        b"".join(lines), ctype=b"multipart/report; report-type=delivery-status; boundary=b"
    )
    _only_mail_errors(raw)
