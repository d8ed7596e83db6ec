"""Attacks on the relay (docs/security.md §1, §3) by strangers with keys of their own (a key
costs nothing: anyone can publish one) and by another relay. The relay runs for real on
loopback (``medsecure relay serve`` in a subprocess, tests/relaykit.py)."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import re
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pgkit import fresh_database, wait
from relaykit import RelayServer, message_id, signed_upload

import medsecure as m
from medsecure.models import Endpoint
from medsecure.relay import KeyBundle, sign_bundle, sign_request
from medsecure.relay._digest import EMPTY_DIGEST
from medsecure.transports import RelayTransport

FAST = ("--rate", "1000", "--burst", "100000")


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayServer]:
    root = tmp_path_factory.mktemp("relay-attack")
    with RelayServer(root / "server.log", data=root / "data", args=FAST) as srv:
        yield srv


def _publish(identity: m.Identity, base: str, expect: int = 204, **kw: object) -> None:
    raw = sign_bundle(identity, **kw).raw  # type: ignore[arg-type]
    url = f"{base}/v1/keys/{identity.fingerprint}"
    headers = sign_request(identity, "PUT", url, hashlib.sha256(raw).digest())
    assert httpx.put(url, headers=headers, content=raw).status_code == expect


def test_strangers_claiming_an_identifier_do_not_hide_its_holder(relay: RelayServer) -> None:
    claim = {"identifiers": ("rpps:10001234567",)}
    # a claim dated ahead of the relay's clock would outrank every other: refused
    future = dt.datetime(3000, 1, 1, tzinfo=dt.UTC)
    _publish(m.Identity.generate(), relay.url, 400, published=future, **claim)
    # strangers claim the identifier before its holder publishes, and after: more than one
    # page of the answer (100) either way round
    bob = m.Identity.generate()
    for _ in range(60):
        _publish(m.Identity.generate(), relay.url, **claim)
    _publish(bob, relay.url, **claim)
    for _ in range(60):
        _publish(m.Identity.generate(), relay.url, **claim)
    with RelayTransport(m.Identity.generate(), relay.url) as anyone:
        found = anyone.find_keys(identifier="rpps:10001234567")
    assert bob.public in [b.public for b in found]
    assert len(found) == 121


def test_a_request_signed_for_another_relay_is_refused(relay: RelayServer) -> None:
    bob = m.Identity.generate()
    _publish(bob, relay.url)
    path = f"/v1/mailboxes/{bob.fingerprint}/messages"
    signed_for = "http://relay-a.example" + path  # what relay A saw and replays here
    headers = sign_request(bob, "GET", signed_for, EMPTY_DIGEST)
    r = httpx.get(relay.url + path, headers={**headers, "Host": "relay-a.example"})
    assert r.status_code in (400, 401, 421)


def _slow_upload(base: str, identity: m.Identity, mailbox: str) -> socket.socket:
    """Start an upload announcing 1 MiB, send its first byte, and stall."""
    size = 1 << 20
    url = f"{base}/v1/mailboxes/{mailbox}/messages/{message_id()}"
    headers = sign_request(identity, "PUT", url, hashlib.sha256(b"x" * size).digest())
    parts = urllib.parse.urlsplit(url)
    lines = [f"PUT {parts.path} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {size}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    s = socket.create_connection((parts.hostname, parts.port))
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + b"x")
    return s


def _receiving(base: str) -> int:
    """Large uploads whose body the relay is receiving (its own gauge)."""
    found = re.search(
        r"^medsecure_relay_uploads_receiving (\S+)$", httpx.get(base + "/metrics").text, re.M
    )
    return int(float(found.group(1))) if found else 0


def _everyone_else_is_served_beside_stalled_uploads(srv: RelayServer, stalls: int = 24) -> None:
    """``stalls`` uploads (as many as a PostgreSQL instance has pooled connections) stall after
    their first byte; meanwhile another sender uploads a small and a large envelope, and their
    recipient lists, downloads and acknowledges them."""
    stranger, alice, bob = m.Identity.generate(), m.Identity.generate(), m.Identity.generate()
    _publish(stranger, srv.url)
    _publish(bob, srv.url)
    stalled = [_slow_upload(srv.url, stranger, bob.fingerprint) for _ in range(stalls)]
    try:
        wait(lambda: _receiving(srv.url) >= stalls, f"the relay receives {stalls} stalled uploads")
        box = Endpoint(kind="relay", url=srv.url, mailbox=bob.fingerprint)
        sent = {message_id(): b"small", message_id(): os.urandom(3 << 20)}
        with (
            RelayTransport(alice, srv.url, retries=0, timeout=120) as a,
            RelayTransport(bob, srv.url, retries=0, timeout=120) as b,
        ):
            assert b.list() == []
            for mid, data in sent.items():
                a.deliver(box, io.BytesIO(data), message_id=mid, size=len(data))
            got = {}
            for item in b.list():
                got[item.message_id] = b.fetch(item).read()
                b.acknowledge(item)
            assert got == sent
        assert _receiving(srv.url) == stalls  # still stalled, still waited for
    finally:
        for s in stalled:
            s.close()


def test_stalled_uploads_do_not_starve_everyone_else_on_postgresql(pg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # large bodies in large objects: each written in short statements, none holding a
    # connection while it waits for its sender
    with RelayServer(tmp_path / "server.log", database=pg.url, args=FAST) as srv:
        _everyone_else_is_served_beside_stalled_uploads(srv)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql-shared-folder"])
def test_stalled_uploads_do_not_starve_everyone_else(backend: str, request, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if backend == "sqlite":
        srv = RelayServer(tmp_path / "server.log", data=tmp_path / "data", args=FAST)
    else:
        pg = request.getfixturevalue("pg")
        srv = RelayServer(
            tmp_path / "server.log",
            database=fresh_database(pg, "stalled_folder"),
            args=(*FAST, "--bodies", str(tmp_path / "bodies")),
        )
    with srv:
        _everyone_else_is_served_beside_stalled_uploads(srv)


def test_an_upload_whose_body_stops_arriving_is_abandoned(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with RelayServer(
        tmp_path / "server.log", data=data, args=(*FAST, "--body-timeout", "1")
    ) as srv:
        stranger, bob = m.Identity.generate(), m.Identity.generate()
        _publish(stranger, srv.url)
        with contextlib.closing(_slow_upload(srv.url, stranger, bob.fingerprint)) as s:
            s.settimeout(120)  # a bound for a broken relay, not a measurement
            answer = b""
            while b"\r\n\r\n" not in answer or b"}" not in answer:
                more = s.recv(65536)
                if not more:
                    break
                answer += more
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert b"urn:medsecure:relay:problem:request-timeout" in answer
        # nothing of it is kept or waited for
        wait(lambda: _receiving(srv.url) == 0, "the relay lets the stalled upload go")
        assert list((data / "tmp").iterdir()) == []
        with RelayTransport(bob, srv.url) as b:
            assert b.list() == []


def _raw_get(base: str, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """A GET with ``target`` sent as is (httpx would drop a fragment); (status, body)."""
    parts = urllib.parse.urlsplit(base)
    lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection((parts.hostname, parts.port)) as s:
        s.settimeout(120)  # a bound for a broken relay, not a measurement
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        while more := s.recv(65536):
            answer += more
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def test_a_fragment_cannot_add_a_query_the_signature_does_not_cover(relay: RelayServer) -> None:
    """A look-up signed for one identifier, with "#&identifier=<another>" appended to its target
    by someone on the way (uvicorn keeps the fragment in the query string, where the last value
    wins; the signature base drops it): refused, not answered for the other identifier."""
    asked, other, me = m.Identity.generate(), m.Identity.generate(), m.Identity.generate()
    _publish(asked, relay.url, identifiers=("rpps:10005555555",))
    _publish(other, relay.url, identifiers=("rpps:10007777777",))
    _publish(me, relay.url)
    target = "/v1/keys?identifier=rpps%3A10005555555"
    headers = sign_request(me, "GET", relay.url + target, EMPTY_DIGEST)
    status, body = _raw_get(relay.url, target + "#&identifier=rpps%3A10007777777", headers)
    assert status == 401 and b"signature-invalid" in body, (status, body[:200])
    # the request as signed is answered (with a fresh nonce), for the identifier it names
    status, body = _raw_get(
        relay.url, target, sign_request(me, "GET", relay.url + target, EMPTY_DIGEST)
    )
    assert status == 200
    found = [
        KeyBundle.parse(base64.urlsafe_b64decode(t + "=" * (-len(t) % 4))).fingerprint
        for t in json.loads(body)["bundles"]
    ]
    assert found == [asked.fingerprint]


def _advisory_waits(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        ).fetchone()
    return int(row[0]) if row else 0


def test_replays_held_in_a_slow_commit_spend_none_of_their_senders_tokens(  # type: ignore[no-untyped-def]
    pg, tmp_path: Path
) -> None:
    """Someone who captured alice's small upload replays it while the relay's commits are slow
    (here: the recipient's mailbox lock held by another transaction, as a busy mailbox or a
    slow disk would). On PostgreSQL a small upload's nonce is checked in its commit: the replay
    must not hold one of alice's rate tokens while it waits there, or replays kept in flight
    would take her tokens and refuse her own requests (429)."""
    import threading

    import psycopg

    from medsecure.relay.server.storage._postgres import _lock_key

    url = fresh_database(pg, "replay_tokens")
    # three tokens, hardly refilled: alice's publication takes one, her upload one
    with RelayServer(
        tmp_path / "server.log", database=url, args=("--rate", "0.001", "--burst", "3")
    ) as srv:
        alice, bob = m.Identity.generate(), m.Identity.generate()
        _publish(alice, srv.url)
        _publish(bob, srv.url)
        up, body, headers = signed_upload(alice, bob, srv.url)
        assert httpx.put(up, headers=headers, content=body).status_code == 201
        holder = psycopg.connect(url)
        holder.execute("BEGIN")
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(bob.fingerprint),))
        answers: list[httpx.Response] = []
        replay = threading.Thread(
            target=lambda: answers.append(httpx.put(up, headers=headers, content=body, timeout=60))
        )
        try:
            replay.start()
            # the replay refused at once, or waiting in its commit for the lock
            wait(lambda: answers or _advisory_waits(url) == 1, "the replay refused or waiting")
            # alice's last token is hers: she lists her mailbox
            own = f"{srv.url}/v1/mailboxes/{alice.fingerprint}/messages"
            r = httpx.get(own, headers=sign_request(alice, "GET", own, EMPTY_DIGEST))
            assert r.status_code == 200, r.text
        finally:
            holder.execute("COMMIT")
            holder.close()
            replay.join(60)
        assert [(a.status_code, a.json()["type"].rsplit(":", 1)[1]) for a in answers] == [
            (401, "nonce-replayed")
        ]
        # alice's tokens are all spent now; a replay byte for byte is still told it is a
        # replay, not 429 (which would tell whoever replays how busy she is)
        r = httpx.put(up, headers=headers, content=body)
        assert r.status_code == 401 and r.json()["type"].endswith(":nonce-replayed")
        # the same request sent chunked takes the large uploads' path (the nonce checked first,
        # in the statements of the nonce pool): the one table of nonces refuses it as well
        r = httpx.put(up, headers=headers, content=iter([body]))
        assert r.status_code == 401 and r.json()["type"].endswith(":nonce-replayed")
        own = f"{srv.url}/v1/mailboxes/{bob.fingerprint}/messages"
        r = httpx.get(own, headers=sign_request(bob, "GET", own, EMPTY_DIGEST))
        assert [x["message_id"] for x in r.json()["messages"]] == [up.rsplit("/", 1)[1]]


class _HostileRelay:
    """A hostile relay on loopback: it takes key bundles (any PUT: 204) and answers every GET
    with :meth:`answer`, in the handler's thread."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.stop = threading.Event()
        answer = self.answer

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_PUT(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.wfile.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")

            def do_GET(self) -> None:
                answer(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, handler: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


class _ThrottlingRelay(_HostileRelay):
    """Every GET: ``503`` with a ``Retry-After`` of one byte, ``\\xb2`` (which httpx reads as
    ``"²"``: a digit to ``str.isdigit``, not a number to ``float``)."""

    def answer(self, handler: Any) -> None:
        handler.wfile.write(
            b"HTTP/1.1 503 Unavailable\r\nRetry-After: \xb2\r\nContent-Length: 0\r\n\r\n"
        )


def test_a_hostile_relays_retry_after_does_not_stop_receiving_from_the_other_mailboxes(
    tmp_path: Path,
) -> None:
    """A relay (hostile, or anyone answering in its name) answers the listing 503 with a
    ``Retry-After`` that is a digit to ``str.isdigit`` but no number (``²``): that relay is
    unreachable for now, and the message waiting in the drop folder is still received."""
    from clientkit import entry, party

    from medsecure.directory import MemoryDirectory
    from medsecure.transports import FileTransport
    from medsecure.trust import AuthorityPolicy, PinStore

    hostile = _ThrottlingRelay()
    authority = m.Identity.generate()
    alice = party(tmp_path, "alice", "810000000001")
    bob = party(tmp_path, "bob", "810000000002")
    directory = MemoryDirectory([entry(authority, alice), entry(authority, bob)])
    trust = AuthorityPolicy([authority.public], pins=PinStore(tmp_path / "pins.sqlite"))
    try:
        with m.Client(
            alice.identity,
            directory,
            FileTransport(alice.box),
            alice.home,
            trust=trust,
            me=alice.ref,
        ) as a:
            a.send(m.Document(content=b"genuine"), to=bob.ref)
        relay = RelayTransport(bob.identity, hostile.url, sleep=lambda s: None)
        transports = [relay, FileTransport(bob.box)]
        with m.Client(bob.identity, directory, transports, bob.home, trust=trust, me=bob.ref) as b:
            for _ in range(2):  # and again: nothing is stuck
                (msg,) = b.receive()
                assert msg.documents[0].read() == b"genuine"
            assert [name for name, _ in b.unreachable] == [relay.name]
            with pytest.raises(m.TransportUnavailable):
                relay.list()
    finally:
        hostile.close()


class _DrippingRelay(_HostileRelay):
    """Every GET: ``200`` with a long JSON body sent one byte at a time, each well within any
    read timeout."""

    def answer(self, handler: Any) -> None:
        import time

        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
        handler.wfile.flush()
        with contextlib.suppress(OSError):
            while not self.stop.is_set():
                handler.wfile.write(b" ")
                handler.wfile.flush()
                time.sleep(0.05)
        handler.close_connection = True


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_a_relay_dripping_its_answer_cannot_hold_the_client_forever(driver: str) -> None:
    """A hostile relay answers the listing one byte at a time, each byte well within the read
    timeout, for ever (a 1 MB answer at 20 bytes a second: 14 hours). The transport gives up
    on an answer that takes more than four times its timeout (TransportUnavailable): one relay
    cannot keep receive() from returning, nor from reading the other mailboxes."""
    import time

    from relaykit import DRIVERS

    hostile = _DrippingRelay()
    t = DRIVERS[driver](m.Identity.generate(), hostile.url, timeout=0.5, retries=0)
    try:
        started = time.monotonic()
        with pytest.raises(m.TransportUnavailable, match="did not arrive"):
            t.list()
        assert time.monotonic() - started < 30
    finally:
        t.close()
        hostile.close()
