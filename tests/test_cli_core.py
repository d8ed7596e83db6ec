"""The medsecure command for keys and envelopes, run as a real subprocess."""

from __future__ import annotations

import contextlib
import os
import pty
import signal
import subprocess
import sys
import time
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
    line = one_error_line(proc)
    assert "--allow-classic" in line and "allow_classic" not in line
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


def seal_args(doc: Path | str, out: Path | str, *extra: str) -> list[str]:
    return ["seal", str(doc), "--from", "alice.key", "--to", "bob.pub", "-o", str(out), *extra]


def test_keygen_writes_the_public_key_beside_and_pubkey_needs_no_passphrase(
    tmp_path: Path,
) -> None:
    proc = run(["keygen", "-o", "k.key"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    pub = tmp_path / "k.key.pub"
    printed = next(x for x in proc.stdout.splitlines() if x.startswith("public key: "))
    assert pub.read_text().strip() == printed.removeprefix("public key: ")
    assert pub.stat().st_mode & 0o777 == 0o644
    # no passphrase at all: read from k.key.pub
    proc = run(["pubkey", "k.key"], tmp_path, passphrase=None)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == pub.read_text().strip()
    # a key file given where a public key is expected: the .pub beside it, no passphrase either
    doc = tmp_path / "d.txt"
    doc.write_text("x")
    # (sealing needs the sender's passphrase, not the recipient's)
    assert (
        run(["seal", str(doc), "--from", "k.key", "--to", "k.key", "-o", "d.msec"], tmp_path)
    ).returncode == 0
    # without the .pub, the key file's own public identity (format 2, in clear) is read: still
    # no passphrase
    pub.unlink()
    proc = run(["pubkey", "k.key"], tmp_path, passphrase=None)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == printed.removeprefix("public key: ")
    # keygen refuses to replace a key or its .pub without --force
    (tmp_path / "k3.key.pub").write_text("someone else's")
    assert "already exists" in one_error_line(run(["keygen", "-o", "k3.key"], tmp_path))
    assert not (tmp_path / "k3.key").exists()


def test_seal_and_unseal_refuse_an_existing_output(keys: Path, tmp_path: Path) -> None:
    doc = tmp_path / "cr.pdf"
    doc.write_bytes(b"%PDF-1.7 compte rendu")
    env = tmp_path / "cr.msec"
    env.write_bytes(b"precious")
    line = one_error_line(run(seal_args(doc, env), keys))
    assert "-o/--output" in line and "--force" in line and "cr" not in line.split("error:")[1]
    assert env.read_bytes() == b"precious"
    assert run(seal_args(doc, env, "--force"), keys).returncode == 0
    out = tmp_path / "out.pdf"
    out.write_bytes(b"yesterday's document")
    assert "already exists" in one_error_line(
        run(["unseal", str(env), "--key", "bob.key", "-o", str(out)], keys)
    )
    assert out.read_bytes() == b"yesterday's document"
    proc = run(["unseal", str(env), "--key", "bob.key", "-o", str(out), "--force"], keys)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == doc.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".medsecure-")] == []


def test_never_writes_over_what_it_reads(keys: Path, tmp_path: Path) -> None:
    doc = tmp_path / "cr.pdf"
    original = b"%PDF-1.7 the only copy"
    doc.write_bytes(original)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.pdf").symlink_to(doc)
    os.link(doc, tmp_path / "hard.pdf")
    spellings = [
        str(doc),
        f"{tmp_path}/./cr.pdf",
        f"{tmp_path}/sub/../cr.pdf",
        str(tmp_path / "link.pdf"),
        str(tmp_path / "hard.pdf"),
    ]
    for out in spellings:
        for force in ((), ("--force",)):
            line = one_error_line(run(seal_args(doc, out, *force), keys))
            assert "a file this command reads" in line, (out, force, line)
            assert doc.read_bytes() == original
    # the key files are read too
    for force in ((), ("--force",)):
        assert "reads" in one_error_line(run(seal_args(doc, "alice.key", *force), keys))
    key_before = (keys / "alice.key").read_bytes()
    assert (keys / "alice.key").read_bytes() == key_before
    # unseal: the envelope and the key
    env = tmp_path / "cr.msec"
    assert run(seal_args(doc, env), keys).returncode == 0
    sealed = env.read_bytes()
    (tmp_path / "env-link").symlink_to(env)
    for out in (str(env), str(tmp_path / "env-link"), "bob.key", f"{keys}/../{keys.name}/bob.key"):
        line = one_error_line(
            run(["unseal", str(env), "--key", "bob.key", "-o", out, "--force"], keys)
        )
        assert "a file this command reads" in line, (out, line)
    assert env.read_bytes() == sealed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".medsecure-")] == []


def test_unseal_without_from_says_the_sender_was_not_compared(keys: Path, tmp_path: Path) -> None:
    doc = tmp_path / "d.txt"
    doc.write_text("x")
    env = tmp_path / "d.msec"
    assert run(seal_args(doc, env), keys).returncode == 0
    proc = run(["unseal", str(env), "--key", "bob.key", "-o", str(tmp_path / "a")], keys)
    assert proc.returncode == 0
    assert "not compared" in proc.stderr and "--from" in proc.stderr
    fp = run(["pubkey", "alice.key"], keys)
    assert fp.returncode == 0
    proc = run(
        ["unseal", str(env), "--key", "bob.key", "-o", str(tmp_path / "b"), "--from", "alice.pub"],
        keys,
    )
    assert proc.returncode == 0 and "not compared" not in proc.stderr


def test_hostile_cases_name_the_flag_never_the_file(keys: Path, tmp_path: Path) -> None:
    secret_name = "IRM_DUPONT_Jean"
    doc = tmp_path / f"{secret_name}.pdf"
    doc.write_bytes(b"%PDF-1.7")

    def error(args: list[str]) -> str:
        line = one_error_line(run(args, keys))
        assert secret_name not in line, line
        return line

    # missing input
    line = error(seal_args(tmp_path / f"{secret_name}-missing.pdf", tmp_path / "x.msec"))
    assert "FILE" in line and "does not exist" in line
    # a folder as input
    assert "folder" in error(seal_args(tmp_path, tmp_path / "x.msec"))
    # a folder as output
    line = error(seal_args(doc, tmp_path))
    assert "-o/--output" in line and "folder" in line
    line = error(seal_args(doc, tmp_path, "--force"))
    assert "-o/--output" in line and "folder" in line
    # the output's folder is missing
    line = error(seal_args(doc, tmp_path / f"{secret_name}-dir" / "x.msec"))
    assert "-o/--output" in line and "folder does not exist" in line
    # unreadable keys: missing, a folder, not a key file
    (tmp_path / "garbage.key").write_bytes(b"MEDSECK\x01 but not really")
    for key, words in (
        (str(tmp_path / "nokey.key"), "does not exist"),
        (str(tmp_path), "not a regular file"),
        (str(doc), "not a medsecure key file"),
        (str(tmp_path / "garbage.key"), "key file"),
    ):
        line = error(
            ["seal", str(doc), "--from", key, "--to", "bob.pub", "-o", str(tmp_path / "y.msec")]
        )
        assert line.startswith("medsecure: error: --from: ") and words in line, line
        env = tmp_path / "y.msec"
        assert not env.exists()
    line = error(["seal", str(doc), "--from", "alice.key", "--to", str(doc), "-o", "z.msec"])
    assert "--to:" in line and "not a medsecure public key" in line
    line = error(["seal", str(doc), "--from", "alice.key", "--to", "nobody.pub", "-o", "z.msec"])
    assert "--to:" in line and "no such file" in line
    line = error(["unseal", str(doc), "--key", str(tmp_path), "-o", str(tmp_path / "o")])
    assert "--key" in line
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".medsecure-")] == []


def _wait_for_partial_output(folder: Path, proc: subprocess.Popen[bytes]) -> None:
    """Until the command has written part of its (temporary) output."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        partial = [p for p in folder.iterdir() if p.name.startswith(".medsecure-")]
        if partial and partial[0].stat().st_size > 0:
            return
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    raise AssertionError("the command never started writing")


@pytest.mark.parametrize("command", ["seal", "unseal"])
@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name
)
def test_a_stop_signal_leaves_no_temporary_file(
    keys: Path, tmp_path: Path, command: str, sig: signal.Signals
) -> None:
    """The input comes from a FIFO that the test keeps open, so the command is stopped in the
    middle of its work, with part of its output (for unseal: decrypted, unverified plaintext)
    already in its temporary file."""
    plain = os.urandom(6 << 20)
    if command == "unseal":
        source = tmp_path / "doc.bin"
        source.write_bytes(plain)
        env = tmp_path / "doc.msec"
        assert run(seal_args(source, env), keys).returncode == 0
        stream = env.read_bytes()
        args = ["unseal", "--key", "bob.key", "--from", "alice.pub"]
    else:
        stream = plain
        args = ["seal", "--from", "alice.key", "--to", "bob.pub"]
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "medsecure", *args, str(fifo), "-o", str(out_dir / "result")],
        cwd=keys,
        env=dict(os.environ, MEDSECURE_PASSPHRASE="pw"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    writer = os.open(fifo, os.O_WRONLY)  # waits for the command to open its input
    sent = 5 << 19  # two and a half chunks of 1 MiB: two are processed, then it waits for more
    try:
        os.write(writer, stream[:sent])
        _wait_for_partial_output(out_dir, proc)
        proc.send_signal(sig)
        # The signal may reach a worker thread while the main thread waits in read() on the
        # FIFO; Python runs the handler once that read returns (a chunk is complete), so input
        # is fed in small pieces, never up to the end of the stream, until the command stops.
        while sent < len(stream) - (1 << 20):
            try:
                proc.wait(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                with contextlib.suppress(BrokenPipeError):  # it stopped meanwhile
                    os.write(writer, stream[sent : sent + (64 << 10)])
                sent += 64 << 10
        _, stderr = proc.communicate(timeout=120)
    finally:
        os.close(writer)  # only now: an end of input must not be what stopped the command
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list(out_dir.iterdir()) == [], "a temporary or partial output was left behind"
    assert proc.returncode == 128 + sig, (proc.returncode, stderr)
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medsecure: error: "), stderr
    assert "half-written" in lines[0]
