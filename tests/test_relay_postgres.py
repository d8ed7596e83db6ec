"""The relay scaled out: stateless instances over one real PostgreSQL (large-object bodies)."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter

import psycopg
import pytest
from pgkit import wait
from relaykit import RelayServer, RoundRobinProxy, cli, message_id
from test_relay_crash import PATIENT, Gated, _payload, deliver_all, drain

import medsecure as m
from medsecure.models import Endpoint
from medsecure.transports import RelayTransport

FAST = ("--rate", "10000", "--burst", "100000")


def _box(identity: m.Identity, url: str) -> Endpoint:
    return Endpoint(kind="relay", url=url, mailbox=identity.fingerprint)


def _large_objects(pg) -> int:
    with psycopg.connect(pg.url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()
        assert row is not None
        return int(row[0])


def _writing(pg) -> bool:
    with psycopg.connect(pg.url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT lo_put%%'"
            " AND state = 'idle in transaction'"
        ).fetchone()
        return bool(row and row[0])


def test_retention_sweep_runs_beside_live_instances(pg, tmp_path, alice):
    bob = m.Identity.generate()
    with RelayServer(tmp_path / "log", database=pg.url, args=FAST) as srv:
        with RelayTransport(alice, srv.url) as t:
            mid = message_id()
            t.deliver(_box(bob, srv.url), io.BytesIO(b"never collected"), message_id=mid, size=15)
            later = str(int(time.time()) + 91 * 86400)
            done = cli("relay", "sweep", "--database", pg.url, "--as-of", later)
            assert done.returncode == 0, done.stderr
            assert [s.state for s in t.upload_states([mid])] == ["expired"]
        with RelayTransport(bob, srv.url) as r:
            assert mid not in [i.message_id for i in r.list()]


def test_kill_9_during_an_upload_leaves_no_partial_body(pg, tmp_path, alice):
    bob = m.Identity.generate()
    data = _payload(tmp_path / "env.msec", 16)
    srv = RelayServer(tmp_path / "log", database=pg.url, args=FAST).start()
    try:
        sender = RelayTransport(alice, srv.url, **PATIENT)
        receiver = RelayTransport(bob, srv.url, **PATIENT)
        receiver.list()
        objects_before = _large_objects(pg)
        gated = Gated(tmp_path / "env.msec", stop_at=6 << 20)
        mid = message_id()
        errors: list[BaseException] = []

        def upload() -> None:
            try:
                sender.deliver(_box(bob, srv.url), gated, message_id=mid, size=len(data))  # type: ignore[arg-type]
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=upload)
        worker.start()
        assert gated.reached.wait(60)
        wait(lambda: _writing(pg), "the relay is writing the body into a large object")
        srv.kill()
        srv.start()
        assert receiver.list() == []
        gated.go.set()
        worker.join(180)
        assert errors == []
        (item,) = receiver.list()
        assert receiver.fetch(item).read() == data
        receiver.acknowledge(item)
        # the killed upload's large object rolled back with its transaction; the acknowledged
        # one was unlinked: none is left behind
        assert _large_objects(pg) == objects_before
        sender.close()
        receiver.close()
    finally:
        srv.stop()


@pytest.mark.slow
def test_two_instances_one_killed_halfway_exactly_once(pg, tmp_path):
    senders = [m.Identity.generate() for _ in range(20)]
    receivers = [m.Identity.generate() for _ in range(10)]
    a = RelayServer(tmp_path / "a.log", database=pg.url, args=FAST).start()
    b = RelayServer(tmp_path / "b.log", database=pg.url, args=FAST).start()
    proxy = RoundRobinProxy([a.port, b.port])
    try:
        progress: dict[str, bytes] = {}
        killed = threading.Event()

        def killer() -> None:
            while len(progress) < 500:
                time.sleep(0.05)
            a.kill()
            killed.set()

        watcher = threading.Thread(target=killer)
        watcher.start()
        sent = deliver_all(lambda i: proxy.url, senders, receivers, 50, progress=progress)
        watcher.join(60)
        assert killed.is_set()
        got = drain(proxy.url, receivers)
        assert len(sent) == 1000
        assert set(got) == set(sent) and set(got.values()) == {1}
        assert drain.bodies == sent  # type: ignore[attr-defined]
        # both instances served uploads before one was killed
        assert '"event":"accepted"' in (tmp_path / "a.log").read_text()
        assert '"event":"accepted"' in (tmp_path / "b.log").read_text()
    finally:
        proxy.close()
        a.stop()
        b.stop()
    assert Counter(got.values()) == Counter({1: 1000})
