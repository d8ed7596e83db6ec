"""``medsecure init`` with network transports, run as real subprocesses: ``--relay URL`` against
a real relay (uvicorn on loopback), the mail options against aiosmtpd and dovecot, DNS discovery
against a responder on loopback, and every misuse as one line naming the option.

The mail tests skip locally, saying why, when dovecot cannot be started; with ``CI`` set they
fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from mailservers import HOST, DnsResponder, Dovecot, Pki, Received, SmtpServer, make_pki
from relaykit import RelayServer
from test_cli_core import one_error_line, run

import medsecure
from medsecure.directory import FileDirectory
from medsecure.models import Endpoint

ALICE, BOB = "rpps:10000005479", "rpps:10000000017"
DOMAIN = "medecin.mssante.fr"
USERS = {"carol": "carol pass 1", "dave": "dave pass 1"}
SECRET = "a-mail-password-never-shown"


def init(d: Path, home: str, me: str, *extra: str) -> dict[str, object]:
    proc = run(["init", "--home", home, "--me", me, "--unsafe-tofu", "--json", *extra], d)
    assert proc.returncode == 0, proc.stderr
    info: dict[str, object] = json.loads(proc.stdout)
    return info


def introduce(d: Path, a: str, b: str) -> None:
    """Each home imports the other's directory file (key and endpoints)."""
    for me, other in ((a, b), (b, a)):
        proc = run(
            [
                "directory",
                "import",
                "--directory",
                f"{me}/directory.json",
                f"{other}/directory.json",
            ],
            d,
        )
        assert proc.returncode == 0, proc.stderr


def send(d: Path, home: str, to: str, doc: Path, *extra: str) -> dict[str, object]:
    proc = run(["send", str(doc), "--to", to, "--home", home, "--json", *extra], d)
    assert proc.returncode == 0, proc.stderr
    sent: dict[str, object] = json.loads(proc.stdout)
    return sent


def receive(d: Path, home: str, out: Path) -> list[dict[str, object]]:
    proc = run(["receive", "--home", home, "-o", str(out), "--json"], d)
    assert proc.returncode == 0, proc.stderr
    messages: list[dict[str, object]] = json.loads(proc.stdout)["messages"]
    return messages


# -- relay ------------------------------------------------------------------------------------


def test_init_relay_then_send_and_receive_through_it(tmp_path: Path) -> None:
    with RelayServer(tmp_path / "relay.log", data=tmp_path / "relay") as relay:
        a = init(tmp_path, "alice", ALICE, "--relay", relay.url, "--mailbox", "box-alice")
        b = init(tmp_path, "bob", BOB, "--relay", relay.url, "--mailbox", "box-bob")
        assert a["relay"] == {"url": relay.url, "mailbox": a["fingerprint"]}
        # the relay transport comes first; the own entry lists the relay mailbox first
        cfg = json.loads((tmp_path / "bob" / "config.json").read_text())
        assert [t["kind"] for t in cfg["transports"]] == ["relay", "drop"]
        (entry,) = FileDirectory(tmp_path / "bob" / "directory.json").all()
        assert entry.endpoints[0] == Endpoint(kind="relay", url=relay.url, mailbox=b["fingerprint"])
        assert [(e.kind, e.priority) for e in entry.endpoints] == [("relay", 0), ("drop", 1)]
        introduce(tmp_path, "alice", "bob")
        # the drop folders vanish: only the relay can carry the message and its receipt
        shutil.rmtree(tmp_path / "box-alice")
        shutil.rmtree(tmp_path / "box-bob")

        doc = tmp_path / "cr.pdf"
        doc.write_bytes(b"%PDF-1.7\n" + os.urandom(3000))
        sent = send(tmp_path, "alice", BOB, doc, "--receipt", "delivered")
        (status,) = sent["recipients"]  # type: ignore[misc]
        assert status["status"] == "sent" and status["endpoint"] == "relay"
        (msg,) = receive(tmp_path, "bob", tmp_path / "in")
        assert msg["message_id"] == sent["message_id"]
        saved = tmp_path / "in" / str(sent["message_id"]) / "cr.pdf"
        assert saved.read_bytes() == doc.read_bytes()
        assert receive(tmp_path, "alice", tmp_path / "alice-in") == []  # collects the receipt
        proc = run(["outbox", "--home", "alice", "--json"], tmp_path)
        (row,) = [r for r in json.loads(proc.stdout) if r["message_id"] == sent["message_id"]]
        assert [(s["status"], s["endpoint"]) for s in row["recipients"]] == [("delivered", "relay")]


def test_init_relay_prints_the_mailbox_and_how_correspondents_add_it(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9"  # nothing is contacted at init
    proc = run(["init", "--home", "h", "--me", ALICE, "--unsafe-tofu", "--relay", url], tmp_path)
    assert proc.returncode == 0, proc.stderr
    fingerprint = medsecure.PublicIdentity.from_text(
        (tmp_path / "h" / "identity.key.pub").read_text().strip()
    ).fingerprint
    assert f"relay: {url} (mailbox {fingerprint})" in proc.stdout
    assert f"Your mailbox on the relay {url} is {fingerprint}" in proc.stderr
    assert f"--relay {url} --relay-mailbox THEIR_FINGERPRINT" in proc.stderr
    # the command it prints works: a correspondent is added with their relay mailbox
    proc = run(
        [
            "directory",
            "add",
            "--directory",
            "h/directory.json",
            "--idnps",
            BOB,
            "--relay",
            url,
            "--relay-mailbox",
            fingerprint,
            "--mail",
            f"luc.petit@{DOMAIN}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    peer = FileDirectory(tmp_path / "h" / "directory.json").lookup(BOB)
    assert [(e.kind, e.mailbox or e.address) for e in peer.endpoints] == [
        ("relay", fingerprint),
        ("mail", f"luc.petit@{DOMAIN}"),
    ]
    line = one_error_line(
        run(
            ["directory", "add", "--directory", "h/directory.json", "--idnps", BOB, "--mail", "x"],
            tmp_path,
        )
    )
    assert line.startswith("medsecure: error: --mail: ")


# -- mail -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def dovecot(pki: Pki) -> Iterator[Dovecot]:
    from mailservers import start_dovecot

    server = start_dovecot(pki, users=USERS)
    yield server
    server.stop()


@pytest.fixture
def smtp(pki: Pki, dovecot: Dovecot) -> Iterator[SmtpServer]:
    """aiosmtpd (STARTTLS and AUTH required, DSN) delivering into the dovecot mailboxes."""
    from mailservers import empty_mailboxes, imap_append

    empty_mailboxes(dovecot)

    def deliver(received: Received) -> None:
        for rcpt in received.rcpt_tos:
            user = rcpt.split("@", 1)[0]
            if user in USERS:
                imap_append(dovecot, received.content, user=user)

    with SmtpServer(pki, users=dict(USERS), dsn=True) as server:
        server.state.deliver = deliver
        yield server


def mail_options(user: str, pki: Pki, smtp: SmtpServer, dovecot: Dovecot) -> list[str]:
    return [
        "--mail-address",
        f"{user}@{DOMAIN}",
        "--smtp",
        f"{HOST}:{smtp.port}",
        "--imap",
        f"{HOST}:{dovecot.port}",
        "--mail-security",
        "starttls",
        "--mail-user",
        user,
        "--mail-password-env",
        f"TEST_{user.upper()}_MAIL_PW",
        "--mail-ca-file",
        str(pki.ca),
        "--product-reference",
        "LGC-TEST-0001",
    ]


def test_init_mail_then_exchange_by_mail(
    pki: Pki, dovecot: Dovecot, smtp: SmtpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for user, password in USERS.items():
        monkeypatch.setenv(f"TEST_{user.upper()}_MAIL_PW", password)
    c = init(
        tmp_path,
        "carol",
        ALICE,
        "--mailbox",
        "box-carol",
        *mail_options("carol", pki, smtp, dovecot),
    )
    init(tmp_path, "dave", BOB, "--mailbox", "box-dave", *mail_options("dave", pki, smtp, dovecot))
    assert c["mail"] == {"address": f"carol@{DOMAIN}"}
    config = (tmp_path / "carol" / "config.json").read_text()
    assert "carol pass 1" not in config and "TEST_CAROL_MAIL_PW" in config
    (entry,) = FileDirectory(tmp_path / "carol" / "directory.json").all()
    # the drop folder (reachable on this machine only) is the last resort: priority 1
    assert [(e.kind, e.priority) for e in entry.endpoints] == [("drop", 1), ("mail", 0)]
    # the configuration init wrote is what the client builds its MailTransport from
    from medsecure.transports import MailTransport

    with medsecure.client_from_home(tmp_path / "carol", passphrase="pw") as client:
        (mail,) = [t for t in client.transports if isinstance(t, MailTransport)]
        assert mail.address == f"carol@{DOMAIN}" and mail.product_reference == "LGC-TEST-0001"
        assert not mail.mssante_fallback
        mail.close()

    introduce(tmp_path, "carol", "dave")
    shutil.rmtree(tmp_path / "box-carol")  # only mail can carry the message and its receipt
    shutil.rmtree(tmp_path / "box-dave")
    doc = tmp_path / "cr.pdf"
    doc.write_bytes(b"%PDF-1.7\n" + os.urandom(5000))
    sent = send(tmp_path, "carol", BOB, doc, "--receipt", "delivered")
    (status,) = sent["recipients"]  # type: ignore[misc]
    assert status["status"] == "sent" and status["endpoint"] == "mail", sent
    (wire,) = smtp.state.messages
    assert wire.login == "carol" and wire.rcpt_tos == [f"dave@{DOMAIN}"]
    assert b"X-MSS-NIL: LGC-TEST-0001" in wire.content and b"cr.pdf" not in wire.content
    assert ("PLAIN", True) in smtp.state.auth_seen or ("LOGIN", True) in smtp.state.auth_seen

    (msg,) = receive(tmp_path, "dave", tmp_path / "in")
    assert msg["message_id"] == sent["message_id"]
    assert (tmp_path / "in" / str(sent["message_id"]) / "cr.pdf").read_bytes() == doc.read_bytes()
    assert receive(tmp_path, "carol", tmp_path / "carol-in") == []  # the receipt, by mail
    proc = run(["status", str(sent["message_id"]), "--home", "carol", "--json"], tmp_path)
    (st,) = json.loads(proc.stdout)
    assert st["status"] == "delivered" and st["receipts"] == ["delivered"]


def test_init_mail_with_a_maildir_and_the_mssante_fallback(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    proc = run(
        [
            "init",
            "--home",
            "h",
            "--me",
            ALICE,
            "--unsafe-tofu",
            "--mail-address",
            f"carol@{DOMAIN}",
            "--smtp",
            "smtp.operator.example",
            "--maildir",
            str(maildir),
            "--product-reference",
            "LGC-TEST-0001",
            "--mssante-fallback",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "$MEDSECURE_MAIL_PASSWORD" in proc.stderr and "--mail THEIR_ADDRESS" in proc.stderr
    (section,) = [
        t
        for t in json.loads((tmp_path / "h" / "config.json").read_text())["transports"]
        if t["kind"] == "mail"
    ]
    assert section["maildir"] == str(maildir) and "imap" not in section
    assert section["smtp"]["password_env"] == "MEDSECURE_MAIL_PASSWORD"
    with medsecure.client_from_home(tmp_path / "h", passphrase="pw") as client:
        (mail,) = [t for t in client.transports if t.name.startswith("mail:")]
        assert getattr(mail, "mssante_fallback", False) is True
        assert client.receive() == []
    # a Maildir the mail server has not made yet: accepted, and said
    proc = run(
        [
            *("init", "--home", "h2", "--me", ALICE, "--unsafe-tofu"),
            *("--mail-address", f"carol@{DOMAIN}", "--smtp", "smtp.operator.example"),
            *("--maildir", str(tmp_path / "not-yet")),
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning: --maildir: no Maildir there yet" in proc.stderr


def test_init_mail_discover_asks_dns(pki: Pki, tmp_path: Path) -> None:
    """``--mail-discover`` finds the servers in the RFC 6186 records of the address's domain
    (a responder on loopback, named with ``--mail-dns``), each time the client starts."""
    records = {
        f"_submission._tcp.{DOMAIN}.": [(0, 1, 587, f"smtp.{DOMAIN}.")],
        f"_imaps._tcp.{DOMAIN}.": [(0, 1, 993, f"imap.{DOMAIN}.")],
        "_submissions._tcp.elsewhere.mssante.fr.": [(0, 1, 465, "smtp.other.example.")],
    }
    with DnsResponder(records) as dns:
        base = ["init", "--me", ALICE, "--unsafe-tofu", "--mail-discover"]
        dns_opt = ["--mail-dns", f"{HOST}:{dns.port}"]
        proc = run([*base, "--home", "h", "--mail-address", f"carol@{DOMAIN}", *dns_opt], tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert f"_submission._tcp.{DOMAIN}." in dns.queries
        (section,) = [
            t
            for t in json.loads((tmp_path / "h" / "config.json").read_text())["transports"]
            if t["kind"] == "mail"
        ]
        assert section["discover"] == {"nameserver": HOST, "port": dns.port}
        assert "host" not in section["smtp"] and "host" not in section["imap"]
        asked = len(dns.queries)
        with medsecure.client_from_home(tmp_path / "h", passphrase="pw") as client:
            assert any(t.name == f"mail:carol@{DOMAIN}" for t in client.transports)
        assert len(dns.queries) > asked  # asked again when the client starts
        # only a server inside the address's domain is taken
        line = one_error_line(
            run(
                [*base, "--home", "h2", "--mail-address", "x@elsewhere.mssante.fr", *dns_opt],
                tmp_path,
            )
        )
        assert "--mail-discover: no smtp server inside elsewhere.mssante.fr" in line
        assert not (tmp_path / "h2").exists()


# -- misuse -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--smtp", "smtp.example"], "--smtp"),
        (["--mssante-fallback"], "--mssante-fallback"),
        (["--mail-password-env", "X"], "--mail-password-env"),
        (["--mail-address", f"c@{DOMAIN}"], "--smtp"),
        (["--mail-address", f"c@{DOMAIN}", "--smtp", "s:99999"], "--smtp"),
        (["--mail-address", f"c@{DOMAIN}", "--smtp", "s", "--imap", "i:x"], "--imap"),
        (["--mail-address", f"c@{DOMAIN}", "--smtp", "bad host"], "--smtp"),
        (["--mail-address", "not an address", "--smtp", "s"], "--mail-address"),
        (
            ["--mail-address", f"c@{DOMAIN}", "--smtp", "s", "--imap", "i", "--maildir", "m"],
            "--maildir",
        ),
        (["--mail-address", f"c@{DOMAIN}", "--smtp", "s", "--mail-user", "a b"], "--mail-user"),
        (
            ["--mail-address", f"c@{DOMAIN}", "--smtp", "s", "--mail-password-env", SECRET],
            "--mail-password-env",
        ),
        (
            ["--mail-address", f"c@{DOMAIN}", "--smtp", "s", "--mail-ca-file", "none.pem"],
            "--mail-ca-file",
        ),
        (
            ["--mail-address", f"c@{DOMAIN}", "--smtp", "s", "--mail-ca-file", "not-a.pem"],
            "--mail-ca-file",
        ),
        (
            ["--mail-address", f"c@{DOMAIN}", "--smtp", "s", "--mssante-fallback"],
            "--mssante-fallback",
        ),
        (
            ["--mail-address", f"c@{DOMAIN}", "--smtp", "s", "--product-reference", "é"],
            "--product-reference",
        ),
        (["--mail-address", f"c@{DOMAIN}", "--smtp", "s", "--mail-dns", HOST], "--mail-dns"),
        (["--mail-address", f"c@{DOMAIN}", "--smtp", "s", "--maildir", "a-file"], "--maildir"),
        (
            ["--mail-address", f"c@{DOMAIN}", "--smtp", "s", "--mail-security", "ssl"],
            "--mail-security",
        ),
        (["--relay", "ftp://relay.example"], "--relay"),
        (["--mailbox", "a-file"], "--mailbox"),
        (["--mailbox", "a-file/box"], "--mailbox"),
        (["--relay", "relay.example"], "--relay"),
        (["--relay", "https://relay.example:99999"], "--relay"),
        (["--relay", f"https://dr-martin:{SECRET}@relay.example"], "--relay"),
        (["--relay", f"https://relay.example/?token={SECRET}"], "--relay"),
    ],
)
def test_misuse_is_one_line_naming_the_option(
    extra: list[str], flag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDSECURE_MAIL_PASSWORD", SECRET)
    (tmp_path / "not-a.pem").write_text("not a certificate\n")
    (tmp_path / "a-file").write_text("")
    proc = run(["init", "--home", "h", "--me", ALICE, "--unsafe-tofu", *extra], tmp_path)
    line = one_error_line(proc)
    assert line.startswith(f"medsecure: error: {flag}: ") or f"'{flag}'" in line, line
    assert SECRET not in proc.stderr + proc.stdout
    assert not (tmp_path / "h").exists()  # nothing was created


def test_an_rpps_number_with_a_wrong_check_digit_is_refused(tmp_path: Path) -> None:
    """rpps:10000005479 is valid (Luhn over the 11 digits); ...478 is one digit off."""
    assert run(["keygen", "-o", "me.key"], tmp_path).returncode == 0
    assert run(["pubkey", "me.key", "-o", "me.pub"], tmp_path).returncode == 0
    for argv, flag in (
        (["init", "--home", "h", "--me", "rpps:10000005478", "--unsafe-tofu"], "--me"),
        (["init", "--home", "h", "--me", "810000005478", "--unsafe-tofu"], "--me"),
        (["directory", "add", "--directory", "d.json", "--idnps", "rpps:10000005478"], "--idnps"),
        (["directory", "lookup", "rpps:10000005478", "--directory", "d.json"], "REF"),
        (
            [
                "trust",
                "sign",
                "--authority",
                "me.key",
                "--idnps",
                "rpps:10000005478",
                "--key",
                "me.pub",
            ],
            "--idnps",
        ),
    ):
        line = one_error_line(run(argv, tmp_path))
        assert line == (
            f"medsecure: error: {flag}: rpps:10000005478 is not a valid RPPS number: its last "
            "digit is not the Luhn check digit of the others (mistyped?)"
        ), line
    assert not (tmp_path / "d.json").exists() and not (tmp_path / "h").exists()
    proc = run(["init", "--home", "h", "--me", "rpps:10000005479", "--unsafe-tofu"], tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_every_rpps_in_the_docs_examples_and_tests_passes_its_check_digit() -> None:
    """Fixtures are meant to be valid numbers; the deliberately invalid ones are listed."""
    import re
    import subprocess

    from medsecure.identifiers import luhn_ok

    deliberately_invalid = {
        "10000005478",  # the test above
        "10003456789",  # tests/test_identifiers.py: reported, not enforced, by the library
        "10101201234",
    }
    root = Path(__file__).resolve().parent.parent
    names = subprocess.run(
        ["git", "ls-files", "README.md", "docs", "examples", "tests/test_cli_*.py"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    bad = {}
    for name in names:
        if not name.endswith((".md", ".py")):
            continue
        text = (root / name).read_text(encoding="utf-8")
        for number in re.findall(r"(?:rpps:|\b8)([0-9]{11})\b", text):
            if number not in deliberately_invalid and not luhn_ok(number):
                bad.setdefault(number, name)
    assert not bad, bad
