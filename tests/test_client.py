"""Client: send / flush / receive over the file transport and the mock transport."""

from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
import time
from pathlib import Path

import pytest
from clientkit import Party, client, entry, party

import medsecure as m
from medsecure.directory import MemoryDirectory
from medsecure.identifiers import INS
from medsecure.models import Code, Endpoint, Patient
from medsecure.transports import Delivery, FileTransport, MockTransport
from medsecure.trust import AuthorityPolicy, UnsafeAcceptAll


@pytest.fixture(scope="module")
def authority() -> m.Identity:
    return m.Identity.generate()


@pytest.fixture
def world(tmp_path: Path, authority: m.Identity) -> tuple[Party, Party, MemoryDirectory]:
    alice = party(tmp_path, "alice", "810000005479")
    bob = party(tmp_path, "bob", "810000000017")
    directory = MemoryDirectory([entry(authority, alice), entry(authority, bob)])
    return alice, bob, directory


def test_a_media_type_mismatch_names_the_document_by_position(
    world: tuple[Party, Party, MemoryDirectory],
    authority: m.Identity,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A file name whose extension disagrees with the content: the warning says which document
    (its position, never its file name, which may name the patient) and that it was sent as it
    is, typed by its content; the recipient gets it unchanged."""
    alice, bob, directory = world
    jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF" + os.urandom(100)
    docs = [
        m.Document(content=b"%PDF-1.7\n1", filename="a.pdf"),
        m.Document(content=jpeg, filename="IRM_DUPONT_Jean.pdf"),
        m.Document(content=b"%PDF-1.7\n3", filename="c.pdf"),
    ]
    with client(alice, directory, authority) as ca, client(bob, directory, authority) as cb:
        with caplog.at_level(logging.WARNING, logger="medsecure"):
            assert ca.send(docs, to=bob.ref).all_sent
        (line,) = [r.getMessage() for r in caplog.records if "media type" in r.getMessage()]
        assert line.startswith("document 2 of 3: ") and "DUPONT" not in line, line
        assert "application/pdf" in line and "image/jpeg" in line and "sent as is" in line
        (msg,) = cb.receive()
        assert msg.documents[1].media_type == "image/jpeg" and msg.documents[1].read() == jpeg


def test_send_and_receive_documents(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity
) -> None:
    alice, bob, directory = world
    patient = Patient(
        ins=INS(
            "279035121518989",
            birth_name="DE VINCI",
            first_given_name="RUTH",
            birth_date=dt.date(1979, 3, 2),
            sex="F",
        )
    )
    docs = [
        m.Document(
            content=b"%PDF-1.7\ncompte rendu",
            filename="cr.pdf",
            title="Compte rendu",
            document_type=Code(code="11488-4", label="Consult note", system="http://loinc.org"),
            patient=patient,
            author="Dr Alice",
            confidentiality="R",
        ),
        m.Document(
            content=b"\x89PNG\r\n\x1a\n" + os.urandom(3000),
            filename="plaie.png",
            replaces="doc-previous",
        ),
    ]
    with client(alice, directory, authority) as ca, client(bob, directory, authority) as cb:
        result = ca.send(
            docs, to="bob@medecin.mssante.fr", subject="Suivi plaie", body="Bonjour,\nvoici le CR."
        )
        assert result.all_sent and result.recipients[0].recipient == bob.idnps
        (msg,) = cb.receive()
        assert msg.message_id == result.message_id
        assert (msg.subject, msg.body) == ("Suivi plaie", "Bonjour,\nvoici le CR.")
        assert msg.sender.idnps == alice.idnps and msg.sender_key == alice.identity.public
        cr, photo = msg.documents
        assert cr.read() == docs[0].content and photo.read() == docs[1].content
        assert (cr.media_type, photo.media_type) == ("application/pdf", "image/png")
        assert (
            cr.title == "Compte rendu"
            and cr.document_type is not None
            and cr.document_type.code == "11488-4"
        )
        assert cr.patient == patient and cr.confidentiality == "R" and cr.author == "Dr Alice"
        assert photo.replaces == "doc-previous" and photo.filename == "plaie.png"
        saved = photo.save(bob.home / "plaie.png")
        assert saved.read_bytes() == docs[1].content
        # still there until acknowledged (at-least-once), then gone
        assert [x.message_id for x in cb.receive()] == [msg.message_id]
        msg.ack()
        assert cb.receive() == []
        # reply threading
        reply = cb.send([], to=alice.ref, body="Merci", in_reply_to=msg.message_id)
        (back,) = ca.receive()
        assert back.in_reply_to == msg.message_id and back.body == "Merci" and back.documents == ()
        assert back.message_id == reply.message_id


def test_nothing_but_routing_data_is_visible(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity
) -> None:
    alice, bob, directory = world
    secret_name = "IRM_genou_DUPONT_Jean.dcm"
    with client(alice, directory, authority) as ca:
        r = ca.send(
            m.Document(content=b"confidential scan", filename=secret_name),
            to=bob.ref,
            subject="Résultats DUPONT",
        )
    files = [p.name for p in (bob.box / "new").iterdir()]
    assert files == [f"{r.message_id}.msec"]
    blob = (bob.box / "new" / files[0]).read_bytes()
    for needle in (b"DUPONT", b"confidential", b"IRM", "Résultats".encode()):
        assert needle not in blob
    db = (alice.home / "medsecure.sqlite").read_bytes()
    assert b"DUPONT" not in db and b"IRM" not in db


def test_recipient_forms_and_multi_recipient(tmp_path: Path, authority: m.Identity) -> None:
    alice = party(tmp_path, "alice", "810000005479")
    bob = party(tmp_path, "bob", "810000000017")
    carol = party(tmp_path, "carol", "810000000025")
    directory = MemoryDirectory([entry(authority, p) for p in (alice, bob, carol)])
    with client(alice, directory, authority) as ca:
        carol_entry = directory.lookup(carol.ref)
        r = ca.send(
            m.Document(content=b"hello"),
            to=["rpps:10000000017", carol_entry, "bob@medecin.mssante.fr"],
        )
        assert [s.recipient for s in r.recipients] == [bob.idnps, carol.idnps]  # deduplicated
    for p in (bob, carol):
        with client(p, directory, authority) as c:
            (msg,) = c.receive()
            assert msg.documents[0].read() == b"hello"


def test_refusals_before_anything_is_stored(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity, tmp_path: Path
) -> None:
    alice, bob, directory = world
    stranger = party(tmp_path, "eve", "810000000035")
    directory.add(entry(authority, stranger, signed=False))
    nowhere = party(tmp_path, "dan", "810000000043")
    directory.add(entry(authority, nowhere, endpoints=()))
    with client(alice, directory, authority) as ca:
        with pytest.raises(m.PractitionerNotFound):
            ca.send(m.Document(content=b"x"), to="rpps:10000000050")
        with pytest.raises(m.UntrustedKey):
            ca.send(m.Document(content=b"x"), to=stranger.ref)
        with pytest.raises(m.TransportError, match="no configured transport"):
            ca.send(m.Document(content=b"x"), to=nowhere.ref)
        with pytest.raises(ValueError, match="nothing to send"):
            ca.send([], to=bob.ref)
        with pytest.raises(ValueError, match="receipt"):
            ca.send(m.Document(content=b"x"), to=bob.ref, receipts=("opened",))
        with pytest.raises(TypeError):
            ca.send("not a document", to=bob.ref)  # type: ignore[arg-type]
        assert ca.outbox() == []
        assert list((alice.home / "outbox").iterdir()) == []


def test_client_needs_a_trust_policy(world: tuple[Party, Party, MemoryDirectory]) -> None:
    alice, _, directory = world
    with pytest.raises(ValueError, match="no trust policy"):
        m.Client(alice.identity, directory, FileTransport(alice.box), alice.home)
    c = m.Client(
        alice.identity, directory, FileTransport(alice.box), alice.home, trust=UnsafeAcceptAll()
    )
    with pytest.raises(ValueError, match="who it sends as"):
        c.send(m.Document(content=b"x"), to="rpps:10000000017")
    c.close()


def test_transient_failures_are_retried_with_backoff(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity
) -> None:
    alice, bob, directory = world
    now = [1_000_000.0]
    failures = [3]

    def handler(d: Delivery) -> None:
        if failures[0] > 0:
            failures[0] -= 1
            raise m.TransportUnavailable("relay down")

    mock = MockTransport(handler)
    with m.Client(
        alice.identity,
        directory,
        mock,
        alice.home,
        trust=AuthorityPolicy([authority.public]),
        me=alice.idnps,
        clock=lambda: now[0],
        retry_base=10,
        retry_cap=100,
    ) as ca:
        r = ca.send(m.Document(content=b"x"), to=bob.ref)
        (st,) = r.recipients
        assert st.status == "queued" and st.attempts == 1 and "relay down" in (st.error or "")
        assert ca.flush() == []  # not due yet
        now[0] += 10
        (st,) = ca.flush()
        assert st.attempts == 2 and st.status == "queued"
        (st,) = ca.flush(force=True)
        assert st.attempts == 3
        now[0] += 1000
        (st,) = ca.flush()
        assert st.status == "sent" and st.attempts == 4 and st.error is None
        assert len(mock.deliveries) == 1 and mock.deliveries[0].message_id == r.message_id
        assert ca.status(r.message_id)[0].status == "sent"
        with pytest.raises(m.UnknownMessage):
            ca.status("01ZZZZZZZZZZZZZZZZZZZZZZZZ")


def test_permanent_failures_fall_through_then_dead_letter(
    tmp_path: Path, authority: m.Identity
) -> None:
    alice = party(tmp_path, "alice", "810000005479")
    bob = party(tmp_path, "bob", "810000000017")
    eps = (
        Endpoint(kind="relay", url="https://relay.invalid/", mailbox="bob"),
        Endpoint(kind="drop", path=str(bob.box)),
    )
    directory = MemoryDirectory([entry(authority, alice), entry(authority, bob, endpoints=eps)])
    seen: list[str] = []

    def handler(d: Delivery) -> None:
        seen.append(d.endpoint.kind)
        if d.endpoint.kind == "relay":
            raise m.DeliveryRejected("unknown mailbox")

    with m.Client(
        alice.identity,
        directory,
        MockTransport(handler),
        alice.home,
        trust=AuthorityPolicy([authority.public]),
        me=alice.idnps,
    ) as ca:
        (st,) = ca.send(m.Document(content=b"x"), to=bob.ref).recipients
        assert seen == ["relay", "drop"] and st.status == "sent" and st.endpoint == "drop"

    def refuse(d: Delivery) -> None:
        raise m.DeliveryRejected("mailbox closed")

    with m.Client(
        alice.identity,
        directory,
        MockTransport(refuse),
        tmp_path / "h2",
        trust=AuthorityPolicy([authority.public]),
        me=alice.idnps,
    ) as ca:
        (st,) = ca.send(m.Document(content=b"x"), to=bob.ref).recipients
        assert st.status == "failed" and "mailbox closed" in (st.error or "")
        assert ca.flush(force=True) == []

    def down(d: Delivery) -> None:
        raise m.TransportUnavailable("down")

    with m.Client(
        alice.identity,
        directory,
        MockTransport(down),
        tmp_path / "h3",
        trust=AuthorityPolicy([authority.public]),
        me=alice.idnps,
        max_attempts=3,
    ) as ca:
        ca.send(m.Document(content=b"x"), to=bob.ref)
        ca.flush(force=True)
        (st,) = ca.flush(force=True)
        assert st.status == "failed" and "gave up after 3 attempts" in (st.error or "")


def test_transport_selection_order(tmp_path: Path, authority: m.Identity) -> None:
    alice = party(tmp_path, "alice", "810000005479")
    bob = party(tmp_path, "bob", "810000000017")
    eps = (
        Endpoint(kind="drop", path=str(bob.box)),
        Endpoint(kind="mail", address="bob@medecin.mssante.fr"),
        Endpoint(kind="relay", url="https://r/", mailbox="b", priority=5),
    )
    directory = MemoryDirectory([entry(authority, alice), entry(authority, bob, endpoints=eps)])
    mock = MockTransport()
    with m.Client(
        alice.identity,
        directory,
        mock,
        alice.home,
        trust=AuthorityPolicy([authority.public]),
        me=alice.idnps,
    ) as ca:
        ca.send(m.Document(content=b"x"), to=bob.ref)
    # priority 0 first; between equal priorities, one transport serving both keeps the
    # directory's order (drop, then mail)
    assert mock.deliveries[0].endpoint.kind == "drop"

    class MailOnly(MockTransport):
        kinds = frozenset({"mail"})

    mail = MailOnly()
    with m.Client(
        alice.identity,
        directory,
        [mail, MockTransport()],  # transports are tried in the order given
        tmp_path / "h3",
        trust=AuthorityPolicy([authority.public]),
        me=alice.idnps,
    ) as ca:
        (st,) = ca.send(m.Document(content=b"x"), to=bob.ref).recipients
    assert st.endpoint == "mail" and len(mail.deliveries) == 1
    with m.Client(
        alice.identity,
        directory,
        FileTransport(alice.box),
        tmp_path / "h2",
        trust=AuthorityPolicy([authority.public]),
        me=alice.idnps,
    ) as ca:
        (st,) = ca.send(m.Document(content=b"x"), to=bob.ref).recipients
        assert st.endpoint == "drop"  # the only kind this transport can reach


def test_duplicates_are_received_once(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity
) -> None:
    alice, bob, directory = world
    with client(alice, directory, authority) as ca, client(bob, directory, authority) as cb:
        r = ca.send(m.Document(content=b"x"), to=bob.ref)
        blob = (bob.box / "new" / f"{r.message_id}.msec").read_bytes()
        assert len(cb.receive()) == 1
        # the same envelope delivered again (a retried delivery), and once more with another name
        (bob.box / "new" / f"{r.message_id}.msec").write_bytes(blob)
        (bob.box / "new" / "01ZZZZZZZZZZZZZZZZZZZZZZZZ.msec").write_bytes(blob)
        msgs = cb.receive()
        assert [x.message_id for x in msgs] == [r.message_id]
        assert list((bob.box / "new").iterdir()) == []
        msgs[0].ack()
        (bob.box / "new" / f"{r.message_id}.msec").write_bytes(blob)
        assert cb.receive() == []


def test_quarantine(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity, tmp_path: Path
) -> None:
    alice, bob, directory = world
    with client(alice, directory, authority) as ca, client(bob, directory, authority) as cb:
        r = ca.send(m.Document(content=b"x" * 1000), to=bob.ref)
        path = bob.box / "new" / f"{r.message_id}.msec"
        data = bytearray(path.read_bytes())
        data[-100] ^= 1
        path.write_bytes(bytes(data))
        (bob.box / "new" / "01AAAAAAAAAAAAAAAAAAAAAAAA.msec").write_bytes(
            b"garbage, not an envelope"
        )
        # an envelope from someone the directory does not know
        mallory = m.Identity.generate()
        (bob.box / "new" / "01BBBBBBBBBBBBBBBBBBBBBBBB.msec").write_bytes(
            m.seal(b"MEDSECM\x01" + b"\x00" * 4, sender=mallory, recipients=[bob.identity.public])
        )
        # a sender claiming to be Alice but signing with another key
        impostor = m.Client(
            mallory,
            directory,
            FileTransport(alice.box),
            tmp_path / "home-impostor",
            trust=UnsafeAcceptAll(),
            me=alice.idnps,
        )
        impostor.send(m.Document(content=b"fake"), to=bob.ref)
        impostor.close()
        assert cb.receive() == []
        reasons = sorted(q.reason for q in cb.quarantine())
        assert len(reasons) == 4
        assert any("envelope refused: envelope authentication failed" in x for x in reasons)
        assert any("envelope refused: not a medsecure envelope" in x for x in reasons)
        assert any("message refused" in x for x in reasons)
        assert any("sender key not trusted for 810000005479" in x for x in reasons)
        for q in cb.quarantine():
            assert q.path.exists() and q.path.parent.name == "quarantine"
        assert list((bob.box / "new").iterdir()) == []


def test_directory_outage_defers_verification(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity
) -> None:
    alice, bob, directory = world

    class Down(MemoryDirectory):
        up = True

        def lookup(self, ref):  # type: ignore[no-untyped-def]
            if not self.up:
                raise m.DirectoryUnavailable("down")
            return super().lookup(ref)

    flaky = Down(directory.all())
    now = [time.time()]
    with (
        client(alice, directory, authority) as ca,
        client(bob, flaky, authority, clock=lambda: now[0], max_verify_attempts=3) as cb,
    ):
        ca.send(m.Document(content=b"x"), to=bob.ref)
        flaky.up = False
        assert cb.receive() == [] and cb.quarantine() == []
        assert cb.receive() == []  # not retried before its backoff (30 s) has passed
        now[0] += 31
        flaky.up = True
        assert len(cb.receive()) == 1
        # an outage that lasts is retried a bounded number of times, then quarantined
        ca.send(m.Document(content=b"y"), to=bob.ref)
        flaky.up = False
        for _ in range(3):
            assert len(cb.receive()) == 1  # the first message is still there; no raise
            now[0] += 3600
        (q,) = cb.quarantine()
        assert "directory is unavailable" in q.reason and "3 attempts" in q.reason
        # once the cause is gone, the envelope can be released and is received
        flaky.up = True
        assert cb.release(q.id) and not cb.release(q.id)
        assert len(cb.receive()) == 2 and cb.quarantine() == []


def test_large_document_streams_from_disk(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity, tmp_path: Path
) -> None:
    alice, bob, directory = world
    big = tmp_path / "scanner.dcm"
    with big.open("wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        for _ in range(12):
            fh.write(os.urandom(1 << 20))
    doc = m.Document.from_path(big, title="IRM")
    assert doc.media_type == "application/dicom" and doc.filename == "scanner.dcm"
    with client(alice, directory, authority) as ca, client(bob, directory, authority) as cb:
        ca.send(doc, to=bob.ref)
        (msg,) = cb.receive()
        out = msg.documents[0].save(tmp_path / "received.dcm")
        assert out.read_bytes() == big.read_bytes()


def test_storage_errors_are_clear(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity
) -> None:
    alice, bob, directory = world
    ca = client(alice, directory, authority, busy_timeout=0.2)
    locker = sqlite3.connect(alice.home / "medsecure.sqlite", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(m.StorageError, match="locked"):
            ca.send(m.Document(content=b"x"), to=bob.ref)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert ca.send(m.Document(content=b"x"), to=bob.ref).all_sent
    assert len(ca.outbox()) == 1
    ca.close()


def test_mock_transport_for_users_tests(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity
) -> None:
    alice, _bob, directory = world
    loop = MockTransport.loopback()
    pol = AuthorityPolicy([authority.public])
    with m.Client(alice.identity, directory, loop, alice.home, trust=pol, me=alice.idnps) as ca:
        ca.send(m.Document(content=b"to myself"), to=alice.ref)
        (msg,) = ca.receive()
        assert msg.documents[0].read() == b"to myself"


def test_two_processes_receiving_on_one_home(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity
) -> None:
    """Two clients on the same home and drop folder, receiving at once: each message once."""
    import threading

    alice, bob, directory = world
    with client(alice, directory, authority) as ca:
        sent = {
            ca.send(m.Document(content=f"doc {i}".encode()), to=bob.ref).message_id
            for i in range(40)
        }
    readers = [client(bob, directory, authority) for _ in range(2)]
    seen: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(c: m.Client) -> None:
        try:
            for _ in range(20):
                for msg in c.receive(limit=5):
                    with lock:
                        if msg.message_id not in seen:
                            seen.append(msg.message_id)
                    msg.ack()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c,)) for c in readers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in readers:
        c.close()
    assert not errors, errors
    assert set(seen) == sent
    with client(bob, directory, authority) as cb:
        rows = cb.store.query(
            "SELECT message_id FROM inbox WHERE message_id IS NOT NULL AND status IN ('received', 'acked')"
        )
    ids = [r["message_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 40


def test_flush_reports_progress(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity
) -> None:
    alice, bob, directory = world
    down = [True]

    def handler(d: Delivery) -> None:
        if down[0]:
            raise m.TransportUnavailable("down")

    with m.Client(
        alice.identity,
        directory,
        MockTransport(handler),
        alice.home,
        trust=AuthorityPolicy([authority.public]),
        me=alice.idnps,
    ) as ca:
        for _ in range(3):
            ca.send(m.Document(content=b"x"), to=bob.ref)
        down[0] = False
        calls: list[tuple[int, int]] = []
        statuses = ca.flush(force=True, progress=lambda done, total: calls.append((done, total)))
        assert calls == [(1, 3), (2, 3), (3, 3)]
        assert [s.status for s in statuses] == ["sent"] * 3


def test_accepted_message_is_not_reported_as_failed(
    world: tuple[Party, Party, MemoryDirectory],
    authority: m.Identity,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once in the outbox, a failing audit log or bookkeeping must not make send() raise (the
    caller would send again): the message stays queued and flush() completes it."""
    alice, bob, directory = world
    with client(alice, directory, authority) as ca:
        real = ca.audit.append

        def broken(action: str, **kwargs: object) -> int:
            if action in ("send", "deliver"):  # after the outbox commit
                raise m.StorageError("audit disk full")
            return real(action, **kwargs)

        monkeypatch.setattr(ca.audit, "append", broken)
        r = ca.send(m.Document(content=b"x"), to=bob.ref)
        assert [s.status for s in r.recipients] == ["queued"] and "audit disk full" in (
            r.recipients[0].error or ""
        )
        monkeypatch.undo()
        assert [e.message_id for e in ca.outbox()] == [r.message_id]
        (st,) = ca.flush(force=True)
        assert st.status == "sent"
    with client(bob, directory, authority) as cb:
        assert [x.message_id for x in cb.receive()] == [r.message_id]


def test_malformed_sender_identifier_is_quarantined(
    world: tuple[Party, Party, MemoryDirectory], authority: m.Identity
) -> None:
    """A signed message whose manifest names a malformed sender must not break receive()."""
    import datetime as dt
    import struct

    from medsecure.envelope._message import Manifest, new_message_id

    alice, bob, directory = world
    now = dt.datetime.now(dt.UTC)
    manifest = Manifest(
        message_id=new_message_id(now),
        created=now,
        sender_idnps="not-an-idnps",
        recipients=(),
        subject=None,
        body="x",
        in_reply_to=None,
        documents=(),
    )
    raw = manifest.encode()
    env = m.seal(
        b"MEDSECM\x01" + struct.pack(">I", len(raw)) + raw,
        sender=alice.identity,
        recipients=[bob.identity.public],
    )
    (bob.box / "new" / f"{manifest.message_id}.msec").write_bytes(env)
    with client(bob, directory, authority) as cb:
        assert cb.receive() == []
        (q,) = cb.quarantine()
        assert "malformed" in q.reason
        assert cb.receive() == []  # and it stays handled


# -- B8: an imported entry's endpoints are only as trustworthy as its key ----------------------


def _tofu_client(p: Party, directory: m.directory.Directory) -> m.Client:
    from medsecure.trust import PinStore, UnsafeTrustOnFirstUse

    return m.Client(
        p.identity,
        directory,
        FileTransport(p.box),
        p.home,
        trust=UnsafeTrustOnFirstUse(PinStore(p.box.parent / f"pins-{p.name}.sqlite")),
        me=p.idnps,
    )


def _mallory_file(tmp_path: Path, bob: Party, mallory: Party) -> Path:
    """M's directory file: an entry for *Bob's* identifier with M's key and M's drop folder."""
    from medsecure.directory import FileDirectory
    from medsecure.models import KeyEntry, Practitioner

    path = tmp_path / "from-mallory.json"
    forged = Practitioner(
        idnps=bob.idnps,
        keys=(KeyEntry(public=mallory.identity.public),),
        endpoints=(Endpoint(kind="drop", path=str(mallory.box)),),
    )
    with FileDirectory(path) as d:
        d.add(forged)
    return path


def _second_send(
    alice: Party, bob: Party, mallory: Party, directory: m.directory.Directory, caplog: object
) -> None:
    import logging

    assert isinstance(caplog, pytest.LogCaptureFixture)
    with _tofu_client(alice, directory) as ca, caplog.at_level(logging.WARNING):
        result = ca.send(m.Document(content=b"second", filename="b.txt"), to=bob.ref)
        assert result.all_sent
    assert not list(mallory.box.rglob("*.msec")), "delivered into the stranger's folder"
    with _tofu_client(bob, directory) as cb:
        assert [d.read() for msg in cb.receive() for d in msg.documents] == [b"second"]
    refused = [r.getMessage() for r in caplog.records if mallory.identity.fingerprint in r.message]
    assert refused and all("changed to" not in text for text in refused), refused
    assert any("refused" in text and "pinned" in text for text in refused), refused


def _bob_pinned(tmp_path: Path) -> tuple[Party, Party, Party, Path]:
    """Alice, Bob and Mallory; Alice's directory file lists Alice and Bob, and Alice has sent
    Bob one message (trust on first use pinned his key), which he received."""
    from medsecure.directory import FileDirectory

    alice = party(tmp_path, "alice", "810000005479")
    bob = party(tmp_path, "bob", "810000000017")
    mallory = party(tmp_path, "mallory", "810000000025")
    path = tmp_path / "directory.json"
    with FileDirectory(path) as d:
        d.add_many(
            [entry(alice.identity, alice, signed=False), entry(alice.identity, bob, signed=False)]
        )
    with _tofu_client(alice, FileDirectory(path)) as ca:
        assert ca.send(m.Document(content=b"first", filename="a.txt"), to=bob.ref).all_sent
    with _tofu_client(bob, FileDirectory(path)) as cb:
        (first,) = cb.receive()
        first.ack()
    return alice, bob, mallory, path


def test_imported_entry_with_a_refused_key_brings_no_endpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sends to B (TOFU pins B's key); M's directory file lists M's key and drop folder for
    B's identifier; A imports it with ``medsecure directory import`` and sends to B again: the
    envelope goes to B's folder, never to M's, and the warning says M's key was refused."""
    from test_cli_core import run

    from medsecure.directory import FileDirectory

    alice, bob, mallory, path = _bob_pinned(tmp_path)
    proc = run(
        [
            "directory",
            "import",
            "--directory",
            str(path),
            str(_mallory_file(tmp_path, bob, mallory)),
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    _second_send(alice, bob, mallory, FileDirectory(path), caplog)


def test_chained_entry_with_a_refused_key_brings_no_endpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same through ``ChainDirectory`` (no CLI): merging is where endpoints meet keys."""
    from medsecure.directory import ChainDirectory, FileDirectory

    alice, bob, mallory, path = _bob_pinned(tmp_path)
    chain = ChainDirectory(
        [FileDirectory(_mallory_file(tmp_path, bob, mallory)), FileDirectory(path)]
    )
    _second_send(alice, bob, mallory, chain, caplog)
