"""Attacks through the CLI's outputs (docs/security.md §2, §5): ``medsecure receive -o`` run by
a practitioner, with a trusted but malicious correspondent."""

from __future__ import annotations

import json
from pathlib import Path

import test_cli_client as tc
from test_cli_core import run
from test_hostile_inbox import craft, drop, fields

import medsecure as m

homes = tc.homes


def test_a_sender_reusing_a_message_id_never_overwrites_a_saved_message(
    homes: Path, tmp_path: Path
) -> None:
    """Alice's message is saved by ``receive -o out`` in ``out/<message id>/``. Mallory, whom
    Bob's directory knows, reuses that id (it is in the drop folder's file names) for a message
    of her own with a document of the same name. The next ``receive -o out`` must not replace
    Alice's document and message.json with Mallory's: Alice's message was acknowledged and
    this folder is all that is left of it."""
    mallory = m.Identity.generate()
    added = run(
        [
            "directory",
            "add",
            "--directory",
            "alice/directory.json",  # the directory both homes use
            "--idnps",
            "rpps:10000000025",
            "--family",
            "MALLORY",
            "--key",
            str(mallory.public),
        ],
        homes,
    )
    assert added.returncode == 0, added.stderr
    doc = tmp_path / "cr.txt"
    doc.write_text("from alice")
    sent = run(["send", str(doc), "--to", "rpps:10000000017", "--home", "alice", "--json"], homes)
    assert sent.returncode == 0, sent.stderr
    mid = json.loads(sent.stdout)["message_id"]
    (waiting,) = [p for p in homes.rglob(f"{mid}.msec") if p.parent.name == "new"]
    box = waiting.parent.parent
    out = tmp_path / "out"
    assert run(["receive", "--home", "bob", "-o", str(out)], homes).returncode == 0
    assert (out / mid / "cr.txt").read_text() == "from alice"

    bob = m.PublicIdentity.from_key_file(homes / "bob" / "identity.key")
    data = b"from mallory"
    forged = fields(
        "810000000025",
        {
            2: mid,
            9: [{"id": "d1", "media_type": "text/plain", "size": len(data), "filename": "cr.txt"}],
        },
    )
    drop(box, craft(mallory, bob, forged, data), mid)
    proc = run(["receive", "--home", "bob", "-o", str(out), "--json"], homes)
    assert proc.returncode == 0, proc.stderr
    assert [x["message_id"] for x in json.loads(proc.stdout)["messages"]] == [mid], run(
        ["quarantine", "--home", "bob", "--json"], homes
    ).stdout
    assert (out / mid / "cr.txt").read_text() == "from alice"
    meta = json.loads((out / mid / "message.json").read_text())
    assert meta["sender"]["idnps"] == "810000005479"
    # and Mallory's message is saved too, somewhere of its own
    saved = sorted(p.read_text() for p in out.rglob("cr.txt"))
    assert saved == ["from alice", "from mallory"]
