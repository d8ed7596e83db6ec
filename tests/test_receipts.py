"""Signed receipts end to end over the file transport, and the audit trail they leave."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from clientkit import Party, client, entry, party

import medsecure as m
from medsecure.audit import verify
from medsecure.client import StatusEvent
from medsecure.directory import MemoryDirectory
from medsecure.envelope._message import Manifest, new_message_id
from medsecure.identifiers import INS
from medsecure.models import Patient
from medsecure.transports import FileTransport
from medsecure.trust import AuthorityPolicy


@pytest.fixture(scope="module")
def authority() -> m.Identity:
    return m.Identity.generate()


@pytest.fixture
def world(tmp_path: Path, authority: m.Identity) -> tuple[Party, Party, MemoryDirectory]:
    alice = party(tmp_path, "alice", "810000005479")
    bob = party(tmp_path, "bob", "810000000017")
    return alice, bob, MemoryDirectory([entry(authority, alice), entry(authority, bob)])


def statuses(c: m.Client, message_id: str) -> list[str]:
    return [s.status for s in c.status(message_id)]


def test_delivered_then_read(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity
) -> None:
    alice, bob, directory = world
    seen: list[StatusEvent] = []
    with (
        client(alice, directory, authority, on_status=seen.append) as ca,
        client(bob, directory, authority) as cb,
    ):
        r = ca.send(m.Document(content=b"CR"), to=bob.ref, receipts=("delivered", "read"))
        assert statuses(ca, r.message_id) == ["sent"]
        (msg,) = cb.receive()  # bob verifies: a signed "delivered" receipt goes back
        assert msg.receipts_requested == ("delivered", "read")
        assert ca.receive() == []  # receipts are not messages
        (st,) = ca.status(r.message_id)
        assert st.status == "delivered" and st.receipts == ("delivered",)
        msg.mark_read()
        msg.mark_read()  # idempotent
        ca.receive()
        (st,) = ca.status(r.message_id)
        assert st.status == "read" and set(st.receipts) == {"delivered", "read"}
        assert [e.status for e in seen] == ["sent", "delivered", "read"]
        assert [e.status for e in ca.events()] == ["sent", "delivered", "read"]
        assert ca.events(after=seen[1].id)[0].status == "read"
        assert [e.message_id for e in ca.outbox()] == [r.message_id]  # receipts are not listed


def test_no_receipts_unless_asked_and_read_receipts_refusable(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity
) -> None:
    alice, bob, directory = world
    with (
        client(alice, directory, authority) as ca,
        client(bob, directory, authority, send_read_receipts=False) as cb,
    ):
        plain = ca.send(m.Document(content=b"x"), to=bob.ref)
        asked = ca.send(m.Document(content=b"y"), to=bob.ref, receipts=("delivered", "read"))
        for msg in cb.receive():
            msg.mark_read()
        ca.receive()
        assert statuses(ca, plain.message_id) == ["sent"]
        assert statuses(ca, asked.message_id) == ["delivered"]  # bob's policy refuses read receipts


def test_rejected_with_reason(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity
) -> None:
    alice, bob, directory = world
    with client(alice, directory, authority) as ca, client(bob, directory, authority) as cb:
        r = ca.send(m.Document(content=b"x"), to=bob.ref, receipts=("delivered",))
        (msg,) = cb.receive()
        with pytest.raises(ValueError, match="unknown rejection reason"):
            msg.reject("because")
        msg.reject("unknown-patient")
        assert cb.receive() == []  # rejected means processed
        ca.receive()
        (st,) = ca.status(r.message_id)
        assert st.status == "rejected" and st.reason == "unknown-patient"


def test_duplicated_receipts_are_idempotent(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity
) -> None:
    alice, bob, directory = world
    with client(alice, directory, authority) as ca, client(bob, directory, authority) as cb:
        r = ca.send(m.Document(content=b"x"), to=bob.ref, receipts=("delivered",))
        cb.receive()
        receipt_file = next((alice.box / "new").iterdir())
        blob = receipt_file.read_bytes()
        ca.receive()
        receipt_file.write_bytes(blob)  # the same receipt delivered again
        ca.receive()
        assert [e.status for e in ca.events()].count("delivered") == 1
        assert statuses(ca, r.message_id) == ["delivered"]


def _forge_receipt(
    sender: Party, to_key: m.PublicIdentity, of: str, envelope: str, status: str = "delivered"
) -> bytes:
    now = dt.datetime.now(dt.UTC)
    manifest = Manifest(
        message_id=new_message_id(now),
        created=now,
        sender_idnps=sender.idnps,
        recipients=(),
        subject=None,
        body=None,
        in_reply_to=of,
        documents=(),
        receipts=(),
        kind="receipt",
        extra={"status": status, "of": of, "envelope": envelope, "at": 0},
    )
    import struct

    raw = manifest.encode()
    plaintext = b"MEDSECM\x01" + struct.pack(">I", len(raw)) + raw
    return m.seal(plaintext, sender=sender.identity, recipients=[to_key])


def test_forged_and_unknown_receipts_are_ignored(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity, tmp_path: Path
) -> None:
    alice, bob, directory = world
    carol = party(tmp_path, "carol", "810000000025")
    directory.add(entry(authority, carol))
    with client(alice, directory, authority) as ca:
        r = ca.send(m.Document(content=b"x"), to=bob.ref, receipts=("delivered",))
        eid = ca.store.query(
            "SELECT envelope_id FROM outbox WHERE message_id = ?", (r.message_id,)
        )[0]["envelope_id"]
        box = alice.box / "new"
        # 1. signed by a key that is not bob's, claiming to be bob: quarantined (bad signer)
        mallory = party(tmp_path, "mallory", bob.idnps)
        (box / f"{new_message_id(dt.datetime.now(dt.UTC))}.msec").write_bytes(
            _forge_receipt(mallory, alice.identity.public, r.message_id, eid)
        )
        # 2. carol (genuine, trusted) claims a receipt for a message not sent to her
        (box / f"{new_message_id(dt.datetime.now(dt.UTC))}.msec").write_bytes(
            _forge_receipt(carol, alice.identity.public, r.message_id, eid)
        )
        # 3. bob acknowledges other content than what was sent
        (box / f"{new_message_id(dt.datetime.now(dt.UTC))}.msec").write_bytes(
            _forge_receipt(bob, alice.identity.public, r.message_id, "0" * 64)
        )
        # 4. bob acknowledges a message that does not exist
        (box / f"{new_message_id(dt.datetime.now(dt.UTC))}.msec").write_bytes(
            _forge_receipt(bob, alice.identity.public, "01ZZZZZZZZZZZZZZZZZZZZZZZZ", eid)
        )
        assert ca.receive() == []
        assert statuses(ca, r.message_id) == ["sent"]
        assert len(ca.quarantine()) == 1 and "not trusted" in ca.quarantine()[0].reason
        ignored = ca.store.query(
            "SELECT reason FROM inbox WHERE status = 'receipt-ignored' ORDER BY id"
        )
        assert sorted(x["reason"] for x in ignored) == [
            "receipt for an unknown message",
            "receipt for other content than the envelope sent",
            "receipt from 810000000025, who is not a recipient of the message",
        ]
        log = (alice.home / "audit").glob("audit-*.jsonl")
        text = b"".join(p.read_bytes() for p in log)
        assert text.count(b'"action":"receipt-ignored"') == 3


def test_deadline_expiry_and_late_receipt(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity
) -> None:
    alice, bob, directory = world
    now = [2_000_000_000.0]
    with (
        client(alice, directory, authority, clock=lambda: now[0]) as ca,
        client(bob, directory, authority) as cb,
    ):
        r = ca.send(
            m.Document(content=b"x"),
            to=bob.ref,
            receipts=("delivered",),
            deadline=dt.timedelta(hours=1),
        )
        now[0] += 2 * 3600
        ca.flush()
        (st,) = ca.status(r.message_id)
        assert st.status == "expired"
        cb.receive()  # bob finally gets it and sends "delivered"
        ca.receive()
        (st,) = ca.status(r.message_id)
        assert st.status == "expired" and st.late_receipts == ("delivered",)  # recorded, not hidden
        late = [e for e in ca.events() if e.late]
        assert [e.status for e in late] == ["delivered"]


def test_rejected_receipt_when_verification_fails(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity, tmp_path: Path
) -> None:
    alice, bob, directory = world
    # alice sends with a new key the directory does not vouch for
    rogue_alice = Party(
        alice.name, alice.idnps, m.Identity.generate(), alice.box, tmp_path / "home-alice-2"
    )
    with m.Client(
        rogue_alice.identity,
        directory,
        FileTransport(alice.box),
        rogue_alice.home,
        trust=AuthorityPolicy([authority.public]),
        me=alice.idnps,
    ) as ra:
        ra.send(m.Document(content=b"x"), to=bob.ref, receipts=("delivered",))
    with client(bob, directory, authority) as cb:
        assert cb.receive() == [] and len(cb.quarantine()) == 1
    # the genuine alice (the key the directory vouches for) is told
    with client(alice, directory, authority) as ca:
        ca.receive()
        rows = ca.store.query("SELECT reason FROM inbox WHERE status = 'receipt-ignored'")
        assert (
            rows and rows[0]["reason"] == "receipt for an unknown message"
        )  # it was not her message


def test_audit_trail_has_no_health_data(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity
) -> None:
    alice, bob, directory = world
    secret = b"Resultat biopsie: carcinome"
    subject = "Biopsie DUPONT Jean"
    filename = "biopsie_dupont.pdf"
    patient = Patient(ins=INS("279035121518989", birth_name="DUPONT"))
    with client(alice, directory, authority) as ca, client(bob, directory, authority) as cb:
        r = ca.send(
            m.Document(content=b"%PDF-1.7 " + secret, filename=filename, patient=patient),
            to=bob.ref,
            subject=subject,
            body="Bien cordialement",
            receipts=("delivered", "read"),
        )
        (msg,) = cb.receive()
        msg.mark_read()
        msg.ack()
        ca.receive()
    for who in (alice, bob):
        folder = who.home / "audit"
        blob = (
            b"".join(p.read_bytes() for p in folder.glob("audit-*.jsonl"))
            + (folder / "HEAD").read_bytes()
        )
        for needle in (
            secret,
            b"carcinome",
            subject.encode(),
            b"DUPONT",
            filename.encode(),
            b"biopsie",
            b"279035121518989",
            b"cordialement",
        ):
            assert needle not in blob, (who.name, needle)
        report = verify(folder, public=who.identity.public)
        assert report.ok, report.problem
        actions = [
            line.split(b'"action":"')[1].split(b'"')[0].decode()
            for line in blob.splitlines()
            if b'"action":"' in line
        ]
        assert "checkpoint" in actions
    alice_actions = b"".join(p.read_bytes() for p in (alice.home / "audit").glob("audit-*.jsonl"))
    for action in (b'"send"', b'"deliver"', b'"receipt"', b'"trust"'):
        assert b'"action":' + action in alice_actions
    bob_actions = b"".join(p.read_bytes() for p in (bob.home / "audit").glob("audit-*.jsonl"))
    for action in (b'"receive"', b'"receipt-send"', b'"read"', b'"ack"'):
        assert b'"action":' + action in bob_actions
    # the patient can be linked across records by a keyed hash, never by the INS itself
    assert b'"patients":["' in alice_actions and r.message_id.encode() in alice_actions
