"""Disk full and read-only homes, on a real small tmpfs (the tests run as root in CI)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clientkit import client, entry, party

import medsecure as m
from medsecure.directory import MemoryDirectory

# Mounting needs root: CI runs as root (and must then run these); elsewhere they are skipped.
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True
    )
    assert proc.returncode == 0, f"cannot mount a tmpfs: {proc.stderr.decode().strip()}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def remount(mnt: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], check=True, capture_output=True)


def integrity(home: Path) -> str:
    con = sqlite3.connect(home / "medsecure.sqlite")
    try:
        return str(con.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        con.close()


@pytest.fixture(scope="module")
def authority() -> m.Identity:
    return m.Identity.generate()


def test_disk_full_on_send(small_fs: Path, tmp_path: Path, authority: m.Identity) -> None:
    alice = party(tmp_path, "alice", "810000005479")
    alice.home = small_fs / "home"
    bob = party(tmp_path, "bob", "810000000017")
    directory = MemoryDirectory([entry(authority, alice), entry(authority, bob)])
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(4 << 20))
    with client(alice, directory, authority) as ca:
        with pytest.raises(m.StorageError, match=r"No space left|full"):
            ca.send(m.Document.from_path(big), to=bob.ref)
        assert ca.outbox() == []
        assert [p.name for p in (alice.home / "outbox").iterdir()] == []  # no partial file
        assert integrity(alice.home) == "ok"
        assert ca.send(m.Document(content=b"small"), to=bob.ref).all_sent  # the store still works


def test_disk_full_on_receive_loses_nothing(
    small_fs: Path, tmp_path: Path, authority: m.Identity
) -> None:
    alice = party(tmp_path, "alice", "810000005479")
    bob = party(tmp_path, "bob", "810000000017")
    bob.home = small_fs / "home"
    directory = MemoryDirectory([entry(authority, alice), entry(authority, bob)])
    with client(alice, directory, authority) as ca:
        ca.send(m.Document(content=os.urandom(2 << 20)), to=bob.ref)
        ca.send(m.Document(content=b"second"), to=bob.ref)
    now = [time.time()]
    with client(bob, directory, authority, clock=lambda: now[0]) as cb:
        # the disk is too small for the large one: receive() does not raise and does not
        # stall; the small one is received; the large one waits (in the drop folder or in the
        # inbox) for a later attempt
        got = cb.receive()
        assert [len(x.documents[0].read()) for x in got] == [6]
        assert integrity(bob.home) == "ok"
        waiting = len(list((bob.box / "new").iterdir()))
        stored = len(cb.store.query("SELECT id FROM inbox WHERE status = 'fetched'"))
        assert waiting + stored == 1 and cb.quarantine() == []
        remount(small_fs, "size=64m")
        now[0] += 60  # past the retry delay
        msgs = cb.receive()
        assert sorted(len(x.documents[0].read()) for x in msgs) == [6, 2 << 20]


def test_read_only_home(small_fs: Path, tmp_path: Path, authority: m.Identity) -> None:
    alice = party(tmp_path, "alice", "810000005479")
    alice.home = small_fs / "home"
    bob = party(tmp_path, "bob", "810000000017")
    directory = MemoryDirectory([entry(authority, alice), entry(authority, bob)])
    with client(alice, directory, authority) as ca:
        ca.send(m.Document(content=b"before"), to=bob.ref)
    remount(small_fs, "ro")
    try:
        with (
            pytest.raises(m.StorageError, match=r"read-only|Read-only"),
            client(alice, directory, authority) as ca,
        ):
            ca.send(m.Document(content=b"during"), to=bob.ref)
    finally:
        remount(small_fs, "rw")
    with client(alice, directory, authority) as ca:
        assert ca.send(m.Document(content=b"after"), to=bob.ref).all_sent
        assert len(ca.outbox()) == 2
    assert integrity(alice.home) == "ok"
