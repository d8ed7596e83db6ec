"""Every example script runs and succeeds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import medsecure
from medsecure.directory import FileDirectory

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_send_folder_warns_once_per_key(tmp_path: Path) -> None:
    """Three documents to one recipient: one 'accepting key' warning for the recipient's key (and
    one for the sender's key when the recipient receives), not one per document."""
    proc = _example("send_folder.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": 01") == 3  # three documents sent
    accepting = [x for x in proc.stderr.splitlines() if "accepting key" in x]
    keys = [x.split("accepting key ")[1].split()[0] for x in accepting]
    assert len(keys) == 2 and len(set(keys)) == 2, proc.stderr


def test_there_are_examples() -> None:
    assert any(p.stem == "demo" for p in EXAMPLES)


def _example(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSECURE_")}
    env["MEDSECURE_PASSPHRASE"] = "pw"
    return subprocess.run(
        [sys.executable, str(EXAMPLES[0].parent / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_line_failure(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    # (the trust-on-first-use warning may come before it)
    errors = [x for x in proc.stderr.splitlines() if ": error: " in x]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_examples_fail_clearly_on_a_missing_folder_or_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    medsecure.init_home(
        home,
        passphrase="pw",
        me="rpps:10000005479",
        family_name="MARTIN",
        trust={"mode": "unsafe-tofu"},
    )
    line = _one_line_failure(
        _example(
            "send_folder.py",
            str(tmp_path / "missing"),
            "--to",
            "rpps:10000005479",
            "--home",
            str(home),
            cwd=tmp_path,
        )
    )
    assert "FOLDER" in line
    (tmp_path / "no-pdf").mkdir()
    line = _one_line_failure(
        _example(
            "send_folder.py",
            str(tmp_path / "no-pdf"),
            "--to",
            "rpps:10000005479",
            "--home",
            str(home),
            cwd=tmp_path,
        )
    )
    assert "no PDF" in line
    line = _one_line_failure(
        _example("receive_to_folder.py", "out", "--home", str(tmp_path / "nohome"), cwd=tmp_path)
    )
    assert "not a medsecure home" in line
    line = _one_line_failure(
        _example(
            "send_folder.py",
            str(tmp_path / "no-pdf"),
            "--to",
            "rpps:10000005479",
            "--home",
            str(tmp_path / "nohome"),
            cwd=tmp_path,
        )
    )
    assert "not a medsecure home" in line


def test_receive_to_folder_keeps_what_it_saves_private(tmp_path: Path) -> None:
    proc = _example("receive_to_folder.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # the demo runs in a temporary folder: run the function on a home of our own instead
    a, b = tmp_path / "a", tmp_path / "b"
    medsecure.init_home(
        a,
        passphrase="pw",
        me="rpps:10000005479",
        family_name="MARTIN",
        trust={"mode": "unsafe-tofu"},
    )
    medsecure.init_home(
        b,
        passphrase="pw",
        me="rpps:10000000017",
        family_name="PETIT",
        trust={"mode": "unsafe-tofu"},
    )
    da, db = FileDirectory(a / "directory.json"), FileDirectory(b / "directory.json")
    da.add(db.lookup("rpps:10000000017"))
    db.add(da.lookup("rpps:10000005479"))
    with medsecure.client_from_home(a, passphrase="pw") as client:
        client.send(
            medsecure.Document(content=b"bilan", filename="bilan.txt"), to="rpps:10000000017"
        )
    proc = _example("receive_to_folder.py", "out", "--home", str(b), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    (folder,) = out.iterdir()
    assert out.stat().st_mode & 0o777 == 0o700 and folder.stat().st_mode & 0o777 == 0o700
    assert (folder / "message.json").stat().st_mode & 0o777 == 0o600
