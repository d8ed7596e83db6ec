"""What a misconfigured relay endpoint looks like to its user: a wrong URL path, ``https://`` to
a plain-http relay, a clock outside the signature window (of a request or of the key bundle), a
relay URL carrying a password. Against the real relay on loopback,
through both transports, the client and the command line.

A refusal that retrying cannot change is :class:`DeliveryRejected`, said once (no retries) in
words naming what to fix; a clock problem is :class:`ClockSkew` (the outbox keeps the message:
nothing is wrong with it); the command line exits 75 only for what is worth retrying later.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from relaykit import RelayServer, message_id
from test_cli_core import run
from test_cli_init import introduce

import medsecure as m
from medsecure import DeliveryRejected, TransportUnavailable
from medsecure.models import Endpoint
from medsecure.relay import sign_request
from medsecure.transports import ClockSkew
from medsecure.trust import AuthorityPolicy

HOUR = datetime.timedelta(hours=1)
FAST = ("--rate", "1000", "--burst", "100000")
SECRET = "a-relay-password-never-shown"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("relay-errors")
    with RelayServer(root / "server.log", data=root / "data", args=FAST) as srv:
        yield srv


def _box(identity: m.Identity, url: str) -> Endpoint:
    return Endpoint(kind="relay", url=url, mailbox=identity.fingerprint)


# -- the transports --------------------------------------------------------------------------


def test_a_wrong_path_is_a_configuration_error_said_at_once(server, driver):
    """Every route of the relay answers 404 under a wrong prefix: that is not a missing
    envelope, and not worth retrying: the relay URL is wrong."""
    alice, bob = m.Identity.generate(), m.Identity.generate()
    wrong = server.url + "/wrong"
    slept: list[float] = []
    t = driver(alice, wrong, sleep=slept.append)
    with pytest.raises(DeliveryRejected) as caught:
        t.deliver(_box(bob, wrong), b"x" * 10, message_id())
    text = str(caught.value)
    assert "404" in text and "not-found" in text
    assert "relay URL" in text and "path" in text
    with pytest.raises(DeliveryRejected, match="relay URL"):
        t.list()
    assert slept == []  # nothing retried


def test_a_wrong_path_to_the_recipients_relay_only(server, driver):
    """The caller's own relay is right; the recipient's endpoint names a wrong path."""
    alice, bob = m.Identity.generate(), m.Identity.generate()
    t = driver(alice, server.url, sleep=lambda _s: None)
    assert t.list() == []
    with pytest.raises(DeliveryRejected, match=r"404 \(not-found\).*relay URL"):
        t.deliver(_box(bob, server.url + "/v2"), b"x" * 10, message_id())


def test_https_to_a_plain_http_relay_is_a_tls_mismatch(server, driver):
    alice, bob = m.Identity.generate(), m.Identity.generate()
    url = server.url.replace("http://", "https://")
    slept: list[float] = []
    t = driver(alice, url, sleep=slept.append)
    with pytest.raises(DeliveryRejected) as caught:
        t.deliver(_box(bob, url), b"x" * 10, message_id())
    text = str(caught.value)
    assert "TLS" in text and "http://" in text
    assert "refused" not in text and "unreachable" not in text
    assert "Error" not in text  # words, not library class names
    with pytest.raises(DeliveryRejected, match="TLS"):
        t.list()
    assert slept == []


def test_a_clock_outside_the_window_says_check_the_clock(server, driver, monkeypatch):
    """The relay refuses the signature's time: nothing is wrong with the message (the outbox
    keeps it: TransportUnavailable), but only setting the clock right helps."""
    import medsecure.transports._relay as relay_module

    def ahead(*args, **kw):
        return sign_request(*args, created=int(time.time()) + 3600, **kw)

    monkeypatch.setattr(relay_module, "sign_request", ahead)
    alice, bob = m.Identity.generate(), m.Identity.generate()
    slept: list[float] = []
    t = driver(alice, server.url, sleep=slept.append)
    with pytest.raises(ClockSkew) as caught:
        t.deliver(_box(bob, server.url), b"x" * 10, message_id())
    assert isinstance(caught.value, TransportUnavailable)
    assert "clock" in str(caught.value) and "signature-expired" in str(caught.value)
    assert slept == []


def test_a_key_bundle_signed_with_the_clock_ahead_says_check_the_clock(server, driver, monkeypatch):
    """The relay refuses a bundle published ahead of its clock with its own problem type (not
    a bare bad-request): the client says to check the clock. Once the clock is right, the same
    transport signs a new bundle and is served."""
    import medsecure.transports._relay as relay_module
    from medsecure.relay import sign_bundle

    def ahead(*args, **kw):
        return sign_bundle(*args, published=datetime.datetime.now(datetime.UTC) + HOUR, **kw)

    monkeypatch.setattr(relay_module, "sign_bundle", ahead)
    alice, bob = m.Identity.generate(), m.Identity.generate()
    slept: list[float] = []
    t = driver(alice, server.url, sleep=slept.append)
    with pytest.raises(ClockSkew) as caught:
        t.deliver(_box(bob, server.url), b"x" * 10, message_id())
    text = str(caught.value)
    assert "400 (bundle-time-invalid)" in text and "check this computer's clock" in text
    with pytest.raises(ClockSkew, match="bundle-time-invalid"):
        t.list()
    assert slept == []
    monkeypatch.undo()  # the clock is set right
    assert t.list() == []
    t.deliver(_box(bob, server.url), b"x" * 10, message_id())


def test_a_missing_envelope_is_still_not_found(server):
    """A 404 on a download means the envelope is gone (acknowledged elsewhere), not that the
    relay URL is wrong."""
    from medsecure.transports import Incoming, RelayTransport

    alice = m.Identity.generate()
    with RelayTransport(alice, server.url, sleep=lambda _s: None) as t:
        gone = Incoming(handle=message_id(), message_id="x", size=3)
        with pytest.raises(DeliveryRejected) as caught:
            t.fetch(gone).read()
    assert "not-found" in str(caught.value) and "relay URL" not in str(caught.value)


# -- a relay URL never carries a secret -------------------------------------------------------
# The transport's name (relay:<url>) is kept in the inbox and shown in Client.unreachable, logs
# and errors; a relay authenticates by signatures, so user information in its URL is only a
# secret about to leak. A query string or a fragment has no place in a base URL either.


def _with_password(url: str) -> str:
    return url.replace("http://", f"http://dr-martin:{SECRET}@")


def _bad_urls(url: str) -> list[str]:
    return [
        _with_password(url),
        url.replace("http://", f"http://{SECRET}@"),  # a token as the user name
        url.replace("http://", "http://@"),
        url + "/?token=" + SECRET,
        url + "/#" + SECRET,
        url + "?",
    ]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_transports_refuse_a_relay_url_with_credentials_a_query_or_a_fragment(server, kind):
    from medsecure.transports import AsyncRelayTransport, RelayTransport

    cls = {"sync": RelayTransport, "async": AsyncRelayTransport}[kind]
    alice = m.Identity.generate()
    for url in _bad_urls(server.url):
        with pytest.raises(ValueError) as caught:
            cls(alice, url)
        assert SECRET not in str(caught.value), url
    with pytest.raises(ValueError, match="user name or password"):
        cls(alice, _with_password(server.url))
    with pytest.raises(ValueError, match="query string or fragment"):
        cls(alice, server.url + "?a=b")


def test_a_recipients_relay_endpoint_with_credentials_is_refused(server, driver):
    """An endpoint from a directory names a URL with a password: refused without sending
    anything there, and without repeating it."""
    alice, bob = m.Identity.generate(), m.Identity.generate()
    t = driver(alice, server.url, sleep=lambda _s: None)
    with pytest.raises(DeliveryRejected) as caught:
        t.deliver(_box(bob, _with_password(server.url)), b"x" * 10, message_id())
    assert SECRET not in str(caught.value)


def test_init_home_refuses_a_relay_url_with_credentials(server, tmp_path):
    for url in _bad_urls(server.url):
        with pytest.raises(m.ConfigError) as caught:
            m.init_home(
                tmp_path / "h",
                passphrase="pw",
                me="rpps:10000005479",
                trust={"mode": "unsafe-tofu"},
                relay=url,
            )
        assert SECRET not in str(caught.value)
        assert not (tmp_path / "h").exists()  # nothing was created


def test_a_hand_edited_home_with_credentials_in_the_relay_url_is_refused(server, tmp_path):
    """Refused when the home is loaded (a ConfigError, one line from the command line), never
    repeating the password."""
    home = tmp_path / "h"
    m.init_home(
        home,
        passphrase="pw",
        me="rpps:10000005479",
        trust={"mode": "unsafe-tofu"},
        relay=server.url,
    )
    cfg = json.loads((home / "config.json").read_text())
    assert cfg["transports"][0] == {"kind": "relay", "url": server.url}
    cfg["transports"][0]["url"] = _with_password(server.url)
    (home / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(m.ConfigError, match="user name or password") as caught:
        m.client_from_home(home, passphrase="pw")
    assert SECRET not in str(caught.value)
    proc = run(["receive", "--home", "h"], tmp_path)
    line = _error_line(proc)
    assert "user name or password" in line
    assert SECRET not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_init_refuses_a_relay_url_with_credentials(server, tmp_path):
    for url in _bad_urls(server.url):
        proc = run(
            ["init", "--home", "h", "--me", "rpps:10000005479", "--unsafe-tofu", "--relay", url],
            tmp_path,
        )
        line = _error_line(proc)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert line.startswith("medsecure: error: --relay: "), line
        assert SECRET not in proc.stderr + proc.stdout
        assert not (tmp_path / "h").exists()
    proc = run(
        [
            "init",
            "--home",
            "h",
            "--me",
            "rpps:10000005479",
            "--unsafe-tofu",
            "--relay",
            _with_password(server.url),
        ],
        tmp_path,
    )
    assert "user name or password" in proc.stderr


def test_cli_directory_add_refuses_a_relay_url_with_credentials(server, tmp_path):
    """A correspondent's relay endpoint goes into a directory file that is shared."""
    add = ["directory", "add", "--directory", "d.json", "--idnps", "rpps:10000000017"]
    mailbox = ["--relay-mailbox", m.Identity.generate().fingerprint]
    for url in _bad_urls(server.url):
        proc = run([*add, "--relay", url, *mailbox], tmp_path)
        line = _error_line(proc)
        assert line.startswith("medsecure: error: --relay: "), line
        assert SECRET not in proc.stderr + proc.stdout
        assert not (tmp_path / "d.json").exists()
    assert run([*add, "--relay", server.url, *mailbox], tmp_path).returncode == 0


# -- the client: the outbox records why an endpoint was skipped ------------------------------


@contextlib.contextmanager
def _falling_back(tmp_path: Path, *, bob_relay: str, own_relay: str) -> Iterator[tuple[Any, Any]]:
    """Alice's client (her relay at ``own_relay``, her drop folder) and Bob, whose directory
    entry lists a relay endpoint at ``bob_relay`` first and his drop folder second."""
    from clientkit import entry, party

    from medsecure.directory import MemoryDirectory
    from medsecure.transports import FileTransport, RelayTransport

    authority = m.Identity.generate()
    alice = party(tmp_path, "alice", "810000000017")
    bob = party(tmp_path, "bob", "810000005479")
    drop = Endpoint(kind="drop", path=str(bob.box), priority=1)
    directory = MemoryDirectory(
        [
            entry(authority, alice),
            entry(authority, bob, endpoints=(_box(bob.identity, bob_relay), drop)),
        ]
    )
    relay = RelayTransport(alice.identity, own_relay, sleep=lambda _s: None)
    with (
        relay,
        m.Client(
            alice.identity,
            directory,
            [relay, FileTransport(alice.box)],
            alice.home,
            trust=AuthorityPolicy([authority.public]),
            me=alice.idnps,
        ) as c,
    ):
        yield c, bob


def test_the_outbox_records_why_the_relay_endpoint_was_skipped(server, tmp_path):
    """A refused relay endpoint is skipped for the next one (the drop folder), and the
    recipient's status says why (never what the message held)."""
    from medsecure.transports import FileTransport

    wrong = server.url + "/wrong"
    with _falling_back(tmp_path, bob_relay=wrong, own_relay=wrong) as (c, bob):
        doc = m.Document(content=b"compte rendu", media_type="text/plain")
        result = c.send([doc], to=[bob.ref])
        (status,) = result.recipients
        assert (status.status, status.endpoint, status.error) == ("sent", "drop", None)
        (why,) = status.skipped
        assert why.startswith(f"relay {wrong}: ") and "404 (not-found)" in why
        assert "compte rendu" not in why
        (out,) = c.outbox()
        assert out.recipients[0].skipped == (why,)
        assert c.status(result.message_id)[0].skipped == (why,)
    assert any(FileTransport(bob.box).list())


@pytest.mark.parametrize("bad", ["password", "port"])
def test_a_relay_endpoint_with_a_password_or_no_port_is_skipped_quietly(server, tmp_path, bad):
    """A directory entry's relay endpoint with user information, or a port out of range: the
    send goes on to the drop folder, and the note on the skipped endpoint neither repeats the
    password nor fails on the port."""
    url = _with_password(server.url) if bad == "password" else "http://127.0.0.1:99999"
    with _falling_back(tmp_path, bob_relay=url, own_relay=server.url) as (c, bob):
        result = c.send([m.Document(content=b"cr", media_type="text/plain")], to=[bob.ref])
        (status,) = result.recipients
        assert (status.status, status.endpoint) == ("sent", "drop")
        (why,) = status.skipped
        assert why.startswith("relay http://127.0.0.1") and "malformed URL" in why
        assert SECRET not in why and "dr-martin" not in why


# -- the command line ------------------------------------------------------------------------


def _error_line(proc) -> str:
    """The error ``receive`` ends with (after its count of messages read, on stderr too)."""
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout
    *_, line = proc.stderr.strip().splitlines()
    assert line.startswith("medsecure: error: ")
    return line


def _init(cwd: Path, home: str, me: str, relay: str) -> dict[str, str]:
    proc = run(
        ["init", "--home", home, "--me", me, "--unsafe-tofu", "--json", "--relay", relay], cwd
    )
    assert proc.returncode == 0, proc.stderr
    info: dict[str, str] = json.loads(proc.stdout)
    return info


def test_cli_with_a_wrong_relay_path(server, tmp_path):
    """The newcomer's report: ``init --relay http://127.0.0.1:PORT/wrong`` on both homes."""
    wrong = server.url + "/wrong"
    _init(tmp_path, "martin", "rpps:10000005479", wrong)
    _init(tmp_path, "petit", "rpps:10000000017", wrong)
    introduce(tmp_path, "martin", "petit")
    (tmp_path / "cr.pdf").write_bytes(b"%PDF-1.7\n% compte rendu (fictitious)\n")

    # send falls back to the drop folder, and says why the relay was skipped
    proc = run(["send", "cr.pdf", "--to", "rpps:10000000017", "--home", "martin"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "sent via drop" in proc.stdout
    assert f"relay {wrong}" in proc.stdout and "404 (not-found)" in proc.stdout
    proc = run(
        ["send", "cr.pdf", "--to", "rpps:10000000017", "--home", "martin", "--json"], tmp_path
    )
    (status,) = json.loads(proc.stdout)["recipients"]
    assert (status["endpoint"], status["status"], status["error"]) == ("drop", "sent", None)
    (why,) = status["skipped"]
    assert why.startswith(f"relay {wrong}: ") and "relay URL" in why

    listing = run(["outbox", "--home", "martin"], tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert f"skipped relay {wrong}" in listing.stdout
    (entry, _) = json.loads(run(["outbox", "--home", "martin", "--json"], tmp_path).stdout)
    assert entry["recipients"][0]["skipped"] == [why]

    # receive: the drop folder is read; the relay is a configuration error, not "try again
    # later"
    proc = run(["receive", "--home", "petit"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    count, line = proc.stderr.strip().splitlines()
    assert count == "2 message(s)" and line.startswith("medsecure: error: ")
    assert wrong in line and "404 (not-found)" in line and "relay URL" in line
    assert "try again later" not in line


def test_cli_receive_over_https_from_a_plain_http_relay(server, tmp_path):
    url = server.url.replace("http://", "https://")
    _init(tmp_path, "petit", "rpps:10000000017", url)
    proc = run(["receive", "--home", "petit"], tmp_path)
    line = _error_line(proc)
    assert proc.returncode == 1
    assert "TLS" in line and url in line
    assert "connection refused" not in line and "try again later" not in line


def test_cli_receive_with_the_clock_off(server, tmp_path, monkeypatch, capsys):
    """In-process (the clock is moved by replacing the transport's signing)."""
    import medsecure.transports._relay as relay_module
    from medsecure.cli import main

    _init(tmp_path, "petit", "rpps:10000000017", server.url)

    def ahead(*args, **kw):
        return sign_request(*args, created=int(time.time()) + 3600, **kw)

    monkeypatch.setattr(relay_module, "sign_request", ahead)
    monkeypatch.setenv("MEDSECURE_PASSPHRASE", "pw")
    code = main(["receive", "--home", str(tmp_path / "petit")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1, err
    line = err[-1]
    assert line.startswith("medsecure: error: ") and "check this computer's clock" in line
    assert "try again later" not in line
