"""One suite, two drivers: every test here runs against ``Client`` and ``AsyncClient`` (and, for
the async client, with an asynchronous transport too), so the two cannot drift apart."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clientkit import Party, entry, party

import medsecure as m
from medsecure.directory import MemoryDirectory
from medsecure.models import Endpoint
from medsecure.transports import AsyncMockTransport, Delivery, FileTransport, MockTransport
from medsecure.trust import AuthorityPolicy, PinStore


class Driver:
    """The methods of a client, called synchronously whatever the client is."""

    def __init__(self, client: m.Client | m.AsyncClient, loop: asyncio.AbstractEventLoop | None):
        self.client = client
        self.loop = loop

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.client, name)(*args, **kwargs)
        if self.loop is not None:
            return self.loop.run_until_complete(result)
        return result

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return lambda *a, **k: self._call(name, *a, **k)

    def ack(self, message: m.ReceivedMessage) -> None:
        if self.loop is not None:
            self.loop.run_until_complete(self.client.ack(message))  # type: ignore[union-attr]
        else:
            message.ack()

    def mark_read(self, message: m.ReceivedMessage) -> None:
        if self.loop is not None:
            self.loop.run_until_complete(self.client.mark_read(message))  # type: ignore[union-attr]
        else:
            message.mark_read()

    def close(self) -> None:
        if self.loop is not None:
            self.loop.run_until_complete(self.client.aclose())  # type: ignore[union-attr]
        else:
            self.client.close()  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def authority() -> m.Identity:
    return m.Identity.generate()


@pytest.fixture(params=["sync", "async"])
def make(request: pytest.FixtureRequest, authority: m.Identity) -> Iterator[Callable[..., Driver]]:
    loop = asyncio.new_event_loop() if request.param == "async" else None
    made: list[Driver] = []

    def build(p: Party, directory: MemoryDirectory, transport: Any = None, **kw: Any) -> Driver:
        args = (
            p.identity,
            directory,
            transport if transport is not None else FileTransport(p.box),
            p.home,
        )
        kwargs = {
            "trust": AuthorityPolicy(
                [authority.public], pins=PinStore(p.box.parent / f"pins-{p.name}.sqlite")
            ),
            "me": p.idnps,
            **kw,
        }
        client = m.AsyncClient(*args, **kwargs) if loop is not None else m.Client(*args, **kwargs)
        driver = Driver(client, loop)
        made.append(driver)
        return driver

    build.kind = request.param  # type: ignore[attr-defined]
    yield build
    for d in made:
        d.close()
    if loop is not None:
        loop.close()


@pytest.fixture
def world(tmp_path: Path, authority: m.Identity) -> tuple[Party, Party, MemoryDirectory]:
    alice = party(tmp_path, "alice", "810000005479")
    bob = party(tmp_path, "bob", "810000000017")
    return alice, bob, MemoryDirectory([entry(authority, alice), entry(authority, bob)])


def test_send_receive_ack(make: Callable[..., Driver], world: Any) -> None:
    alice, bob, directory = world
    a, b = make(alice, directory), make(bob, directory)
    r = a.send(m.Document(content=b"%PDF-1.7 report", filename="cr.pdf"), to=bob.ref, subject="CR")
    assert [s.status for s in r.recipients] == ["sent"]
    (msg,) = b.receive()
    assert msg.subject == "CR" and msg.documents[0].read() == b"%PDF-1.7 report"
    assert msg.sender.idnps == alice.idnps
    b.ack(msg)
    assert b.receive() == []


def test_receipts_and_statuses(make: Callable[..., Driver], world: Any) -> None:
    alice, bob, directory = world
    a, b = make(alice, directory), make(bob, directory)
    r = a.send(m.Document(content=b"x"), to=bob.ref, receipts=("delivered", "read"))
    (msg,) = b.receive()
    a.receive()
    assert [s.status for s in a.status(r.message_id)] == ["delivered"]
    b.mark_read(msg)
    a.receive()
    assert [s.status for s in a.status(r.message_id)] == ["read"]
    assert [e.status for e in a.events()] == ["sent", "delivered", "read"]
    assert [e.message_id for e in a.outbox()] == [r.message_id]
    with pytest.raises(m.UnknownMessage):
        a.status("01ZZZZZZZZZZZZZZZZZZZZZZZZ")


def test_quarantine_and_release(make: Callable[..., Driver], world: Any, tmp_path: Path) -> None:
    alice, bob, directory = world
    a = make(alice, directory)
    a.send(m.Document(content=b"x"), to=bob.ref)
    stranger = MemoryDirectory([e for e in directory.all() if e.idnps != alice.idnps])
    b = make(bob, stranger)
    assert b.receive() == []
    (q,) = b.quarantine()
    assert "unknown to the directory" in q.reason
    b.close()
    b = make(bob, directory)  # the sender's entry is known now
    assert b.release(q.id)
    assert len(b.receive()) == 1 and b.quarantine() == []


def test_transient_failure_then_flush(make: Callable[..., Driver], world: Any) -> None:
    alice, bob, directory = world
    down = [True]

    def handler(d: Delivery) -> None:
        if down[0]:
            raise m.TransportUnavailable("relay down")

    now = [dt.datetime.now(dt.UTC).timestamp()]
    a = make(alice, directory, MockTransport(handler), clock=lambda: now[0])
    r = a.send(m.Document(content=b"x"), to=bob.ref)
    assert [s.status for s in r.recipients] == ["queued"]
    down[0] = False
    now[0] += 10_000
    assert [s.status for s in a.flush()] == ["sent"]


def test_async_transport_on_the_event_loop(
    make: Callable[..., Driver], world: Any, authority: m.Identity
) -> None:
    """An asynchronous transport's coroutines run on the caller's loop (the async client), or
    are refused by the sync client (it takes synchronous transports only)."""
    alice, bob, directory = world
    seen: list[str] = []
    box = AsyncMockTransport()

    async def handler(d: Delivery) -> None:
        seen.append(threading.current_thread().name)
        box.push(d.envelope, message_id=d.message_id)

    box.handler = handler
    bob_entry = entry(
        authority, bob, endpoints=(Endpoint(kind="relay", url="https://r", mailbox="b"),)
    )
    directory = MemoryDirectory([entry(authority, alice), bob_entry])
    if make.kind == "sync":  # type: ignore[attr-defined]
        with pytest.raises(TypeError):
            make(alice, directory, box)
        return
    a, b = make(alice, directory, box), make(bob, directory, box)
    a.send(m.Document(content=b"over the loop"), to=bob.ref)
    assert seen == [threading.main_thread().name]  # not the worker thread
    (msg,) = b.receive()
    assert msg.documents[0].read() == b"over the loop"


def test_the_event_loop_stays_free_while_sealing(
    world: Any, authority: m.Identity, tmp_path: Path
) -> None:
    """While the async client seals and stores a large document, the loop keeps running other
    tasks (the figure for the lag is in bench/bench_async.py; no timing asserted here)."""
    alice, bob, directory = world
    big = tmp_path / "big.bin"
    with big.open("wb") as fh:
        fh.truncate(64 << 20)
    ticks = 0

    async def ticker(stop: asyncio.Event) -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    async def main() -> None:
        async with m.AsyncClient(
            alice.identity,
            directory,
            FileTransport(alice.box),
            alice.home,
            trust=AuthorityPolicy([authority.public]),
            me=alice.idnps,
        ) as a:
            stop = asyncio.Event()
            task = asyncio.create_task(ticker(stop))
            r = await a.send(m.Document.from_path(big), to=bob.ref)
            stop.set()
            await task
            assert [s.status for s in r.recipients] == ["sent"]

    asyncio.run(main())
    assert ticks > 1  # the ticker ran while the send was in progress


def test_close_applies_audit_retention(
    world: Any, authority: m.Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medsecure.audit import AuditLog

    alice, _, directory = world
    calls: list[str] = []
    real = AuditLog.purge

    def spy(self: AuditLog, **kw: Any) -> list[str]:
        calls.append("purge")
        return real(self, **kw)

    monkeypatch.setattr(AuditLog, "purge", spy)
    client = m.Client(
        alice.identity,
        directory,
        FileTransport(alice.box),
        alice.home,
        trust=AuthorityPolicy([authority.public]),
        me=alice.idnps,
    )
    client.close()
    client.close()  # idempotent
    assert calls == ["purge"]


def test_through_a_real_relay_with_receipts_and_expiry(
    make: Callable[..., Driver], tmp_path: Path, authority: m.Identity
) -> None:
    """Both clients over a real relay (uvicorn in a subprocess): the sync client with
    RelayTransport, the async one with AsyncRelayTransport. A signed receipt comes back; an
    envelope the relay expires uncollected ends ``expired`` in the sender's status."""
    from relaykit import RelayServer, cli

    from medsecure.transports import AsyncRelayTransport, RelayTransport

    alice = party(tmp_path, "alice", "810000005479")
    bob = party(tmp_path, "bob", "810000000017")
    srv = RelayServer(
        tmp_path / "relay.log", data=tmp_path / "relay", args=("--retention-days", "3")
    )
    with srv:

        def box(p: Party) -> tuple[Endpoint, ...]:
            return (Endpoint(kind="relay", url=srv.url, mailbox=p.identity.fingerprint),)

        directory = MemoryDirectory(
            [
                entry(authority, alice, endpoints=box(alice)),
                entry(authority, bob, endpoints=box(bob)),
            ]
        )
        kind = AsyncRelayTransport if make.kind == "async" else RelayTransport  # type: ignore[attr-defined]
        a = make(alice, directory, kind(alice.identity, srv.url))
        b = make(bob, directory, kind(bob.identity, srv.url))
        r = a.send(m.Document(content=b"over the relay"), to=bob.ref, receipts=("delivered",))
        assert [s.status for s in r.recipients] == ["sent"]
        (msg,) = b.receive()
        assert msg.documents[0].read() == b"over the relay"
        b.ack(msg)
        a.receive()
        assert [s.status for s in a.status(r.message_id)] == ["delivered"]
        # a second message is never collected: the relay expires it, the sender learns it
        late = a.send(m.Document(content=b"never collected"), to=bob.ref).message_id
        srv.stop()
        done = cli(
            "relay",
            "sweep",
            "--data",
            str(tmp_path / "relay"),
            "--retention-days",
            "3",
            "--as-of",
            str(int(dt.datetime.now(dt.UTC).timestamp()) + 4 * 86400),
        )
        assert done.returncode == 0, done.stderr
        srv.start()
        a.flush()
        (st,) = a.status(late)
        assert st.status == "expired" and "not collected" in (st.error or "")
        assert "expired" in [e.status for e in a.events() if e.message_id == late]


def test_an_unreachable_mailbox_does_not_keep_the_others_unread(
    make: Callable[..., Driver], world: Any
) -> None:
    alice, bob, directory = world

    class Down(MockTransport):
        def list(self) -> list[Any]:
            raise m.TransportUnavailable("the IMAP server is down")

    a = make(alice, directory)
    a.send(m.Document(content=b"x"), to=bob.ref)
    b = make(bob, directory, [Down(), FileTransport(bob.box)])
    assert len(b.receive()) == 1
