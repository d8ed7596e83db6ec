"""The MSSanté fallback: a recipient with an MSSanté mailbox and no medsecure key gets a standard
MSSanté message (TLS only), only when asked, audited, never as a downgrade of an untrusted key;
delivery reports about it fold into the sender's status."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
from clientkit import Party, entry, party

import medsecure as m
from medsecure.audit import export
from medsecure.directory import MemoryDirectory
from medsecure.mail import MssanteOptions, parse_message
from medsecure.models import Mailbox, Practitioner
from medsecure.transports import DeliveryReport, Incoming, MockTransport
from medsecure.trust import AuthorityPolicy


class MailMock(MockTransport):
    kinds: ClassVar[frozenset[str]] = frozenset({"drop", "mail", "mssante"})

    def __init__(self) -> None:
        super().__init__()
        self.reports: list[DeliveryReport] = []

    def list(self) -> list[Incoming]:
        out = list(super().list())
        out += [
            Incoming(handle=f"r{i}", message_id=r.message_id, kind="report", report=r)
            for i, r in enumerate(self.reports)
        ]
        return out

    def acknowledge(self, item: Incoming) -> None:
        if item.kind == "report":
            self.reports = [r for r in self.reports if r is not item.report]
            return
        super().acknowledge(item)


@pytest.fixture(scope="module")
def authority() -> m.Identity:
    return m.Identity.generate()


def carol_entry(keys: tuple[Any, ...] = ()) -> Practitioner:
    return Practitioner(
        idnps="810000000025",
        family_name="CAROL",
        mailboxes=(Mailbox(address="carol@medecin.mssante.fr", type="PER"),),
        keys=keys,
    )


OPTIONS = MssanteOptions(address="alice@medecin.mssante.fr", product_reference="MEDSECURE-TEST-1")


def audit_actions(home: Path) -> list[dict[str, Any]]:
    out = io.StringIO()
    export(home / "audit", out)
    return [json.loads(x) for x in out.getvalue().splitlines() if x.strip()]


def make(alice: Party, directory: MemoryDirectory, authority: m.Identity, **kw: Any) -> m.Client:
    return m.Client(
        alice.identity,
        directory,
        kw.pop("transport", MailMock()),
        alice.home,
        trust=AuthorityPolicy([authority.public]),
        me=alice.idnps,
        **kw,
    )


def test_fallback_sends_an_mssante_message_and_audits_it(
    tmp_path: Path, authority: m.Identity
) -> None:
    alice = party(tmp_path, "alice", "810000005479")
    bob = party(tmp_path, "bob", "810000000017")
    directory = MemoryDirectory([entry(authority, alice), entry(authority, bob), carol_entry()])
    mock = MailMock()
    with make(alice, directory, authority, transport=mock, mssante=OPTIONS) as ca:
        doc = m.Document(content=b"%PDF-1.7 compte rendu", filename="cr.pdf")
        with pytest.raises(m.UntrustedKey, match="no end-to-end key"):
            ca.send(doc, to="idnps:810000000025")  # not without asking
        r = ca.send(
            doc,
            to=[bob.ref, "idnps:810000000025"],
            subject="Compte rendu",
            mssante_fallback=True,
            receipts=("read",),
        )
        assert sorted(s.status for s in r.recipients) == ["sent", "sent"]
        kinds = {d.endpoint.kind: d for d in mock.deliveries}
        assert set(kinds) == {"drop", "mssante"}
        mail = kinds["mssante"]
        assert mail.endpoint.address == "carol@medecin.mssante.fr"
        parsed = parse_message(io.BytesIO(mail.envelope))
        assert parsed.mssante is not None and parsed.mssante.nil == "MEDSECURE-TEST-1"
        assert parsed.disposition_notification_to  # a read receipt was asked: an MDN
        assert b"%PDF-1.7 compte rendu" not in kinds["drop"].envelope  # E2E stays sealed
        files = sorted(p.name for p in (alice.home / "outbox").iterdir())
        eml = [f for f in files if f.endswith(".eml")]
        assert len(eml) == 1 and (alice.home / "outbox" / eml[0]).stat().st_mode & 0o777 == 0o600
        (rec,) = [a for a in audit_actions(alice.home) if a["action"] == "send-mssante"]
        assert rec["result"] == "tls-only" and rec["counterparty"] == ["810000000025"]
        # an MDN comes back: the status of Carol (only) moves to read
        mock.reports.append(
            DeliveryReport(
                message_id=r.message_id,
                recipient="carol@medecin.mssante.fr",
                status="read",
                source="mdn",
            )
        )
        ca.receive()
        by = {s.recipient: s.status for s in ca.status(r.message_id)}
        assert by == {"810000000017": "sent", "810000000025": "read"}
        # a failure reported later never rewrites it silently... but a DSN failure on a sent
        # delivery ends it with the reason
        mock.reports.append(
            DeliveryReport(message_id=r.message_id, recipient=None, status="failed", source="dsn")
        )
        ca.receive()  # ambiguous (no recipient named, two recipients): ignored and audited
        assert {s.recipient: s.status for s in ca.status(r.message_id)}["810000000017"] == "sent"
        assert any(a["action"] == "report-ignored" for a in audit_actions(alice.home))


def test_an_untrusted_key_is_never_downgraded_to_plain_text(
    tmp_path: Path, authority: m.Identity
) -> None:
    alice = party(tmp_path, "alice", "810000005479")
    stranger_key = m.Identity.generate().public
    from medsecure.models import KeyEntry

    carol = carol_entry(keys=(KeyEntry(public=stranger_key),))  # listed, but not vouched for
    directory = MemoryDirectory([entry(authority, alice), carol])
    mock = MailMock()
    with (
        make(
            alice, directory, authority, transport=mock, mssante=OPTIONS, mssante_fallback=True
        ) as ca,
        pytest.raises(m.UntrustedKey),
    ):
        ca.send(m.Document(content=b"x"), to="idnps:810000000025")
    assert mock.deliveries == []
    assert not list((alice.home / "outbox").iterdir())


def test_fallback_needs_options_and_a_transport(tmp_path: Path, authority: m.Identity) -> None:
    alice = party(tmp_path, "alice", "810000005479")
    directory = MemoryDirectory([entry(authority, alice), carol_entry()])
    with pytest.raises(ValueError, match="MssanteOptions"):
        make(alice, directory, authority, mssante_fallback=True)
    with make(alice, directory, authority, transport=MockTransport(), mssante=OPTIONS) as ca:
        with pytest.raises(m.TransportError, match="no configured transport"):
            ca.send(m.Document(content=b"x"), to="idnps:810000000025", mssante_fallback=True)
        assert ca.outbox() == []
