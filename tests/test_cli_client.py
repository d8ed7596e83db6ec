"""``medsecure init / send / receive / outbox / flush / quarantine`` as real subprocesses, and the
module-level ``medsecure.send`` with its default client from MEDSECURE_HOME."""

from __future__ import annotations

import json
import os
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
                "rpps:10000000019",
                "--family",
                "PETIT",
                "--given",
                "Luc",
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
        run(["init", "--home", "alice", "--me", "rpps:10000005479"], d)
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
            "rpps:10000000019",
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


def test_cli_client_errors(homes: Path, tmp_path: Path) -> None:
    doc = tmp_path / "x.txt"
    doc.write_text("hello")
    assert "no practitioner matches" in one_error_line(
        run(["send", str(doc), "--to", "rpps:10000000027", "--home", "alice"], homes)
    )
    line = one_error_line(
        run(
            [
                "send",
                str(tmp_path / "IRM_DUPONT_Jean.pdf"),
                "--to",
                "rpps:10000000019",
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
        "r = medsecure.send(medsecure.Document(content=b'via the default client', filename='n.txt'), to='rpps:10000000019', subject='default')\n"
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


def test_default_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDSECURE_HOME", str(tmp_path / "h"))
    assert medsecure.client.default_home() == tmp_path / "h"
    monkeypatch.delenv("MEDSECURE_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert medsecure.client.default_home() == tmp_path / "xdg" / "medsecure"


def test_status_and_audit_commands(homes: Path, tmp_path: Path) -> None:
    doc = tmp_path / "r.txt"
    doc.write_text("résultat")
    proc = run(
        [
            "send",
            str(doc),
            "--to",
            "rpps:10000000019",
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
    assert "audit log broken at record 2" in one_error_line(
        run(["audit", "verify", "--home", "alice"], homes)
    )
