"""Start-up of the ``medsecure`` command: the key and envelope commands load only the core.

Each command runs for real in a fresh process; the test looks at which modules that process
loaded (never at how long it took).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import medsecure

# Parts above the core that ``seal``, ``unseal``, ``keygen`` and ``pubkey`` must not load.
ABOVE_THE_CORE = (
    "pydantic",
    "httpx",
    "httpcore",
    "medsecure._client",
    "medsecure._home",
    "medsecure._inbox",
    "medsecure._outbox",
    "medsecure.client",
    "medsecure.directory",
    "medsecure.models",
    "medsecure.identifiers",
    "medsecure.transports",
    "medsecure.trust",
    "medsecure.audit",
    "medsecure.mail",
    "medsecure.cli._client",
    "medsecure.cli._directory",
)

# Runs the real entry point, then writes its exit status and every loaded module to a file.
PROBE = """
import json, sys
from medsecure.cli import main
report, args = sys.argv[1], sys.argv[2:]
try:
    status = main(args)
except SystemExit as exc:
    status = exc.code
with open(report, "w") as fh:
    json.dump({"status": status, "modules": sorted(sys.modules)}, fh)
"""


def probe(tmp_path: Path, *args: str) -> tuple[int, list[str], str]:
    report = tmp_path / "report.json"
    env = {**os.environ, "MEDSECURE_PASSPHRASE": "pw"}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(report), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(report.read_text())
    report.unlink()
    return result["status"], result["modules"], proc.stdout + proc.stderr


def above(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == a or m.startswith(a + ".") for a in ABOVE_THE_CORE)]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    for name in ("alice", "bob"):
        identity = medsecure.Identity.generate()
        identity.save(folder / f"{name}.key", passphrase="pw", kdf_memory_kib=8 * 1024)
        (folder / f"{name}.pub").write_text(f"{identity.public}\n")
    return folder


def test_seal_and_unseal_load_only_the_core(keys: Path, tmp_path: Path) -> None:
    document = tmp_path / "report.pdf"
    document.write_bytes(b"%PDF-1.7\n" + os.urandom(100_000))
    status, modules, _ = probe(
        tmp_path,
        "seal",
        str(document),
        "--from",
        str(keys / "alice.key"),
        "--to",
        str(keys / "bob.pub"),
        "-o",
        str(tmp_path / "report.msec"),
    )
    assert status == 0
    assert above(modules) == []
    assert "medsecure.envelope._seal" in modules  # it did seal, in this process

    status, modules, output = probe(
        tmp_path,
        "unseal",
        str(tmp_path / "report.msec"),
        "--key",
        str(keys / "bob.key"),
        "--from",
        str(keys / "alice.pub"),
        "-o",
        str(tmp_path / "opened.pdf"),
    )
    assert status == 0, output
    assert above(modules) == []
    assert (tmp_path / "opened.pdf").read_bytes() == document.read_bytes()


def test_keygen_and_pubkey_load_only_the_core(tmp_path: Path) -> None:
    status, modules, output = probe(tmp_path, "keygen", "-o", str(tmp_path / "carol.key"))
    assert status == 0, output
    assert above(modules) == []
    status, modules, output = probe(tmp_path, "pubkey", str(tmp_path / "carol.key"))
    assert status == 0, output
    assert "msp1" in output
    assert above(modules) == []


@pytest.mark.parametrize("command", ["seal", "unseal", "keygen", "pubkey"])
def test_help_of_a_core_command_loads_only_the_core(tmp_path: Path, command: str) -> None:
    status, modules, output = probe(tmp_path, command, "--help")
    assert status == 0
    assert "Usage: " in output
    assert above(modules) == []


def test_every_command_is_still_listed_and_runs(tmp_path: Path) -> None:
    """Loading the other commands on demand loses none of them."""
    status, modules, output = probe(tmp_path, "--help")
    assert status == 0
    for command in ("seal", "unseal", "keygen", "pubkey", "init", "send", "receive", "directory"):
        assert f"  {command} " in output, command
    assert "medsecure.cli._client" in modules
    status, modules, output = probe(tmp_path, "send", "--help")
    assert status == 0 and "Usage: " in output
    assert "medsecure.cli._client" in modules
    status, _, output = probe(tmp_path, "directory", "--help")
    assert status == 0 and "Usage: " in output
