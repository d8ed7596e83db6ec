"""What a newcomer tried from the documentation alone, and expected to work (or to be told).

Each test is one expectation of a first-time user (a practice-software developer embedding
medsecure, or an integrator writing shell scripts) that the documentation set up. Those still
marked ``xfail(strict=True)`` describe behaviour that needs a change in a file this branch does
not own, or a decision; their reason says what the user expected.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from relaykit import RelayServer, free_port
from test_cli_core import one_error_line, run

import medsecure

PASS = "a long passphrase"


def _init(cwd: Path, home: str, me: str, *extra: str) -> dict[str, str]:
    proc = run(["init", "--home", home, "--me", me, "--unsafe-tofu", "--json", *extra], cwd)
    assert proc.returncode == 0, proc.stderr
    info: dict[str, str] = json.loads(proc.stdout)
    return info


# --- two practitioners through a relay, with the command line only -----------------------------


def test_init_relay_lets_two_practitioners_exchange_through_a_relay(tmp_path: Path) -> None:
    """`init_home(relay=URL)` exists; the command line offers the same as `init --relay URL`,
    and `directory import` of the other's directory file brings their relay mailbox."""
    with RelayServer(tmp_path / "relay.log", data=tmp_path / "relay") as relay:
        martin = _init(tmp_path, "martin", "rpps:10000005479", "--relay", relay.url)
        _init(tmp_path, "petit", "rpps:10000000017", "--relay", relay.url)
        config = json.loads((tmp_path / "martin" / "config.json").read_text())
        assert config["transports"][0] == {"kind": "relay", "url": relay.url}
        for me, other in (("martin", "petit"), ("petit", "martin")):
            proc = run(
                [
                    "directory",
                    "import",
                    "--directory",
                    f"{me}/directory.json",
                    f"{other}/directory.json",
                ],
                tmp_path,
            )
            assert proc.returncode == 0, proc.stderr
        lookup = run(
            ["directory", "lookup", "rpps:10000005479", "--directory", "petit/directory.json"],
            tmp_path,
        )
        assert f"relay {relay.url}" in lookup.stdout and martin["fingerprint"] in lookup.stdout

        (tmp_path / "cr.pdf").write_bytes(b"%PDF-1.7\n% compte rendu (fictitious)\n")
        proc = run(
            [
                "send",
                "cr.pdf",
                "--to",
                "rpps:10000000017",
                "--receipt",
                "delivered",
                "--home",
                "martin",
                "--json",
            ],
            tmp_path,
        )
        assert proc.returncode == 0, proc.stderr
        sent = json.loads(proc.stdout)
        assert sent["recipients"][0]["endpoint"] == "relay"
        assert sent["recipients"][0]["status"] == "sent"
        # nothing went through the drop folder: the relay carried it
        assert not any((tmp_path / "petit" / "mailbox").rglob("*.msec"))

        proc = run(["receive", "--home", "petit", "-o", "received"], tmp_path)
        assert proc.returncode == 0, proc.stderr
        (folder,) = (tmp_path / "received").iterdir()
        assert (folder / "cr.pdf").read_bytes() == (tmp_path / "cr.pdf").read_bytes()

        assert run(["receive", "--home", "martin"], tmp_path).returncode == 0
        proc = run(["status", sent["message_id"], "--home", "martin", "--json"], tmp_path)
        assert json.loads(proc.stdout)[0]["status"] == "delivered", proc.stdout


def test_init_relay_refuses_what_is_not_a_relay_url(tmp_path: Path) -> None:
    line = one_error_line(
        run(
            [
                "init",
                "--home",
                "h",
                "--me",
                "rpps:10000005479",
                "--unsafe-tofu",
                "--relay",
                "relay.example",
            ],
            tmp_path,
        )
    )
    assert line.startswith("medsecure: error: --relay: ")
    assert not (tmp_path / "h").exists()


# --- mistakes on purpose: one line that names the flag and says what to do ----------------------


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("newcomer")
    _init(d, "martin", "rpps:10000005479")
    (d / "cr.pdf").write_bytes(b"%PDF-1.7\n")
    return d


def test_a_wrong_passphrase_says_where_the_passphrase_came_from(home: Path) -> None:
    """With MEDSECURE_PASSPHRASE set (as getting-started does), a wrong one must point there,
    not only at --home."""
    line = one_error_line(
        run(["send", "cr.pdf", "--to", "rpps:10000000017", "--home", "martin"], home, "wrong")
    )
    assert "wrong passphrase" in line and "MEDSECURE_PASSPHRASE" in line


@pytest.mark.parametrize(
    ("ref", "hint"),
    [
        ("rpps:1000000019", "expected 11 digits"),  # a digit missing
        ("rpp:10000000017", "unknown identifier scheme"),  # a typo in the scheme
        ("10000000017", "rpps:10000000017"),  # a bare RPPS number: say how to write it
    ],
)
def test_a_mistyped_recipient_names_to_and_how_to_write_it(home: Path, ref: str, hint: str) -> None:
    line = one_error_line(run(["send", "cr.pdf", "--to", ref, "--home", "martin"], home))
    assert line.startswith("medsecure: error: --to: "), line
    assert hint in line


def test_a_mistyped_reference_to_lookup_names_the_argument(home: Path) -> None:
    line = one_error_line(
        run(
            ["directory", "lookup", "rpps:1000000001", "--directory", "martin/directory.json"], home
        )
    )
    assert line.startswith("medsecure: error: REF: "), line


def test_an_unknown_message_id_says_where_to_find_the_ids(home: Path) -> None:
    line = one_error_line(run(["status", "01XXXXXXXXXXXXXXXXXXXXXXXX", "--home", "martin"], home))
    assert "medsecure outbox" in line


def test_pubkey_shows_the_fingerprint_to_compare(home: Path) -> None:
    """getting-started: the administrator 'checks its fingerprint with them (`medsecure pubkey
    martin/identity.key` …)'; the fingerprint is what people compare, so pubkey shows it (on
    stderr: stdout stays the key alone, for scripts)."""
    proc = run(["pubkey", "martin/identity.key"], home, passphrase=None)
    assert proc.returncode == 0, proc.stderr
    public = medsecure.PublicIdentity.from_key_file(home / "martin" / "identity.key")
    assert proc.stdout.strip() == str(public)
    assert f"fingerprint: {public.fingerprint}" in proc.stderr


def test_receive_fails_when_the_relay_is_down(tmp_path: Path) -> None:
    _init(tmp_path, "petit", "rpps:10000000017", "--relay", f"http://127.0.0.1:{free_port()}")
    proc = run(["receive", "--home", "petit"], tmp_path)
    assert proc.returncode == 75  # worth retrying later (EX_TEMPFAIL)
    assert "relay" in proc.stderr and "try again later" in proc.stderr


# --- the Python API ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "trust", [{"mode": "bogus"}, {"mode": "authority"}, {"authority": "msp1…"}]
)
def test_init_home_refuses_a_trust_section_it_cannot_use(tmp_path: Path, trust: dict) -> None:
    try:
        medsecure.init_home(tmp_path / "h", passphrase=PASS, me="rpps:10000005479", trust=trust)
    except (ValueError, medsecure.ConfigError):
        assert not (tmp_path / "h").exists()
    else:
        raise AssertionError("init_home accepted a trust section client_from_home refuses")


def test_init_home_does_not_choose_unsafe_tofu_silently(tmp_path: Path) -> None:
    try:
        medsecure.init_home(tmp_path / "h", passphrase=PASS, me="rpps:10000005479")
    except (TypeError, ValueError):
        return
    raise AssertionError("init_home chose unsafe-tofu for the caller")


def test_async_client_from_home(tmp_path: Path) -> None:
    """A vendor with an asyncio application wants the home `medsecure init` made, as
    `client_from_home` gives it to synchronous code: same keys, directory, transports, trust
    and pins."""
    for home, me in (("martin", "rpps:10000005479"), ("petit", "rpps:10000000017")):
        medsecure.init_home(tmp_path / home, passphrase=PASS, me=me, trust={"mode": "unsafe-tofu"})
    from medsecure.directory import FileDirectory

    m_dir = FileDirectory(tmp_path / "martin" / "directory.json")
    p_dir = FileDirectory(tmp_path / "petit" / "directory.json")
    m_dir.add(p_dir.lookup("rpps:10000000017"))
    p_dir.add(m_dir.lookup("rpps:10000005479"))

    async def main() -> None:
        async with medsecure.AsyncClient.from_home(tmp_path / "martin", passphrase=PASS) as c:
            result = await c.send(
                medsecure.Document(content=b"%PDF-1.7 async", filename="cr.pdf"),
                to="rpps:10000000017",
                receipts=("delivered",),
            )
        with medsecure.client_from_home(tmp_path / "petit", passphrase=PASS) as p:
            (message,) = p.receive()
            message.ack()
        async with medsecure.AsyncClient.from_home(tmp_path / "martin", passphrase=PASS) as c:
            assert await c.receive() == []
            (status,) = await c.status(result.message_id)
            assert status.status == "delivered"

    asyncio.run(main())


def test_async_client_from_home_refuses_a_missing_home(tmp_path: Path) -> None:
    with pytest.raises(medsecure.ConfigError):
        medsecure.AsyncClient.from_home(tmp_path / "nothere", passphrase=PASS)
