"""``medsecure init / send / receive / outbox / flush / quarantine`` as real subprocesses, and the
module-level ``medsecure.send`` with its default client from MEDSECURE_HOME."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_core import one_error_line, run

import medsecure


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("homes")
    proc = run(
        [
            "init",
            "--home",
            "alice",
            "--me",
            "rpps:10000005479",
            "--family",
            "MARTIN",
            "--given",
            "Sophie",
            "--unsafe-tofu",
            "--json",
        ],
        d,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["fingerprint"].startswith("ms1") and info["public_key"].startswith("msp1")
    assert "unsafe-tofu" in proc.stderr  # says plainly that no authority was configured
    assert (
        run(
            [
                "init",
                "--home",
                "bob",
                "--me",
                "rpps:10000000017",
                "--family",
                "PETIT",
                "--given",
                "Luc",
                "--unsafe-tofu",
                "--directory",
                str(d / "alice" / "directory.json"),
            ],
            d,
        ).returncode
        == 0
    )
    assert (
        run(
            ["directory", "import", "--directory", "alice/directory.json", "bob/directory.json"], d
        ).returncode
        == 0
    )
    assert (d / "alice" / "identity.key").stat().st_mode & 0o777 == 0o600
    assert "already a medsecure home" in one_error_line(
        run(["init", "--home", "alice", "--me", "rpps:10000005479", "--unsafe-tofu"], d)
    )
    return d


def test_send_receive_outbox_flush(homes: Path, tmp_path: Path) -> None:
    doc = tmp_path / "cr.pdf"
    doc.write_bytes(b"%PDF-1.7\n" + os.urandom(2000))
    photo = tmp_path / "plaie.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(500))
    proc = run(
        [
            "send",
            str(doc),
            str(photo),
            "--to",
            "rpps:10000000017",
            "--subject",
            "Suivi",
            "--home",
            "alice",
            "--json",
        ],
        homes,
    )
    assert proc.returncode == 0, proc.stderr
    sent = json.loads(proc.stdout)
    assert sent["recipients"][0]["status"] == "sent"
    proc = run(["outbox", "--home", "alice", "--json"], homes)
    assert any(e["message_id"] == sent["message_id"] for e in json.loads(proc.stdout))
    proc = run(["flush", "--home", "alice", "--json"], homes)
    assert proc.returncode == 0 and json.loads(proc.stdout) == []
    out = tmp_path / "received"
    proc = run(["receive", "--home", "bob", "-o", str(out), "--json"], homes)
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    (msg,) = listing["messages"]
    assert msg["message_id"] == sent["message_id"] and msg["subject"] == "Suivi"
    folder = out / sent["message_id"]
    # health data: folders 0700, files 0600
    assert out.stat().st_mode & 0o777 == 0o700
    assert folder.stat().st_mode & 0o777 == 0o700
    for f in ("cr.pdf", "plaie.jpg", "message.json"):
        assert (folder / f).stat().st_mode & 0o777 == 0o600, f
    assert (folder / "cr.pdf").read_bytes() == doc.read_bytes()
    assert (folder / "plaie.jpg").read_bytes() == photo.read_bytes()
    meta = json.loads((folder / "message.json").read_text())
    assert (
        meta["sender"]["idnps"] == "810000005479"
        and meta["documents"][0]["media_type"] == "application/pdf"
    )
    # acknowledged: nothing more
    assert json.loads(run(["receive", "--home", "bob", "--json"], homes).stdout)["messages"] == []
    assert "0 message(s)" in run(["receive", "--home", "bob"], homes).stderr or True
    assert json.loads(run(["quarantine", "--home", "bob", "--json"], homes).stdout) == []


def test_send_warns_of_a_media_type_mismatch_by_position(homes: Path, tmp_path: Path) -> None:
    files = [tmp_path / "a.pdf", tmp_path / "IRM_DUPONT_Jean.pdf", tmp_path / "c.pdf"]
    files[0].write_bytes(b"%PDF-1.7\n1")
    files[1].write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + os.urandom(100))  # a JPEG
    files[2].write_bytes(b"%PDF-1.7\n3")
    proc = run(
        ["send", *map(str, files), "--to", "rpps:10000000017", "--home", "alice", "--json"], homes
    )
    assert proc.returncode == 0, proc.stderr
    assert "DUPONT" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if "media type" in x]
    assert line.startswith("medsecure: warning: document 2 of 3: ") and "sent as is" in line
    mid = json.loads(proc.stdout)["message_id"]
    proc = run(["receive", "--home", "bob", "-o", str(tmp_path / "in"), "--json"], homes)
    (msg,) = [x for x in json.loads(proc.stdout)["messages"] if x["message_id"] == mid]
    assert Path(msg["documents"][1]).read_bytes() == files[1].read_bytes()


def test_cli_client_errors(homes: Path, tmp_path: Path) -> None:
    doc = tmp_path / "x.txt"
    doc.write_text("hello")
    line = one_error_line(
        run(["send", str(doc), "--to", "rpps:10000000025", "--home", "alice"], homes)
    )
    assert "--to: no practitioner matches" in line
    line = one_error_line(
        run(
            [
                "send",
                str(tmp_path / "IRM_DUPONT_Jean.pdf"),
                "--to",
                "rpps:10000000017",
                "--home",
                "alice",
            ],
            homes,
        )
    )
    assert "not a readable file" in line and "DUPONT" not in line  # no patient name in errors
    assert "not a medsecure home" in one_error_line(
        run(["outbox", "--home", str(tmp_path / "nohome")], homes)
    )
    assert "wrong passphrase" in one_error_line(
        run(["outbox", "--home", "alice"], homes, passphrase="bad")
    )
    assert "MEDSECURE_PASSPHRASE" in one_error_line(
        run(["outbox", "--home", "alice"], homes, passphrase=None)
    )


def test_module_level_send_uses_medsecure_home(homes: Path, tmp_path: Path) -> None:
    script = (
        "import medsecure\n"
        "r = medsecure.send(medsecure.Document(content=b'via the default client', filename='n.txt'), to='rpps:10000000017', subject='default')\n"
        "print(r.message_id, r.all_sent)\n"
    )
    env = {**os.environ, "MEDSECURE_HOME": str(homes / "alice"), "MEDSECURE_PASSPHRASE": "pw"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    message_id, ok = proc.stdout.split()
    assert ok == "True"
    bob = medsecure.client_from_home(homes / "bob", passphrase="pw")
    try:
        msgs = [m for m in bob.receive() if m.message_id == message_id]
        assert msgs and msgs[0].documents[0].read() == b"via the default client"
        msgs[0].ack()
    finally:
        bob.close()


def test_the_cli_and_the_library_agree_on_the_default_home(tmp_path: Path) -> None:
    """``medsecure init`` without --home creates the home that ``medsecure.send`` then uses."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSECURE_")}
    env.update(XDG_DATA_HOME=str(tmp_path / "xdg"), HOME=str(tmp_path), MEDSECURE_PASSPHRASE="pw")
    proc = subprocess.run(
        [sys.executable, "-m", "medsecure", "init", "--me", "rpps:10000005479", "--unsafe-tofu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "xdg" / "medsecure" / "config.json").is_file()
    script = (
        "import medsecure\n"
        "r = medsecure.send(medsecure.Document(content=b'x', filename='n.txt'), "
        "to='rpps:10000005479')\n"
        "print(r.all_sent)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr


def test_status_and_audit_commands(homes: Path, tmp_path: Path) -> None:
    doc = tmp_path / "r.txt"
    doc.write_text("résultat")
    proc = run(
        [
            "send",
            str(doc),
            "--to",
            "rpps:10000000017",
            "--receipt",
            "delivered",
            "--receipt",
            "read",
            "--home",
            "alice",
            "--json",
        ],
        homes,
    )
    assert proc.returncode == 0, proc.stderr
    mid = json.loads(proc.stdout)["message_id"]
    assert run(["receive", "--home", "bob", "-o", str(tmp_path / "in")], homes).returncode == 0
    run(["receive", "--home", "alice"], homes)  # collects bob's delivered receipt
    (st,) = json.loads(run(["status", mid, "--home", "alice", "--json"], homes).stdout)
    assert st["status"] == "delivered" and st["receipts"] == ["delivered"]
    assert "delivered" in run(["status", mid, "--home", "alice"], homes).stdout
    assert "no message" in one_error_line(
        run(["status", "01ZZZZZZZZZZZZZZZZZZZZZZZZ", "--home", "alice"], homes)
    )
    proc = run(["audit", "verify", "--home", "alice"], homes)
    assert proc.returncode == 0 and proc.stdout.startswith("ok: "), proc.stderr
    out = tmp_path / "audit.csv"
    proc = run(
        [
            "audit",
            "export",
            "--home",
            "alice",
            "--format",
            "csv",
            "--since",
            "2020-01-01",
            "-o",
            str(out),
        ],
        homes,
    )
    assert proc.returncode == 0 and out.read_text().startswith("seq,ts,action")
    proc = run(["audit", "export", "--home", "bob"], homes)
    records = [json.loads(x) for x in proc.stdout.splitlines()]
    assert {"receive", "receipt-send", "ack"} <= {r["action"] for r in records}
    # tampering shows as one clear line and a non-zero exit
    log = sorted((homes / "alice" / "audit").glob("audit-*.jsonl"))[-1]
    lines = log.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"action":"', b'"action":"x', 1)
    log.write_bytes(b"".join(lines))
    line = one_error_line(run(["audit", "verify", "--home", "alice"], homes))
    assert "audit log broken at record 2" in line and "None" not in line


def test_init_says_how_keys_are_trusted_and_what_comes_next(tmp_path: Path) -> None:
    line = one_error_line(run(["init", "--home", "h", "--me", "rpps:10000005479"], tmp_path))
    assert "--authority" in line and "--unsafe-tofu" in line
    assert not (tmp_path / "h").exists()
    assert run(["keygen", "-o", "authority.key"], tmp_path).returncode == 0
    proc = run(
        [
            "init",
            "--home",
            "h",
            "--me",
            "rpps:10000005479",
            "--authority",
            "authority.key.pub",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Next steps" in proc.stderr
    assert "medsecure trust sign" in proc.stderr and "medsecure directory add" in proc.stderr
    assert "unsafe" not in proc.stderr
    pub = tmp_path / "h" / "identity.key.pub"
    assert pub.read_text().strip() in proc.stdout
    # the public key of a home needs no passphrase
    proc = run(["pubkey", "h/identity.key"], tmp_path, passphrase=None)
    assert proc.returncode == 0 and proc.stdout.strip() == pub.read_text().strip()


def test_a_failed_init_leaves_nothing(tmp_path: Path) -> None:
    assert run(["keygen", "-o", "authority.key"], tmp_path).returncode == 0
    assert run(["pubkey", "authority.key", "-o", "authority.pub"], tmp_path).returncode == 0
    (tmp_path / "a-file").write_text("")
    base = ["init", "--authority", "authority.pub"]
    # an invalid identifier
    line = one_error_line(run([*base, "--home", "new/home", "--me", "rpps:1"], tmp_path))
    assert not (tmp_path / "new").exists()
    assert "--me" in line
    # a mailbox that cannot be created (under a file): fails after the key was written
    line = one_error_line(
        run(
            [*base, "--home", "new/home", "--me", "rpps:10000005479", "--mailbox", "a-file/box"],
            tmp_path,
        )
    )
    assert "No such file" not in line
    assert not (tmp_path / "new").exists()
    # an existing, empty folder is kept, and left empty
    (tmp_path / "empty").mkdir()
    one_error_line(
        run(
            [*base, "--home", "empty", "--me", "rpps:10000005479", "--mailbox", "a-file/b"],
            tmp_path,
        )
    )
    assert list((tmp_path / "empty").iterdir()) == []


def test_received_message_json_is_replaced_not_followed(homes: Path, tmp_path: Path) -> None:
    """message.json is written atomically: a link planted where it goes is replaced, and what
    it points to is never written."""
    doc = tmp_path / "d.txt"
    doc.write_text("bilan")
    proc = run(["send", str(doc), "--to", "rpps:10000000017", "--home", "alice", "--json"], homes)
    mid = json.loads(proc.stdout)["message_id"]
    out = tmp_path / "in"
    (out / mid).mkdir(parents=True)
    bait = tmp_path / "bait.json"
    (out / mid / "message.json").symlink_to(bait)
    assert run(["receive", "--home", "bob", "-o", str(out)], homes).returncode == 0
    assert not bait.exists()
    meta = out / mid / "message.json"
    assert not meta.is_symlink() and meta.stat().st_mode & 0o777 == 0o600
    assert json.loads(meta.read_text())["message_id"] == mid
    assert (out / mid).stat().st_mode & 0o777 == 0o700


def test_audit_verify_and_export_accept_the_same_homes(homes: Path, tmp_path: Path) -> None:
    assert (
        run(["pubkey", "alice/identity.key", "-o", str(tmp_path / "a.pub")], homes).returncode == 0
    )
    (tmp_path / "empty").mkdir()
    for home in (tmp_path / "missing", tmp_path / "empty"):
        verify = one_error_line(
            run(["audit", "verify", "--home", str(home), "--key", str(tmp_path / "a.pub")], homes)
        )
        export = one_error_line(run(["audit", "export", "--home", str(home)], homes))
        assert "not a medsecure home" in verify and "not a medsecure home" in export
    # a home whose audit log is missing: both say so
    fresh = tmp_path / "fresh"
    shutil.copytree(homes / "alice", fresh, ignore=shutil.ignore_patterns("audit"))
    verify = one_error_line(run(["audit", "verify", "--home", str(fresh)], homes))
    export = one_error_line(run(["audit", "export", "--home", str(fresh)], homes))
    assert "no audit log" in verify and "no audit log" in export


def test_audit_verify_never_says_record_none(homes: Path, tmp_path: Path) -> None:
    doc = tmp_path / "d.txt"
    doc.write_text("x")
    assert (
        run(["send", str(doc), "--to", "rpps:10000000017", "--home", "bob"], homes).returncode == 0
    )
    copy = tmp_path / "bob"
    shutil.copytree(homes / "bob", copy)
    (copy / "audit" / "HEAD").unlink()
    line = one_error_line(run(["audit", "verify", "--home", str(copy)], homes))
    assert "HEAD is missing" in line and "None" not in line


def test_quarantine_release(homes: Path, tmp_path: Path) -> None:
    """A stranger's envelope, dropped in Bob's folder, goes to quarantine; once the sender is in
    the directory, ``medsecure quarantine release ID`` puts it back (audited) and the next
    ``receive`` verifies it. ``medsecure quarantine`` alone still lists, as before."""
    from test_hostile_inbox import craft, drop, fields

    stranger = medsecure.Identity.generate()
    bob = medsecure.PublicIdentity.from_key_file(homes / "bob" / "identity.key")
    drop(homes / "bob" / "mailbox", craft(stranger, bob, fields("810000000033"), b""))
    proc = run(["receive", "--home", "bob", "--json"], homes)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["quarantined"] == 1
    # the listing, as scripts run it
    (q,) = json.loads(run(["quarantine", "--home", "bob", "--json"], homes).stdout)
    assert "unknown to the directory" in q["reason"]
    listed = run(["quarantine", "--home", "bob"], homes)
    assert listed.returncode == 0 and listed.stdout.startswith(f"#{q['id']} ")
    # an id that is not in quarantine, or not an id: one line, exit 1
    for bad in ("999999", "#999999", "abc", "٣", "#"):
        proc = run(["quarantine", "release", bad, "--home", "bob"], homes)
        line = one_error_line(proc)
        assert proc.returncode == 1 and "quarantine" in line, line
    assert "no envelope #999999 in quarantine" in one_error_line(
        run(["quarantine", "release", "999999", "--home", "bob"], homes)
    )
    assert json.loads(run(["quarantine", "--home", "bob", "--json"], homes).stdout) == [q]
    # the cause fixed: the sender is added to the directory
    added = run(
        [
            "directory",
            "add",
            "--directory",
            "alice/directory.json",
            "--idnps",
            "rpps:10000000033",
            "--family",
            "ETRANGER",
            "--key",
            str(stranger.public),
        ],
        homes,
    )
    assert added.returncode == 0, added.stderr
    proc = run(["quarantine", "release", str(q["id"]), "--home", "bob", "--json"], homes)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"id": q["id"], "released": True}
    assert json.loads(run(["quarantine", "--home", "bob", "--json"], homes).stdout) == []
    # released once: a second time is an unknown id
    assert "no envelope" in one_error_line(
        run(["quarantine", "release", str(q["id"]), "--home", "bob"], homes)
    )
    # release does not receive: the next receive verifies it
    proc = run(["receive", "--home", "bob", "-o", str(tmp_path / "in"), "--json"], homes)
    assert proc.returncode == 0, proc.stderr
    senders = [x["sender"] for x in json.loads(proc.stdout)["messages"]]
    assert senders.count("810000000033") == 1
    # audited as by Client.release
    records = [
        json.loads(x) for x in run(["audit", "export", "--home", "bob"], homes).stdout.splitlines()
    ]
    (rel,) = [r for r in records if r["action"] == "release"]
    assert rel["result"] == "released"


def test_quarantine_release_text_and_group_options(homes: Path) -> None:
    """The text output says what to do next; --home may be given before ``release`` too."""
    from test_hostile_inbox import craft, drop, fields

    stranger = (
        medsecure.Identity.generate()
    )  # not in the directory: stays in quarantine until released
    bob = medsecure.PublicIdentity.from_key_file(homes / "bob" / "identity.key")
    drop(homes / "bob" / "mailbox", craft(stranger, bob, fields("810000000041"), b""))
    assert run(["receive", "--home", "bob"], homes).returncode == 0
    (q,) = json.loads(run(["quarantine", "--home", "bob", "--json"], homes).stdout)
    proc = run(["quarantine", "--home", "bob", "release", f"#{q['id']}"], homes)
    assert proc.returncode == 0, proc.stderr
    assert f"#{q['id']} released" in proc.stdout and "medsecure receive --home bob" in proc.stdout
    # verified again, and quarantined again (the sender is still unknown)
    assert run(["receive", "--home", "bob"], homes).returncode == 0
    (again,) = json.loads(run(["quarantine", "--home", "bob", "--json"], homes).stdout)
    assert "unknown to the directory" in again["reason"]
    line = one_error_line(
        run(["quarantine", "--home", "bob", "release", str(again["id"]), "--home", "alice"], homes)
    )
    assert "--home" in line
    assert run(["quarantine", "release", str(again["id"]), "--home", "bob"], homes).returncode == 0
