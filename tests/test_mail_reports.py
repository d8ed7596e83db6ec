"""Delivery reports: DSN and MDN samples as operators send them, MDN production, folding."""

from __future__ import annotations

import contextlib
import datetime as dt
import email
import email.policy
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mailkit import SAMPLES, WHEN

from medsecure.mail import (
    DeliveryReport,
    MailFormatError,
    build_e2e_message,
    build_mdn,
    fold_status,
    parse_message,
    parse_report,
)


def sample(name: str) -> tuple[DeliveryReport, ...]:
    with open(SAMPLES / name, "rb") as fh:
        return parse_report(fh)


def test_postfix_bounce() -> None:
    (r,) = sample("postfix_dsn_failed.eml")
    assert r.kind == "dsn" and r.status == "failed" and r.final and r.permanent
    assert r.recipient == "inconnu@hopital-exemple.mssante.fr"
    assert r.original_recipient == "inconnu@hopital-exemple.mssante.fr"
    assert r.status_code == "5.1.1"
    assert r.reason is not None and r.reason.startswith("550 5.1.1") and "User unknown" in r.reason
    assert r.original_envelope_id == "01HXR4T3M5K8Q9V2W6Y7Z0ABCD"
    assert r.original_message_id == "01HXR4T3M5K8Q9V2W6Y7Z0ABCD@medecin.mssante.fr"


def test_postfix_delay_warning() -> None:
    (r,) = sample("postfix_dsn_delayed.eml")
    assert r.status == "delayed" and not r.final and r.permanent is False
    assert r.status_code == "4.4.1"
    assert r.original_message_id == "01HXR4A0B1C2D3E4F5G6H7J8K9@medecin.mssante.fr"


def test_success_dsn_for_two_recipients() -> None:
    a, b = sample("dsn_delivered_two_recipients.eml")
    assert (a.recipient, a.status) == ("dr.durand@clinique-exemple.mssante.fr", "delivered")
    assert (b.recipient, b.status) == ("secretariat@clinique-exemple.mssante.fr", "relayed")
    assert a.original_envelope_id == b.original_envelope_id == "01HXR5B7Q9W2E4R6T8Y0U1I3O5"
    assert a.original_message_id is None  # no returned headers: match on the envelope id


def test_exchange_ndr() -> None:
    (r,) = sample("exchange_ndr_failed.eml")
    assert r.status == "failed" and r.status_code == "5.1.10"
    assert r.recipient == "absent@hopital-exemple.fr"
    assert r.reason is not None and "RecipientNotFound" in r.reason
    assert r.original_message_id == "01HXR6C8D0E2F4G6H8J0K2M4N6@medecin.mssante.fr"


def test_mssante_mdn_processed() -> None:
    (r,) = sample("mssante_mdn_processed.eml")
    assert r.kind == "mdn" and r.status == "processed" and r.final
    assert r.original_message_id == "01HXT0ZK3M5N7P9Q1R3S5T7V9W@medecin.mssante.fr"
    assert r.recipient == "serviceY_auto@chb.mssante.fr"
    assert r.reason is None and r.status_code is None


def test_mssante_mdn_error_in_the_ans_form() -> None:
    (r,) = sample("mssante_mdn_error.eml")
    assert r.status == "failed"
    assert r.status_code == "902"
    assert r.reason == "Identifiant de patient inconnu"
    assert r.original_message_id == "199509192301.23456@chb.mssante.fr"


def test_rfc8098_displayed_is_read() -> None:
    (r,) = sample("rfc8098_mdn_displayed.eml")
    assert r.status == "read" and r.recipient == "Joe_Recipient@example.com"
    assert r.original_message_id == "199509192301.23456@example.org"


def test_a_normal_message_is_not_a_report() -> None:
    raw = build_e2e_message(
        io.BytesIO(b"x"), sender="a@b.fr", recipients=["c@d.fr"], message_id="M", date=WHEN
    ).read()
    with pytest.raises(MailFormatError, match="not a delivery report"):
        parse_report(io.BytesIO(raw))


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "reason"),
    [
        ({}, "processed", None, None),
        ({"disposition": "displayed", "automatic": False}, "read", None, None),
        (
            {"error": ("902", "Identifiant patient inconnu")},
            "failed",
            "902",
            "Identifiant patient inconnu",
        ),
        (
            {"error": ("904", "L'INS transmis ne correspond pas à celui stocké")},
            "failed",
            "904",
            "L'INS transmis ne correspond pas a celui stocke",
        ),
    ],
)
def test_mdn_round_trip(
    kwargs: dict[str, object], status: str, code: str | None, reason: str | None
) -> None:
    original = (
        b"From: dr.martin@medecin.mssante.fr\r\nMessage-ID: <orig.1@medecin.mssante.fr>\r\n"
        b"Subject: XDM/1.0/DDM+CR\r\n"
    )
    stream = build_mdn(
        sender="pfi@chb.mssante.fr",
        to="dr.martin@medecin.mssante.fr",
        original_message_id="<orig.1@medecin.mssante.fr>",
        final_recipient="pfi@chb.mssante.fr",
        original_recipient="service@chb.mssante.fr",
        date=WHEN,
        message_id="mdn.1@chb.mssante.fr",
        reporting_ua="PFI CHB; medsecure",
        original_headers=original,
        product_reference="NIL-7",
        **kwargs,  # type: ignore[arg-type]
    )
    raw = stream.read()
    std = email.message_from_bytes(raw, policy=email.policy.default)
    assert std.get_content_type() == "multipart/report"
    assert std.get_param("report-type") == "disposition-notification"
    assert not std.defects
    (r,) = parse_report(io.BytesIO(raw))
    assert r.kind == "mdn" and r.status == status
    assert r.status_code == code and r.reason == reason
    assert r.original_message_id == "orig.1@medecin.mssante.fr"
    assert r.recipient == "pfi@chb.mssante.fr"
    assert r.original_recipient == "service@chb.mssante.fr"
    assert r.report_message_id == "mdn.1@chb.mssante.fr"
    parsed = parse_message(io.BytesIO(raw))
    assert parsed.in_reply_to == ("orig.1@medecin.mssante.fr",)
    assert parsed.mssante.nil == "NIL-7"
    if code:
        assert f"processed/Error: {code}^" in (r.disposition or "")
        assert parsed.text is not None and code in parsed.text


def test_mdn_misuse() -> None:
    base: dict[str, object] = {
        "sender": "a@b.fr",
        "to": "c@d.fr",
        "original_message_id": "x@y",
        "final_recipient": "a@b.fr",
        "date": WHEN,
        "message_id": "m@b.fr",
    }
    with pytest.raises(ValueError):
        build_mdn(**{**base, "error": ("9 0 2", "x")})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        build_mdn(**{**base, "disposition": "eaten"})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        build_mdn(**{**base, "date": dt.datetime(2024, 1, 1)})  # type: ignore[arg-type]


def report(status: str) -> DeliveryReport:
    return DeliveryReport(kind="dsn", original_message_id="m@x", recipient="r@x", status=status)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("current", "new", "status", "changed", "conflict"),
    [
        (None, "delayed", "delayed", True, False),
        ("delayed", "delivered", "delivered", True, False),
        ("delivered", "delayed", "delivered", False, False),  # a late warning changes nothing
        ("delivered", "read", "read", True, False),
        ("read", "delivered", "read", False, False),  # duplicated / late success
        ("read", "read", "read", False, False),
        ("delivered", "failed", "delivered", False, True),  # contradiction: reported, not applied
        ("failed", "delivered", "failed", False, True),
        ("failed", "delayed", "failed", False, False),
        ("delayed", "failed", "failed", True, False),
        ("relayed", "processed", "processed", True, False),
        ("queued", "delivered", "delivered", True, False),
    ],
)
def test_fold_status(
    current: str | None, new: str, status: str, changed: bool, conflict: bool
) -> None:
    result = fold_status(current, report(new))
    assert (result.status, result.changed, result.conflict) == (status, changed, conflict)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.sampled_from(["delivery-status", "disposition-notification"]))
def test_random_report_bodies_raise_only_mail_format_error(body: bytes, kind: str) -> None:
    part = (
        "message/delivery-status"
        if kind == "delivery-status"
        else "message/disposition-notification"
    )
    raw = (
        b"From: a@b.fr\r\nContent-Type: multipart/report; report-type="
        + kind.encode()
        + b"; boundary=zz\r\n\r\n--zz\r\n\r\ntext\r\n--zz\r\nContent-Type: "
        + part.encode()
        + b"\r\n\r\n"
        + body.replace(b"--zz", b"")
        + b"\r\n--zz--\r\n"
    )
    with contextlib.suppress(MailFormatError):
        parse_report(io.BytesIO(raw))
