"""The documentation runs: every Python block of README.md and docs/*.md, and the command-line
walk-through of docs/getting-started.md, exactly as written.

A block that is deliberately not runnable is preceded, on the line just above its fence, by
``<!-- not-run: why -->``; there are only a few, each with its reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Raised from 3 to 4: besides getting-started's alternative and traceability's fragment, the
# SMTP and IMAP driver fragments of docs/mail-transport.md are marked: they need a mail server
# with TLS and a CA of its own, which a page cannot start in a few lines (aiosmtpd and dovecot are
# test tools, not runtime dependencies); tests/test_smtp.py and tests/test_imap.py run those
# calls. (Its DNS discovery block does run, against a responder the block starts.)
MAX_NOT_RUN = 4

_FENCE = re.compile(
    r"^(?:<!-- not-run: (?P<why>[^\n]*?) -->\n)?```(?P<lang>[\w-]*)\n(?P<body>.*?)^```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    body: str
    not_run: str | None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    return [
        Block(page, text.count("\n", 0, m.start("body")), m["lang"], m["body"], m["why"])
        for m in _FENCE.finditer(text)
    ]


ALL = [b for page in PAGES for b in blocks(page)]
PYTHON = [b for b in ALL if b.lang == "python"]


def clean_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a newcomer: the venv's commands first, no medsecure settings, and a
    home folder of their own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSECURE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(tmp_path)
    env.pop("XDG_DATA_HOME", None)
    return env


def test_the_pages_have_runnable_blocks() -> None:
    assert len([b for b in PYTHON if b.page.name == "README.md" and not b.not_run]) >= 2
    assert any(b.page.name == "getting-started.md" and b.lang == "sh" for b in ALL)


def test_few_blocks_are_marked_not_runnable() -> None:
    marked = [b for b in ALL if b.not_run is not None]
    assert len(marked) <= MAX_NOT_RUN, [b.name for b in marked]
    assert all(b.not_run and b.not_run.strip() for b in marked), "say why a block does not run"
    # a marker that is not right above a fence would be silently ignored
    for page in PAGES:
        assert page.read_text().count("<!-- not-run:") == len(
            [b for b in blocks(page) if b.not_run is not None]
        ), page


@pytest.mark.parametrize("block", PYTHON, ids=[b.name for b in PYTHON])
def test_python_block_runs(block: Block, tmp_path: Path) -> None:
    if block.not_run:
        pytest.skip(f"marked not-run: {block.not_run}")
    script = tmp_path / "block.py"
    script.write_text(block.body, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert proc.returncode == 0, f"{block.name}\n{proc.stdout}\n{proc.stderr}"


def getting_started_script() -> str:
    page = ROOT / "docs" / "getting-started.md"
    shell = [b for b in blocks(page) if b.lang == "sh" and not b.not_run]
    return "".join(b.body for b in shell)


def test_getting_started_runs_as_written(tmp_path: Path) -> None:
    from relaykit import RelayServer

    script = getting_started_script()
    for step in ("medsecure init", "medsecure directory add", "medsecure send", "receive"):
        assert step in script, f"the walk-through lost its {step!r} step"
    assert '--relay "$RELAY_URL"' in script and "--mail-address" in script
    medsecure_cmd = Path(sys.executable).parent / "medsecure"
    assert medsecure_cmd.exists(), "the venv has no medsecure command: pip install -e .[cli]"
    # the relay of section 8, on a free loopback port (the page's default, 8443, may be taken)
    with RelayServer(tmp_path / "test-relay.log", data=tmp_path / "test-relay") as relay:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-x", "-c", script],
            cwd=tmp_path,
            env={**clean_env(tmp_path), "RELAY_URL": relay.url},
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=600,
        )
        metrics = httpx.get(f"{relay.url}/metrics", timeout=30).text
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the message of section 8 went through the relay and was collected there
    for event in ("accepted", "acknowledged"):
        m = re.search(
            rf'^medsecure_relay_messages_total{{event="{event}"}} ([0-9.]+)', metrics, re.M
        )
        assert m and float(m.group(1)) >= 1, metrics
    (via_relay,) = (tmp_path / "received-via-relay").iterdir()
    assert (via_relay / "compte-rendu.pdf").read_bytes() == (
        tmp_path / "compte-rendu.pdf"
    ).read_bytes()
    out = proc.stdout
    assert "from Sophie MARTIN (810000005479): 1 document(s)" in out, out
    assert "identical" in out
    assert re.search(r"^  810000000017: delivered via drop", out, re.MULTILINE), out
    assert "Traceback" not in proc.stderr
    # what the page says about the files holds
    (received,) = (tmp_path / "received").iterdir()
    assert received.stat().st_mode & 0o777 == 0o700
    assert (received / "message.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "authority.key.pub").read_text().startswith("msp1")


def test_extras_split_runtime_from_development() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    runtime = set(extras) - {"all", "test", "dev"}
    (everything,) = extras["all"]  # every runtime extra, and nothing else
    assert re.fullmatch(r"medsecure\[[\w,-]+\]", everything), everything
    assert set(everything[len("medsecure[") : -1].split(",")) == runtime
    tools = {"pytest", "hypothesis", "ruff", "mypy"}
    for name in runtime:
        assert not {re.split(r"[<>=!~\[ ]", d)[0] for d in extras[name]} & tools, name
    pinned = [d for d in extras["test"] + extras["dev"] if not d.startswith("medsecure[")]
    assert tools <= {re.split(r"==", d)[0] for d in pinned}
    assert all(re.fullmatch(r"[\w.-]+(\[[\w,-]+\])?==[\w.]+", d) for d in pinned), pinned
    assert "medsecure[all,test]" in extras["dev"]
    # the two commands install what they need
    assert '_venv.sh" dev' in (ROOT / "scripts" / "check").read_text()
    assert '_venv.sh" cli' in (ROOT / "scripts" / "demo").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "./scripts/demo" in readme and "./scripts/check" in readme


def test_every_test_the_threat_model_names_exists() -> None:
    """docs/security.md backs each claim with a test name: a renamed or deleted test must not
    leave a claim pointing at nothing."""
    text = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    cited = re.findall(r"`(test_\w+\.py)::(\w+)`((?:, `::\w+`)*)", text)
    assert len(cited) > 20
    missing = []
    for file, first, more in cited:
        path = ROOT / "tests" / file
        source = path.read_text(encoding="utf-8") if path.exists() else ""
        for name in [first, *re.findall(r"::(\w+)", more)]:
            if not re.search(rf"^(async )?def {name}\(", source, re.MULTILINE):
                missing.append(f"{file}::{name}")
    assert missing == []
