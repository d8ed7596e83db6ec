"""Attacks on the drop folder by someone who can write it (docs/security.md §1, §5)."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from clientkit import Party, client, entry, party

import medsecure as m
from medsecure.directory import MemoryDirectory
from medsecure.envelope._message import new_message_id


@pytest.fixture
def world(tmp_path: Path) -> tuple[m.Identity, Party, MemoryDirectory]:
    authority = m.Identity.generate()
    bob = party(tmp_path, "bob", "810000000017")
    return authority, bob, MemoryDirectory([entry(authority, bob)])


def test_a_file_the_stranger_keeps_a_link_to_is_copied_not_linked_into_the_home(
    world: tuple[m.Identity, Party, MemoryDirectory], tmp_path: Path
) -> None:
    """A stranger drops a file and keeps a second hard link to it in a folder of their own.
    Taking it must not make the inbox (or quarantine) copy that same inode: otherwise the
    stranger keeps write access to a file inside the 0700 home (rewriting the envelope between
    the moment its id is computed and the moment it is verified, or at any time after), and the
    copy keeps the stranger's mode instead of 0600."""
    authority, bob, directory = world
    mine = tmp_path / "stranger"
    mine.mkdir()
    kept = mine / "kept"
    kept.write_bytes(b"junk that is no envelope")
    kept.chmod(0o666)
    dropped = bob.box / "new" / f"{new_message_id(dt.datetime.now(dt.UTC))}.msec"
    os.link(kept, dropped)
    with client(bob, directory, authority) as cb:
        assert cb.receive() == []
        (q,) = cb.quarantine()
        held = q.path
        assert held.read_bytes() == b"junk that is no envelope"
        info = held.stat()
        assert (info.st_dev, info.st_ino) != (kept.stat().st_dev, kept.stat().st_ino)
        assert stat.S_IMODE(info.st_mode) == 0o600
        kept.write_bytes(b"rewritten by the stranger")
        assert held.read_bytes() == b"junk that is no envelope"


def test_a_file_owned_by_another_user_is_copied_not_linked_into_the_home(
    world: tuple[m.Identity, Party, MemoryDirectory],
) -> None:
    """The stranger owns the dropped file and keeps it open for writing (no second link
    needed): a hard link would leave them a writable descriptor on a file inside the home."""
    if os.geteuid() != 0:
        pytest.skip("making a file owned by another user needs root")
    authority, bob, directory = world
    dropped = bob.box / "new" / f"{new_message_id(dt.datetime.now(dt.UTC))}.msec"
    dropped.write_bytes(b"junk that is no envelope")
    os.chown(dropped, 65534, 65534)
    dropped.chmod(0o666)
    fd = os.open(dropped, os.O_RDWR)
    try:
        with client(bob, directory, authority) as cb:
            assert cb.receive() == []
            (q,) = cb.quarantine()
            info = q.path.stat()
            assert (info.st_dev, info.st_ino) != (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
            assert info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) == 0o600
            os.pwrite(fd, b"REWRITTEN", 0)
            assert q.path.read_bytes() == b"junk that is no envelope"
    finally:
        os.close(fd)


def test_a_local_senders_envelope_is_still_linked_not_copied(tmp_path: Path) -> None:
    """The fast path stays: an envelope a sender of this user linked from its outbox (0644,
    writable by this user only, two links) is hard-linked into the inbox, not copied — nobody
    else can write it, so the other links give nobody power over the copy."""
    authority = m.Identity.generate()
    alice = party(tmp_path, "alice", "810000005479")
    bob = party(tmp_path, "bob", "810000000017")
    directory = MemoryDirectory([entry(authority, alice), entry(authority, bob)])
    with client(alice, directory, authority) as ca:
        ca.send(m.Document(content=b"x" * 4096), to=bob.ref)
    (dropped,) = (bob.box / "new").iterdir()
    before = dropped.stat()
    assert before.st_nlink == 2 and not before.st_mode & 0o022  # outbox + drop folder
    with client(bob, directory, authority) as cb:
        cb.store.inbox_dir  # noqa: B018 - the home exists
        (msg,) = cb.receive()
        inode = (before.st_dev, before.st_ino)
        held = [p for p in (bob.home / "inbox").iterdir() if p.suffix == ".msec"]
        assert [(p.stat().st_dev, p.stat().st_ino) for p in held] == [inode]
        msg.ack()
