"""ImapMailbox against dovecot on loopback (a throwaway configuration started by the fixture),
MaildirFolder on dovecot's Maildir and on hostile folders, the SMTP → IMAP path, and RFC 6186
discovery against a DNS responder on loopback.

Locally these tests skip, saying why, when dovecot cannot be started; with ``CI`` set they fail.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from mailservers import (
    HOST,
    DnsResponder,
    Dovecot,
    HostileImap,
    Pki,
    Received,
    SmtpServer,
    empty_mailboxes,
    imap_admin,
    imap_append,
    make_pki,
    start_dovecot,
)

from medsecure import StorageError, TransportError, TransportUnavailable
from medsecure.mail._config import MailItem, MailServer, discover
from medsecure.mail._imap import ImapMailbox, imap_utf7
from medsecure.mail._maildir import MaildirFolder
from medsecure.mail._smtp import SmtpSubmitter


def message(n: int, body: bytes = b"") -> bytes:
    return (
        f"From: <a@mail.test>\r\nTo: <bob@mail.test>\r\nSubject: n{n}\r\n"
        f"Message-ID: <m{n}@mail.test>\r\n\r\nbody {n}\r\n"
    ).encode() + body


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def dovecot(pki: Pki) -> Iterator[Dovecot]:
    server = start_dovecot(pki)
    yield server
    server.stop()


@pytest.fixture
def fresh(dovecot: Dovecot) -> Dovecot:
    """The module's dovecot with an empty INBOX and no other folder."""
    empty_mailboxes(dovecot)
    return dovecot


def settings(server: Dovecot, **kwargs: object) -> MailServer:
    base: dict[str, object] = {
        "host": HOST,
        "port": server.ssl_port,
        "security": "tls",
        "username": server.USER,
        "password": lambda: server.PASSWORD,
        "ca_file": str(server.pki.ca),
        "timeout": 30.0,
    }
    base.update(kwargs)
    return MailServer(**base)  # type: ignore[arg-type]


def flags_of(server: Dovecot, folder: str = "INBOX") -> list[tuple[str, set[str]]]:
    """(UID, flags) of each message (\\Recent depends on the session: left out)."""
    with imap_admin(server) as imap:
        imap.select(f'"{folder}"', readonly=True)
        _, data = imap.uid("FETCH", "1:*", "(FLAGS)")
        imap.logout()
    out = []
    for d in data:
        m = re.search(r"UID (\d+) FLAGS \(([^)]*)\)", d.decode()) if isinstance(d, bytes) else None
        if m:
            out.append((m.group(1), set(m.group(2).split()) - {"\\Recent"}))
    return out


def contents_of(server: Dovecot, folder: str) -> list[bytes]:
    with imap_admin(server) as imap:
        imap.select(f'"{folder}"', readonly=True)
        _, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[])")
        imap.logout()
    return [d[1] for d in data if isinstance(d, tuple)]


# -- list, peek, fetch --------------------------------------------------------------------------


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_list_peek_fetch(fresh: Dovecot, security: str) -> None:
    msgs = [message(i) for i in range(3)]
    for m in msgs:
        imap_append(fresh, m)
    port = fresh.ssl_port if security == "tls" else fresh.port
    with ImapMailbox(settings(fresh, port=port, security=security)) as box:
        items = box.list()
        assert [i.size for i in items] == [len(m) for m in msgs]
        assert box.uidvalidity is not None
        assert all(i.handle.startswith(f"imap:{box.uidvalidity}:") for i in items)
        head = box.headers(items[1])
        assert head == msgs[1].split(b"\r\n\r\n")[0] + b"\r\n\r\n"
        with box.fetch(items[2]) as f:
            assert f.read() == msgs[2]
        listed = box.list(headers=True)
        assert [i.header for i in listed] == [m.split(b"\r\n\r\n")[0] + b"\r\n\r\n" for m in msgs]
        assert box.connections == 1
    # Peeking and fetching left every message unread.
    assert all(b"\\Seen" not in line for line in flags_of(fresh))


def test_large_message_is_fetched_in_parts_in_bounded_memory(fresh: Dovecot) -> None:
    # One 3 MB line and 20 MiB in all: beyond imaplib's 1,000,000-byte line limit and far beyond
    # the 256 KiB parts asked for.
    body = b"x" * 3_000_000 + b"\r\n" + (b"y" * 998 + b"\r\n") * (17 << 10)
    data = message(1, body)
    imap_append(fresh, data)
    digest = hashlib.sha256(data).hexdigest()
    del body
    with ImapMailbox(settings(fresh), chunk_size=256 << 10) as box:
        [item] = box.list()
        out = io.BytesIO()
        sink = hashlib.sha256()

        class Hashing(io.RawIOBase):
            size = 0

            def writable(self) -> bool:
                return True

            def write(self, b: bytes) -> int:  # type: ignore[override]
                sink.update(b)
                self.size += len(b)
                return len(b)

        target = Hashing()
        tracemalloc.start()
        try:
            size = box.fetch_to(item, target)  # type: ignore[arg-type]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert size == len(data) == target.size
        assert sink.hexdigest() == digest
        assert peak < 2 << 20, peak
        box.fetch_to(item, out)
        assert hashlib.sha256(out.getvalue()).hexdigest() == digest


def test_max_message_size(fresh: Dovecot) -> None:
    imap_append(fresh, message(1, b"z" * 100_000))
    with ImapMailbox(settings(fresh), chunk_size=16384, max_message_size=50_000) as box:
        [item] = box.list()
        out = io.BytesIO(b"")
        with pytest.raises(TransportError, match="larger"):
            box.fetch_to(item, out)
        assert out.getvalue() == b""  # no partial copy left behind


def test_after_uid_lists_only_newer_messages(fresh: Dovecot) -> None:
    for i in range(3):
        imap_append(fresh, message(i))
    with ImapMailbox(settings(fresh)) as box:
        items = box.list()
        last = int(items[-1].handle.rsplit(":", 1)[1])
        assert box.list(after_uid=last) == []  # "N:*" returns the last message: filtered
        imap_append(fresh, message(9))
        [new] = box.list(after_uid=last)
        with box.fetch(new) as f:
            assert f.read() == message(9)
        two = box.list(limit=2, headers=True)
        assert [i.header for i in two] == [
            message(i).split(b"\r\n\r\n")[0] + b"\r\n\r\n" for i in (0, 1)
        ]


def test_empty_folder(fresh: Dovecot) -> None:
    with ImapMailbox(settings(fresh)) as box:
        assert box.list() == []


# -- move and leave the others alone ----------------------------------------------------------


def test_move_processed_and_leave_the_others_untouched(fresh: Dovecot) -> None:
    msgs = [message(i) for i in range(4)]
    for m in msgs:
        imap_append(fresh, m, flags="\\Flagged" if m == msgs[3] else "")
    before = flags_of(fresh)
    with ImapMailbox(settings(fresh)) as box:
        items = box.list()
        box.move(items[1], "Medsecure-processed")
        box.move(items[1], "Medsecure-processed")  # already gone: nothing happens
        assert [i.handle for i in box.list()] == [items[0].handle, *[i.handle for i in items[2:]]]
    assert contents_of(fresh, "Medsecure-processed") == [msgs[1]]
    assert contents_of(fresh, "INBOX") == [msgs[0], msgs[2], msgs[3]]
    after = flags_of(fresh)
    assert after == [before[0], before[2], before[3]]  # flags of the others unchanged


def test_move_without_the_move_extension_expunges_only_that_message(pki: Pki) -> None:
    caps = "IMAP4rev1 SASL-IR LITERAL+ UIDPLUS IDLE NAMESPACE UNSELECT CHILDREN"
    server = start_dovecot(pki, extra=f"imap_capability = {caps}")
    try:
        msgs = [message(i) for i in range(3)]
        for m in msgs:
            imap_append(server, m)
        # Another client flagged message 0 \Deleted without expunging: it must survive.
        with imap_admin(server) as imap:
            imap.select("INBOX")
            imap.uid("STORE", "1", "+FLAGS.SILENT", "(\\Deleted)")
            imap.logout()
        with ImapMailbox(settings(server)) as box:
            items = box.list()
            assert "MOVE" not in box._caps and "UIDPLUS" in box._caps
            assert len(items) == 2  # the \Deleted one is not offered
            box.move(items[0], "Processed")
        assert contents_of(server, "Processed") == [msgs[1]]
        assert contents_of(server, "INBOX") == [msgs[0], msgs[2]]
    finally:
        server.stop()


def test_malformed_messages_are_never_lost(fresh: Dovecot) -> None:
    broken = [
        b"this is not a mail header at all\r\n\x01\x02\xff\xfe binary\r\n",
        b'Content-Type: multipart/mixed; boundary="never-closed"\r\n\r\n--never-closed\r\n'
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"!!!! not base64 ####\r\n",
        b"Subject: =?utf-8?B?broken?=\xe9\r\nX-Long: " + b"h" * 5000 + b"\r\n\r\nbody\r\n",
    ]
    for m in broken:
        imap_append(fresh, m)
    with ImapMailbox(settings(fresh)) as box:
        items = box.list(headers=True)
        assert len(items) == 3
        for item, m in zip(items, broken, strict=True):
            with box.fetch(item) as f:
                assert f.read() == m
        box.move(items[1], "Quarantine")  # what a caller does with one it cannot read
    assert contents_of(fresh, "Quarantine") == [broken[1]]
    assert contents_of(fresh, "INBOX") == [broken[0], broken[2]]


def test_uidvalidity_change_refuses_stale_items(fresh: Dovecot) -> None:
    imap_append(fresh, message(1), folder="Inbound")
    with ImapMailbox(settings(fresh), folder="Inbound") as box:
        [old] = box.list()
        first = box.uidvalidity
        with imap_admin(fresh) as imap:
            imap.delete("Inbound")
            imap.logout()
        imap_append(fresh, message(2), folder="Inbound")
        with pytest.raises(TransportError, match="UIDVALIDITY"):
            box.fetch(old)
        with pytest.raises(TransportError, match="UIDVALIDITY"):
            box.move(old, "Processed")
        [new] = box.list()
        assert box.uidvalidity != first
        with box.fetch(new) as f:
            assert f.read() == message(2)


def test_reconnects_after_the_connection_dropped(fresh: Dovecot) -> None:
    imap_append(fresh, message(1))
    with ImapMailbox(settings(fresh)) as box:
        assert len(box.list()) == 1
        assert box._conn is not None
        box._conn.sock.shutdown(socket.SHUT_RDWR)
        assert len(box.list()) == 1
        assert box.connections == 2


def test_non_ascii_folder_names(fresh: Dovecot) -> None:
    assert imap_utf7("Traités") == "Trait&AOk-s"
    assert imap_utf7("~peter/mail/台北/日本語") == "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    assert imap_utf7("a&b") == "a&-b"
    imap_append(fresh, message(1))
    with ImapMailbox(settings(fresh)) as box:
        [item] = box.list()
        box.move(item, "Traités")
    assert contents_of(fresh, imap_utf7("Traités")) == [message(1)]
    with pytest.raises(ValueError):
        ImapMailbox(settings(fresh), folder="bad\r\nname")


# -- authentication and TLS ---------------------------------------------------------------------


def test_xoauth2(fresh: Dovecot) -> None:
    calls: list[int] = []

    def token() -> str:
        calls.append(1)
        return fresh.TOKEN

    conf = settings(fresh, username=fresh.APP_USER, password=None, oauth_token=token)
    with ImapMailbox(conf) as box:
        assert box.list() == []
    assert calls == [1]
    bad = settings(fresh, username=fresh.APP_USER, password=None, oauth_token=lambda: "expired-1")
    with ImapMailbox(bad) as box, pytest.raises(TransportError) as info:
        box.list()
    assert "expired-1" not in str(info.value)


def test_wrong_password(fresh: Dovecot) -> None:
    with (
        ImapMailbox(settings(fresh, password=lambda: "not the password 7")) as box,
        pytest.raises(TransportError, match="refused the credentials") as info,
    ):
        box.list()
    assert not isinstance(info.value, TransportUnavailable)
    assert "not the password 7" not in str(info.value)


def test_unknown_ca_is_refused(fresh: Dovecot, tmp_path: Path) -> None:
    stranger = make_pki(tmp_path / "other-ca")
    for security, port in (("tls", fresh.ssl_port), ("starttls", fresh.port)):
        conf = settings(fresh, security=security, port=port, ca_file=str(stranger.ca))
        with ImapMailbox(conf) as box, pytest.raises(TransportError, match="certificate"):
            box.list()


def test_server_without_starttls_is_refused_before_login(pki: Pki) -> None:
    server = start_dovecot(pki, extra="ssl = no\ndisable_plaintext_auth = no")
    try:
        with (
            ImapMailbox(settings(server, port=server.port, security="starttls")) as box,
            pytest.raises(TransportError, match="does not offer STARTTLS"),
        ):
            box.list()
        log = server.log()
        assert "Login:" not in log and "auth failed" not in log
        assert "no auth attempts" in log
    finally:
        server.stop()


def test_hostile_server_cannot_make_the_client_allocate(pki: Pki) -> None:
    with HostileImap(pki) as hostile:
        conf = MailServer(
            host=HOST,
            port=hostile.port,
            security="tls",
            username="u",
            password=lambda: "p",
            ca_file=str(pki.ca),
            timeout=10,
        )
        with ImapMailbox(conf, chunk_size=65536) as box:
            [item] = box.list()
            tracemalloc.start()
            try:
                with pytest.raises(TransportError, match="literal larger") as info:
                    box.fetch_to(item, io.BytesIO())
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
    assert not isinstance(info.value, TransportUnavailable)  # not worth retrying as such
    assert peak < 1 << 20


def test_nothing_listening_is_transient(pki: Pki) -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    conf = MailServer(host=HOST, port=port, security="tls", ca_file=str(pki.ca), timeout=5)
    with ImapMailbox(conf) as box, pytest.raises(TransportUnavailable):
        box.list()


def test_items_of_other_drivers_are_misuse(fresh: Dovecot) -> None:
    with ImapMailbox(settings(fresh)) as box:
        box.list()
        with pytest.raises(ValueError):
            box.fetch(MailItem(handle="maildir:new/x"))


# -- SMTP to IMAP ---------------------------------------------------------------------------------


def test_smtp_to_imap(fresh: Dovecot, pki: Pki) -> None:
    def deliver(received: Received) -> None:
        imap_append(fresh, received.content)

    sent = b"From: <a@mail.test>\nTo: <bob@mail.test>\nSubject: hop\n\n.dot line\nend\n"
    with SmtpServer(pki) as smtp:
        smtp.state.deliver = deliver
        conf = MailServer(
            host=HOST,
            port=smtp.port,
            username="alice",
            password=lambda: "correct horse",
            ca_file=str(pki.ca),
        )
        with SmtpSubmitter(conf) as sub:
            sub.submit(io.BytesIO(sent), sender="a@mail.test", recipients=["bob@mail.test"])
    with ImapMailbox(settings(fresh)) as box:
        [item] = box.list()
        with box.fetch(item) as f:
            assert f.read() == sent.replace(b"\n", b"\r\n")
        box.move(item, "Processed")
        assert box.list() == []


# -- Maildir ----------------------------------------------------------------------------------------


def test_maildir_reads_what_dovecot_delivered(fresh: Dovecot) -> None:
    msgs = [message(i) for i in range(3)]
    for m in msgs:
        imap_append(fresh, m)
    folder = MaildirFolder(fresh.maildir)
    items = folder.list(headers=True)
    assert len(items) == 3
    got = {}
    for item in items:
        with folder.fetch(item) as f:
            got[item.handle] = f.read()
    # dovecot stores Maildir files with LF line ends (it gives CRLF back over IMAP).
    assert sorted(got.values()) == sorted(m.replace(b"\r\n", b"\n") for m in msgs)
    # The destination is the server's own folder (made by dovecot, owned by the mail user).
    with imap_admin(fresh) as imap:
        imap.create('"Processed"')
    folder.move(items[0], folder.subfolder("Processed"))
    assert len(contents_of(fresh, "Processed")) == 1
    assert len(contents_of(fresh, "INBOX")) == 2


def _maildir_with(tmp_path: Path, names: dict[str, bytes]) -> MaildirFolder:
    root = MaildirFolder.prepare(tmp_path / "Maildir")
    for name, data in names.items():
        (root / name).write_bytes(data)
    return MaildirFolder(root)


def test_maildir_list_fetch_move(tmp_path: Path) -> None:
    folder = _maildir_with(
        tmp_path,
        {"new/1.a.host": message(1), "cur/2.b.host:2,S": message(2), "tmp/3.c.host": b"partial"},
    )
    items = folder.list()
    assert sorted(i.handle for i in items) == ["maildir:cur/2.b.host:2,S", "maildir:new/1.a.host"]
    new = next(i for i in items if "new/" in i.handle)
    # A mail client renames new/ to cur/ between listing and reading: still found.
    os.rename(folder.path / "new/1.a.host", folder.path / "cur/1.a.host:2,S")
    assert folder.headers(new).startswith(b"From: ")
    out = io.BytesIO()
    assert folder.fetch_to(new, out) == len(message(1))
    dest = folder.subfolder("Processed")
    folder.move(new, dest)
    folder.move(new, dest)  # gone already: nothing happens
    assert (dest / "cur/1.a.host:2,S").read_bytes() == message(1)
    assert [i.handle for i in folder.list()] == ["maildir:cur/2.b.host:2,S"]
    assert (folder.path / "tmp/3.c.host").exists()  # never touched


def test_maildir_refuses_links_and_special_files(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not for mail readers")
    folder = _maildir_with(tmp_path, {"new/ok.host": message(1)})
    os.symlink(secret, folder.path / "new/link.host")
    os.mkfifo(folder.path / "new/fifo.host")
    (folder.path / "new/dir.host").mkdir()
    assert [i.handle for i in folder.list()] == ["maildir:new/ok.host"]
    with pytest.raises(TransportError, match="symbolic link"):
        folder.fetch(MailItem(handle="maildir:new/link.host"))
    with pytest.raises(TransportError, match="not a regular file"):
        folder.fetch(MailItem(handle="maildir:new/fifo.host"))  # returns at once, no block
    with pytest.raises(ValueError):
        folder.fetch(MailItem(handle="maildir:new/../../secret.txt"))
    with pytest.raises(ValueError):
        folder.fetch(MailItem(handle="imap:1:2"))
    with pytest.raises(TransportError, match="not a regular file"):
        folder.move(MailItem(handle="maildir:new/link.host"), folder.subfolder("P"))
    assert os.path.islink(folder.path / "new/link.host")  # a link is never moved either


def test_maildir_write_failure_is_storage_error(tmp_path: Path) -> None:
    folder = _maildir_with(tmp_path, {"new/1.host": message(1)})

    class Full(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, b: bytes) -> int:  # type: ignore[override]
            raise OSError(28, "No space left on device")

    with pytest.raises(StorageError):
        folder.fetch_to(folder.list()[0], Full())  # type: ignore[arg-type]


# -- RFC 6186 discovery --------------------------------------------------------------------------


def test_discover_srv_records() -> None:
    records = {
        "_submissions._tcp.mssante.test.": [(10, 0, 465, "smtp.mssante.test.")],
        "_submission._tcp.mssante.test.": [
            (20, 10, 587, "backup.mssante.test."),
            (10, 5, 587, "submit.operator.example."),
            (10, 50, 587, "submit.mssante.test."),
        ],
        "_imaps._tcp.mssante.test.": [(0, 0, 0, ".")],  # explicitly not offered
        "_imap._tcp.mssante.test.": [(5, 0, 143, "imap.mssante.test.")],
    }
    with DnsResponder(records) as dns:
        found = discover("mssante.test", nameserver=(HOST, dns.port), timeout=2)
    assert [(d.protocol, d.host, d.port, d.security, d.in_domain) for d in found] == [
        ("smtp", "smtp.mssante.test", 465, "tls", True),
        ("smtp", "submit.mssante.test", 587, "starttls", True),
        ("smtp", "submit.operator.example", 587, "starttls", False),
        ("smtp", "backup.mssante.test", 587, "starttls", True),
        ("imap", "imap.mssante.test", 143, "starttls", True),
    ]
    conf = found[0].settings(username="u", password_env="X_PASSWORD")
    assert (conf.host, conf.port_for("smtp"), conf.security) == ("smtp.mssante.test", 465, "tls")


def test_discover_nothing_and_dns_failure() -> None:
    with DnsResponder({}) as dns:
        assert discover("nothing.test", nameserver=(HOST, dns.port), timeout=2) == []
        assert "_submission._tcp.nothing.test." in dns.queries
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((HOST, 0))  # a "server" that never answers
        with pytest.raises(TransportUnavailable):
            discover("x.test", nameserver=(HOST, silent.getsockname()[1]), timeout=0.5)
    with pytest.raises(ValueError):
        discover("not a domain")
