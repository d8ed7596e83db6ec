"""The relay scaled out: stateless instances over one real PostgreSQL, with large bodies in large
objects or in a shared folder (``--bodies``)."""

from __future__ import annotations

import io
import os
import threading
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from pgkit import fresh_database, wait
from relaykit import RelayServer, RoundRobinProxy, cli, free_port, message_id
from test_relay_crash import PATIENT, GatedUpload, _box, _payload, deliver_all, drain

import medsecure as m
from medsecure.transports import RelayTransport

FAST = ("--rate", "10000", "--burst", "100000")


def _large_objects(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()
        assert row is not None
        return int(row[0])


def _registered_objects(url: str) -> int:
    """Large objects of uploads not recorded (yet, or ever: their instance died)."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM relay_body_objects").fetchone()
        assert row is not None
        return int(row[0])


def _writing(url: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM relay_body_objects WHERE length(lo_get(object, 0, 1)) > 0"
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
    url = fresh_database(pg, "object_kill")
    bob = m.Identity.generate()
    data = _payload(tmp_path / "env.msec", 16)
    srv = RelayServer(tmp_path / "log", database=url, args=FAST).start()
    try:
        sender = RelayTransport(alice, srv.url, **PATIENT)
        receiver = RelayTransport(bob, srv.url, **PATIENT)
        receiver.list()
        objects_before = _large_objects(url)
        upload = GatedUpload(
            sender, _box(bob, srv.url), tmp_path / "env.msec", len(data), stop_at=6 << 20
        )
        wait(lambda: _writing(url), "the relay is writing the body into a large object")
        srv.kill()
        # the partial body is in a registered large object, listed nowhere
        assert _registered_objects(url) == 1 and _large_objects(url) == objects_before + 1
        srv.start()
        assert receiver.list() == []
        assert upload.resume() == []
        (item,) = receiver.list()
        assert receiver.fetch(item).read() == data
        # the finished body is recorded (no longer registered); the dead one waits for the sweep
        assert _registered_objects(url) == 1 and _large_objects(url) == objects_before + 2
        later = str(int(time.time()) + 2 * 86400)
        done = cli("relay", "sweep", "--database", url, "--as-of", later)
        assert done.returncode == 0, done.stderr
        assert _registered_objects(url) == 0 and _large_objects(url) == objects_before + 1
        assert receiver.fetch(item).read() == data  # the sweep spares recorded bodies
        receiver.acknowledge(item)
        assert _large_objects(url) == objects_before  # the acknowledged one was unlinked
        sender.close()
        receiver.close()
    finally:
        srv.stop()


@pytest.mark.slow
def test_two_instances_one_killed_halfway_exactly_once(pg, tmp_path):
    senders = [m.Identity.generate() for _ in range(20)]
    receivers = [m.Identity.generate() for _ in range(10)]
    # the instances answer for the proxy's address, the one their clients use
    front = free_port()
    args = (*FAST, "--public-url", f"http://127.0.0.1:{front}")
    a = RelayServer(tmp_path / "a.log", database=pg.url, args=args).start()
    b = RelayServer(tmp_path / "b.log", database=pg.url, args=args).start()
    proxy = RoundRobinProxy([a.port, b.port], port=front)
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


# -- large bodies in a shared folder (--bodies) -----------------------------------------------


def _database(pg, name: str) -> str:
    """A fresh database of the cluster (so that file-backed rows meet only their own folder)."""
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return pg.url.rsplit("/", 1)[0] + "/" + name


def _files(folder: Path) -> list[str]:
    """Every body file in the shared folder, written or being written."""
    found = [e.name for e in os.scandir(folder / "tmp")]
    for sub in os.scandir(folder / "objects"):
        found += [e.name for e in os.scandir(sub.path)]
    return found


def _registered(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM relay_body_files").fetchone()
        assert row is not None
        return int(row[0])


def _sweep_later(url: str, folder: Path) -> None:
    """``medsecure relay sweep`` two days on: uploads that died are older than a day by then."""
    later = str(int(time.time()) + 2 * 86400)
    done = cli("relay", "sweep", "--database", url, "--bodies", str(folder), "--as-of", later)
    assert done.returncode == 0, done.stderr


def test_kill_9_during_an_upload_to_the_shared_folder(pg, tmp_path, alice):
    url = _database(pg, "folder_kill")
    folder = tmp_path / "bodies"
    bob = m.Identity.generate()
    data = _payload(tmp_path / "env.msec", 16)
    args = (*FAST, "--bodies", str(folder))
    srv = RelayServer(tmp_path / "log", database=url, args=args).start()
    try:
        sender = RelayTransport(alice, srv.url, **PATIENT)
        receiver = RelayTransport(bob, srv.url, **PATIENT)
        receiver.list()
        upload = GatedUpload(
            sender, _box(bob, srv.url), tmp_path / "env.msec", len(data), stop_at=6 << 20
        )
        wait(
            lambda: sum(e.stat().st_size for e in os.scandir(folder / "tmp")) > 0,
            "the relay is writing the body into the shared folder",
        )
        srv.kill()
        # the partial body is on disk, registered, and listed nowhere
        assert len(_files(folder)) == 1 and _registered(url) == 1
        srv.start()
        assert receiver.list() == []
        assert upload.resume() == []
        (item,) = receiver.list()
        assert receiver.fetch(item).read() == data
        # the finished body is in objects/, the dead one still in tmp/ until the sweep
        assert len(_files(folder)) == 2 and _registered(url) == 1
        _sweep_later(url, folder)
        assert len(_files(folder)) == 1 and _registered(url) == 0
        assert receiver.fetch(item).read() == data  # the sweep spares recorded bodies
        receiver.acknowledge(item)
        assert _files(folder) == [] and _registered(url) == 0
        sender.close()
        receiver.close()
    finally:
        srv.stop()


@pytest.mark.slow
def test_two_instances_share_a_bodies_folder_one_killed_halfway_exactly_once(pg, tmp_path):
    url = _database(pg, "folder_two")
    folder = tmp_path / "bodies"
    front = free_port()
    args = (*FAST, "--bodies", str(folder), "--public-url", f"http://127.0.0.1:{front}")
    senders = [m.Identity.generate() for _ in range(20)]
    receivers = [m.Identity.generate() for _ in range(10)]
    a = RelayServer(tmp_path / "a.log", database=url, args=args).start()
    b = RelayServer(tmp_path / "b.log", database=url, args=args).start()
    proxy = RoundRobinProxy([a.port, b.port], port=front)
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
        # 80 KiB: above the inline limit, so every body is a file in the shared folder
        sent = deliver_all(lambda i: proxy.url, senders, receivers, 50, progress, 80 << 10)
        watcher.join(60)
        assert killed.is_set()
        assert len(_files(folder)) >= 1000  # each waiting body is a file (+ any orphans)
        got = drain(proxy.url, receivers)
        assert len(sent) == 1000
        assert set(got) == set(sent) and set(got.values()) == {1}
        assert drain.bodies == sent  # type: ignore[attr-defined]
        assert '"event":"accepted"' in (tmp_path / "a.log").read_text()
        assert '"event":"accepted"' in (tmp_path / "b.log").read_text()
        # every collected body is gone; what the killed instance left is swept
        _sweep_later(url, folder)
        assert _files(folder) == [] and _registered(url) == 0
    finally:
        proxy.close()
        a.stop()
        b.stop()
