"""The medsecure command for keys and envelopes, run as a real subprocess."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest


def run(
    args: list[str], cwd: Path, passphrase: str | None = "pw", **kw: object
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MEDSECURE_PASSPHRASE"}
    if passphrase is not None:
        env["MEDSECURE_PASSPHRASE"] = passphrase
    return subprocess.run(
        [sys.executable, "-m", "medsecure", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        **kw,  # type: ignore[arg-type]
    )


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("medsecure: error: ")
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    return lines[0]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    for name in ("alice", "bob", "carol"):
        proc = run(["keygen", "-o", f"{name}.key"], d)
        assert proc.returncode == 0, proc.stderr
        assert "fingerprint: ms1" in proc.stdout
        assert (d / f"{name}.key").stat().st_mode & 0o777 == 0o600
        assert run(["pubkey", f"{name}.key", "-o", f"{name}.pub"], d).returncode == 0
    assert run(["keygen", "-o", "dave.key", "--classic"], d).returncode == 0
    return d


def test_round_trip(keys: Path, tmp_path: Path) -> None:
    doc = tmp_path / "cr.pdf"
    doc.write_bytes(b"%PDF-1.7\n" + os.urandom(50_000))
    env = tmp_path / "cr.pdf.msec"
    proc = run(
        [
            "seal",
            str(doc),
            "--from",
            "alice.key",
            "--to",
            "bob.pub",
            "--to",
            "carol.pub",
            "-o",
            str(env),
        ],
        keys,
    )
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out.pdf"
    proc = run(
        ["unseal", str(env), "--key", "bob.key", "-o", str(out), "--from", "alice.pub"], keys
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == doc.read_bytes()
    # the public key may also be given as text
    text = (keys / "alice.pub").read_text().strip()
    proc = run(
        ["unseal", str(env), "--key", "carol.key", "-o", str(tmp_path / "c.pdf"), "--from", text],
        keys,
    )
    assert proc.returncode == 0 and (tmp_path / "c.pdf").read_bytes() == doc.read_bytes()
    # pubkey to stdout
    proc = run(["pubkey", "bob.key"], keys)
    assert proc.stdout.strip() == (keys / "bob.pub").read_text().strip()


def test_failures_are_one_line_and_leave_nothing(keys: Path, tmp_path: Path) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_bytes(b"resultats biologiques")
    env = tmp_path / "doc.msec"
    assert (
        run(
            ["seal", str(doc), "--from", "alice.key", "--to", "bob.pub", "-o", str(env)], keys
        ).returncode
        == 0
    )
    out = tmp_path / "out.txt"

    assert "not addressed" in one_error_line(
        run(["unseal", str(env), "--key", "carol.key", "-o", str(out)], keys)
    )
    assert "expected sender" in one_error_line(
        run(["unseal", str(env), "--key", "bob.key", "-o", str(out), "--from", "carol.pub"], keys)
    )
    bad = tmp_path / "bad.msec"
    data = bytearray(env.read_bytes())
    data[-3] ^= 1
    bad.write_bytes(bytes(data))
    assert "authentication failed" in one_error_line(
        run(["unseal", str(bad), "--key", "bob.key", "-o", str(out)], keys)
    )
    bad.write_bytes(bytes(data[:-500]))
    one_error_line(run(["unseal", str(bad), "--key", "bob.key", "-o", str(out)], keys))
    assert not out.exists()
    assert "wrong passphrase" in one_error_line(
        run(["unseal", str(env), "--key", "bob.key", "-o", str(out)], keys, passphrase="nope")
    )
    assert "MEDSECURE_PASSPHRASE" in one_error_line(
        run(["unseal", str(env), "--key", "bob.key", "-o", str(out)], keys, passphrase=None)
    )
    assert "does not exist" in one_error_line(
        run(["seal", "missing.pdf", "--from", "alice.key", "--to", "bob.pub", "-o", str(out)], keys)
    )
    assert "not a medsecure public key" in one_error_line(
        run(["seal", str(doc), "--from", "alice.key", "--to", str(doc), "-o", str(out)], keys)
    )
    one_error_line(
        run(
            [
                "seal",
                str(doc),
                "--from",
                "alice.key",
                "--to",
                "bob.pub",
                "-o",
                str(tmp_path / "no" / "dir" / "x"),
            ],
            keys,
        )
    )
    one_error_line(run(["frobnicate"], keys))
    one_error_line(run(["seal", str(doc)], keys))
    assert "already exists" in one_error_line(run(["keygen", "-o", "alice.key"], keys))
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".medsecure-")]
    assert leftovers == []


def test_downgrade_needs_flag(keys: Path, tmp_path: Path) -> None:
    doc = tmp_path / "d.txt"
    doc.write_bytes(b"x")
    proc = run(
        [
            "seal",
            str(doc),
            "--from",
            "alice.key",
            "--to",
            "dave.key",
            "-o",
            str(tmp_path / "d.msec"),
        ],
        keys,
    )
    assert "allow_classic" in one_error_line(proc)
    proc = run(
        [
            "seal",
            str(doc),
            "--from",
            "alice.key",
            "--to",
            "dave.key",
            "--allow-classic",
            "-o",
            str(tmp_path / "d.msec"),
        ],
        keys,
    )
    assert proc.returncode == 0, proc.stderr


def test_progress_bar_on_a_terminal(keys: Path, tmp_path: Path) -> None:
    doc = tmp_path / "big.bin"
    doc.write_bytes(os.urandom(6 << 20))
    master, slave = pty.openpty()
    env = dict(os.environ, MEDSECURE_PASSPHRASE="pw")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medsecure",
            "seal",
            str(doc),
            "--from",
            "alice.key",
            "--to",
            "bob.pub",
            "-o",
            str(tmp_path / "big.msec"),
        ],
        cwd=keys,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        timeout=120,
    )
    os.close(slave)
    output = b""
    try:
        while chunk := os.read(master, 4096):
            output += chunk
    except OSError:
        pass
    os.close(master)
    assert proc.returncode == 0
    assert b"sealing" in output and b"100%" in output
    # not on a terminal: no progress output at all
    proc2 = run(
        [
            "seal",
            str(doc),
            "--from",
            "alice.key",
            "--to",
            "bob.pub",
            "-o",
            str(tmp_path / "big2.msec"),
        ],
        keys,
    )
    assert proc2.returncode == 0 and proc2.stderr == ""
