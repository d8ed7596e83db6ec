"""The receive path against hostile senders (issue 8 §2): one bad input never stops receive(),
never blocks it, and never makes another message vanish. Each test here failed before the
inbox was rebuilt around its state table."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
from clientkit import Party, client, entry, party

import medsecure as m
from medsecure.audit import export
from medsecure.directory import MemoryDirectory
from medsecure.envelope import _cbor
from medsecure.envelope._message import MESSAGE_MAGIC, new_message_id
from medsecure.models import Endpoint
from medsecure.transports import FileTransport


@pytest.fixture(scope="module")
def authority() -> m.Identity:
    return m.Identity.generate()


@pytest.fixture
def world(tmp_path: Path, authority: m.Identity) -> tuple[Party, Party, Party, MemoryDirectory]:
    alice = party(tmp_path, "alice", "810000005479")
    bob = party(tmp_path, "bob", "810000000017")
    mallory = party(tmp_path, "mallory", "810000000025")
    directory = MemoryDirectory(
        [entry(authority, alice), entry(authority, bob), entry(authority, mallory)]
    )
    return alice, bob, mallory, directory


def fields(sender: str | None, overrides: dict[int, Any] | None = None) -> dict[int, Any]:
    now = dt.datetime.now(dt.UTC)
    f: dict[int, Any] = {
        1: 1,
        2: new_message_id(now),
        3: int(now.timestamp() * 1000),
        5: ["810000000017"],
        9: [],
        10: [],
        11: "message",
        7: "hello",
    }
    if sender is not None:
        f[4] = sender
    f.update(overrides or {})
    return f


def craft(sender: m.Identity, to: m.PublicIdentity, f: dict[int, Any], data: bytes = b"") -> bytes:
    raw = _cbor.encode(f)
    plain = MESSAGE_MAGIC + struct.pack(">I", len(raw)) + raw + data
    return m.seal(plain, sender=sender, recipients=[to])


def drop(box: Path, blob: bytes, message_id: str | None = None) -> None:
    FileTransport(box).deliver(
        Endpoint(kind="drop", path=str(box)),
        io.BytesIO(blob),
        message_id=message_id or new_message_id(dt.datetime.now(dt.UTC)),
        size=len(blob),
    )


def actions(home: Path) -> list[dict[str, Any]]:
    out = io.StringIO()
    export(home / "audit", out)
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def test_out_of_range_date_from_a_stranger_is_quarantined(
    world: tuple[Party, Party, Party, MemoryDirectory], authority: m.Identity
) -> None:
    """A stranger (no trusted key, not in the directory) sends a manifest whose creation time is
    past year 9999: it used to raise ValueError from every receive()."""
    alice, bob, _, directory = world
    stranger = m.Identity.generate()
    drop(bob.box, craft(stranger, bob.identity.public, fields("810000000035", {3: (1 << 48) - 1})))
    with client(alice, directory, authority) as ca, client(bob, directory, authority) as cb:
        ca.send(m.Document(content=b"genuine"), to=bob.ref)
        for _ in range(2):  # and again: nothing is stuck
            (msg,) = cb.receive()
            assert msg.documents[0].read() == b"genuine"
        (q,) = cb.quarantine()
        assert "creation time" in q.reason


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({6: "x" * 5000}, "subject"),
        ({6: "line\r\nBcc: evil"}, "subject"),
        ({5: ["810000000017"] * 5000}, "recipients"),
        ({9: [{"id": "d", "media_type": "text/plain", "size": 1 << 60}]}, "document size"),
        ({9: [{"id": "d", "media_type": "not a type", "size": 0}]}, "media type"),
        ({9: [{"id": "d", "media_type": "text/plain", "size": 0, "filename": "a\x1bb"}]}, "file"),
        ({9: [{"id": "d", "media_type": "text/plain", "size": 0, "created": "yesterday"}]}, "date"),
        (
            {
                9: [
                    {
                        "id": "d",
                        "media_type": "text/plain",
                        "size": 0,
                        "created": "2020-01-01T00:00",
                    }
                ]
            },
            "date",
        ),
        (
            {9: [{"id": "d", "media_type": "text/plain", "size": 0, "patient": {"ins": 5}}]},
            "patient",
        ),
        (
            {
                9: [
                    {
                        "id": "d",
                        "media_type": "text/plain",
                        "size": 0,
                        "document_type": {"code": ""},
                    }
                ]
            },
            "document type",
        ),
        (
            {9: [{"id": "d", "media_type": "text/plain", "size": 0, "patient": "Jane Doe"}]},
            "patient",
        ),
        ({4: "8100000000170"}, "identifier"),  # not an IDNPS: the inbox checks it
        ({4: "1" + "0" * 200}, "identifier"),
        (
            {11: "receipt", 12: {"status": "delivered", "of": "x", "envelope": "y", "at": 0}},
            "receipt",
        ),
        ({11: "receipt", 12: {"status": "lost", "of": "x"}}, "receipt"),
    ],
)
def test_manifest_is_validated_completely(
    world: tuple[Party, Party, Party, MemoryDirectory],
    authority: m.Identity,
    overrides: dict[int, Any],
    reason: str,
) -> None:
    """Fields out of their bounds are refused before anything uses them (and before the sender
    is even looked up), by a trusted sender as much as by a stranger."""
    alice, bob, mallory, directory = world
    drop(bob.box, craft(mallory.identity, bob.identity.public, fields(mallory.idnps, overrides)))
    with client(alice, directory, authority) as ca, client(bob, directory, authority) as cb:
        ca.send(m.Document(content=b"genuine"), to=bob.ref)
        assert len(cb.receive()) == 1
        (q,) = cb.quarantine()
        assert "malformed message" in q.reason and reason in q.reason


def test_an_unforeseen_exception_quarantines_one_envelope_only(
    world: tuple[Party, Party, Party, MemoryDirectory],
    authority: m.Identity,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice, bob, mallory, directory = world

    class Buggy(MemoryDirectory):
        def lookup(self, ref: str) -> m.models.Practitioner:  # type: ignore[name-defined]
            if ref.endswith(mallory.idnps):
                raise RuntimeError("a bug nobody foresaw, with data: Dupont")
            return super().lookup(ref)

    buggy = Buggy(directory.all())
    with client(mallory, directory, authority) as cm:
        cm.send(m.Document(content=b"from mallory"), to=bob.ref)
    with client(alice, directory, authority) as ca, client(bob, buggy, authority) as cb:
        ca.send(m.Document(content=b"genuine"), to=bob.ref)
        with caplog.at_level(logging.WARNING):
            (msg,) = cb.receive()
        assert msg.sender.idnps == alice.idnps
        (q,) = cb.quarantine()
        assert "unexpected RuntimeError" in q.reason and "Dupont" not in q.reason
        assert "Dupont" not in caplog.text
        assert len(cb.receive()) == 1  # and the next call is fine too


def test_a_transport_failing_in_an_unforeseen_way_loses_nothing_and_blocks_nobody(
    world: tuple[Party, Party, Party, MemoryDirectory],
    authority: m.Identity,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One's own transport whose take() raises what the Transport contract does not allow (a
    raw OSError, a RuntimeError) after writing part of the file: that envelope stays in the
    mailbox, nothing partial is left in the inbox, the others are received, and the next
    receive() takes it."""
    from medsecure.trust import AuthorityPolicy, PinStore

    alice, bob, _mallory, directory = world
    failures = [OSError(5, "Input/output error", "/mnt/Dupont.pdf"), RuntimeError("Dupont")]

    class Flaky(FileTransport):
        def take(self, item: m.transports.Incoming, target: Path) -> None:  # type: ignore[name-defined]
            if failures:
                target.write_bytes(b"partial")
                raise failures.pop(0)
            super().take(item, target)

    with client(alice, directory, authority) as ca:
        for n in range(3):
            ca.send(m.Document(content=b"report %d" % n), to=bob.ref)
    cb = m.Client(
        bob.identity,
        directory,
        Flaky(bob.box),
        bob.home,
        trust=AuthorityPolicy([authority.public], pins=PinStore(bob.box.parent / "pins-b.sqlite")),
        me=bob.idnps,
    )
    with cb, caplog.at_level(logging.WARNING):
        first = cb.receive()
        assert len(first) == 1
        assert not list(bob.home.rglob(".medsecure-in-*"))  # nothing partial kept
        assert len(FileTransport(bob.box).list()) == 2  # the two others wait where they were
        every = cb.receive()  # unread messages: the first one and the two taken now
        assert sorted(x.documents[0].read() for x in every) == [
            b"report 0",
            b"report 1",
            b"report 2",
        ]
    assert "its transport failed (OSError)" in caplog.text
    assert "Dupont" not in caplog.text


def _receive_in_thread(c: m.Client) -> list[m.ReceivedMessage]:
    """Run receive() where a hang cannot block the test suite forever."""
    out: list[Any] = []
    worker = threading.Thread(target=lambda: out.append(c.receive()), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "receive() blocked"
    return out[0]  # type: ignore[no-any-return]


def test_fifo_in_the_drop_folder_does_not_block(
    world: tuple[Party, Party, Party, MemoryDirectory],
    authority: m.Identity,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice, bob, _, directory = world
    fifo = bob.box / "new" / f"{new_message_id(dt.datetime.now(dt.UTC))}.msec"
    os.mkfifo(fifo)
    with client(alice, directory, authority) as ca, client(bob, directory, authority) as cb:
        ca.send(m.Document(content=b"genuine"), to=bob.ref)
        with caplog.at_level(logging.WARNING):
            assert len(_receive_in_thread(cb)) == 1
            assert len(_receive_in_thread(cb)) == 1
        assert fifo.exists()  # left alone
        assert caplog.text.count("left alone") == 1  # reported once
        ignored = [a for a in actions(bob.home) if a.get("action") == "ignored"]
        assert len(ignored) == 1 and "regular file" in ignored[0]["answer"]
    with client(bob, directory, authority) as cb:  # not even by a new process
        assert len(_receive_in_thread(cb)) == 1
    assert len([a for a in actions(bob.home) if a.get("action") == "ignored"]) == 1


def test_symlink_in_the_drop_folder_is_not_followed(
    world: tuple[Party, Party, Party, MemoryDirectory], authority: m.Identity, tmp_path: Path
) -> None:
    """A link planted in the mailbox, to a genuine envelope elsewhere or to a secret file, is
    never read, copied or removed."""
    alice, bob, _, directory = world
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not for the inbox")
    elsewhere = tmp_path / "elsewhere"
    FileTransport.prepare(elsewhere)
    with client(alice, directory, authority) as ca:
        ca.send(m.Document(content=b"genuine"), to=bob.ref)
    (genuine_file,) = (bob.box / "new").iterdir()
    outside = elsewhere / "outside.msec"
    os.link(genuine_file, outside)
    link1 = bob.box / "new" / f"{new_message_id(dt.datetime.now(dt.UTC))}.msec"
    link2 = bob.box / "new" / f"{new_message_id(dt.datetime.now(dt.UTC))}.msec"
    link1.symlink_to(secret)
    link2.symlink_to(outside)
    with client(bob, directory, authority) as cb:
        (msg,) = cb.receive()
        assert msg.documents[0].read() == b"genuine"
        assert link1.is_symlink() and link2.is_symlink() and secret.exists() and outside.exists()
        inbox_files = b"".join(
            p.read_bytes() for p in (bob.home / "inbox").iterdir() if p.is_file()
        )
        assert b"not for the inbox" not in inbox_files
        assert len([a for a in actions(bob.home) if a.get("action") == "ignored"]) == 2
        assert cb.quarantine() == []


def test_reusing_a_message_id_never_makes_another_message_vanish(
    world: tuple[Party, Party, Party, MemoryDirectory], authority: m.Identity
) -> None:
    """Mallory, trusted, sees Alice's message id in the drop folder's file names and sends
    something under the same id: both messages are received, each with its own sender."""
    alice, bob, mallory, directory = world
    with client(alice, directory, authority) as ca:
        r = ca.send(m.Document(content=b"from alice"), to=bob.ref)
    (name,) = os.listdir(bob.box / "new")
    assert name.startswith(r.message_id)
    blob = craft(
        mallory.identity,
        bob.identity.public,
        fields(
            mallory.idnps,
            {2: r.message_id, 9: [{"id": "d", "media_type": "text/plain", "size": 3}]},
        ),
        b"bad",
    )
    drop(bob.box, blob, message_id=r.message_id)  # the same file name, if it could
    with client(bob, directory, authority) as cb:
        msgs = cb.receive()
        assert sorted((x.sender.idnps, x.documents[0].read()) for x in msgs) == sorted(
            [(alice.idnps, b"from alice"), (mallory.idnps, b"bad")]
        )
        assert {x.message_id for x in msgs} == {r.message_id}
        for x in msgs:
            x.ack()
        # the same envelope again is a duplicate: dropped, and audited
        drop(bob.box, blob, message_id=r.message_id)
        assert cb.receive() == []
        dups = [a for a in actions(bob.home) if a.get("action") == "duplicate"]
        assert len(dups) == 1


def test_receipts_reusing_ids_or_arriving_twice_do_not_stall(
    world: tuple[Party, Party, Party, MemoryDirectory], authority: m.Identity
) -> None:
    """A receipt whose own message id is already in the inbox (another sender's message), and
    two copies of one genuine receipt waiting at once, used to make receive() raise a
    StorageError on every call."""
    alice, bob, mallory, directory = world
    with client(mallory, directory, authority) as cm:
        taken = cm.send(m.Document(content=b"m"), to=alice.ref).message_id
    with client(alice, directory, authority) as ca, client(bob, directory, authority) as cb:
        assert len(ca.receive()) == 1  # Mallory's message, id `taken`, is in Alice's inbox
        r = ca.send(m.Document(content=b"x"), to=bob.ref, receipts=("delivered", "read"))
        (msg,) = cb.receive()
        receipt_file = next((alice.box / "new").iterdir())
        blob = receipt_file.read_bytes()
        (alice.box / "new" / f"{taken}.msec").write_bytes(blob)  # a second copy, another name
        # and a receipt forged by Bob with Mallory's message id as its own id
        eid = ca.store.query(
            "SELECT envelope_id FROM outbox WHERE message_id = ?", (r.message_id,)
        )[0][0]
        forged = craft(
            bob.identity,
            alice.identity.public,
            fields(
                bob.idnps,
                {
                    2: taken,
                    11: "receipt",
                    12: {"status": "read", "of": r.message_id, "envelope": eid, "at": 0},
                },
            ),
        )
        drop(alice.box, forged, message_id=taken)
        for _ in range(2):
            assert len(ca.receive()) == 1
        assert [s.status for s in ca.status(r.message_id)] == ["read"]
        assert [e.status for e in ca.events() if e.message_id == r.message_id].count(
            "delivered"
        ) == 1
        assert ca.quarantine() == []
        assert any(a.get("action") == "duplicate" for a in actions(alice.home))
        msg.ack()
