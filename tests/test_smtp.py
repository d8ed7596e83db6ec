"""SmtpSubmitter against aiosmtpd on loopback (STARTTLS or implicit TLS, AUTH required, a test CA
made here), plus the DATA encoder on its own."""

from __future__ import annotations

import base64
import hashlib
import io
import socket
import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailservers import HOST, Pki, SmtpServer, make_pki, smtp_sink

from medsecure import (
    ConfigError,
    DeliveryRejected,
    StorageError,
    TransportError,
    TransportUnavailable,
)
from medsecure.mail._config import MailServer
from medsecure.mail._smtp import (
    DataEncoder,
    RecipientsRefused,
    SmtpSubmitter,
    classify,
    xtext,
)

PASSWORD = "correct horse"
MESSAGE = (
    b"From: <sender@mail.test>\n"
    b"To: <bob@mail.test>\n"
    b"Subject: test\n"
    b"Message-ID: <01HZX@medsecure>\n"
    b"\n"
    b"line one\n"
    b".a line starting with a dot\n"
    b".\n"
    b"..two dots\n"
    b"last line without end"
)
# What the server must store: CRLF line ends, dots as sent, the last line ended.
EXPECTED = MESSAGE.replace(b"\n", b"\r\n") + b"\r\n"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def server(pki: Pki) -> Iterator[SmtpServer]:
    with SmtpServer(pki) as srv:
        yield srv


def settings(pki: Pki, srv: SmtpServer, **kwargs: object) -> MailServer:
    base: dict[str, object] = {
        "host": HOST,
        "port": srv.port,
        "security": "starttls",
        "username": "alice",
        "password": lambda: PASSWORD,
        "ca_file": str(pki.ca),
        "timeout": 30.0,
    }
    base.update(kwargs)
    return MailServer(**base)  # type: ignore[arg-type]


def submit(sub: SmtpSubmitter, data: bytes = MESSAGE, **kwargs: object) -> object:
    opts: dict[str, object] = {"sender": "sender@mail.test", "recipients": ["bob@mail.test"]}
    opts.update(kwargs)
    return sub.submit(io.BytesIO(data), **opts)  # type: ignore[arg-type]


# -- success paths ----------------------------------------------------------------------------


def test_starttls_auth_plain_delivers_the_message_exactly(pki: Pki, server: SmtpServer) -> None:
    with SmtpSubmitter(settings(pki, server)) as sub:
        result = submit(sub, envid="<01HZX@medsecure>")
    assert result.accepted == ("bob@mail.test",)  # type: ignore[attr-defined]
    assert result.reply.code == 250  # type: ignore[attr-defined]
    [msg] = server.state.messages
    assert msg.content == EXPECTED
    assert msg.mail_from == "sender@mail.test"
    assert msg.rcpt_tos == ["bob@mail.test"]
    assert msg.login == "alice"
    assert server.state.auth_seen == [("PLAIN", True)]
    assert b"AUTH" not in server.state.cleartext
    assert b"STARTTLS" in server.state.cleartext


def test_implicit_tls(pki: Pki) -> None:
    with (
        SmtpServer(pki, security="tls") as srv,
        SmtpSubmitter(settings(pki, srv, security="tls")) as sub,
    ):
        submit(sub)
        assert [m.content for m in srv.state.messages] == [EXPECTED]
        assert srv.state.auth_seen == [("PLAIN", True)]


def test_auth_login_when_plain_is_not_offered(pki: Pki) -> None:
    with SmtpServer(pki, exclude_auth=("PLAIN",)) as srv, SmtpSubmitter(settings(pki, srv)) as sub:
        submit(sub)
        assert srv.state.auth_seen == [("LOGIN", True)]
        assert srv.state.messages[0].login == "alice"


def test_password_from_environment_variable(
    pki: Pki, server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDSECURE_TEST_SMTP_PASSWORD", PASSWORD)
    conf = settings(pki, server, password=None, password_env="MEDSECURE_TEST_SMTP_PASSWORD")
    with SmtpSubmitter(conf) as sub:
        submit(sub)
    assert len(server.state.messages) == 1
    monkeypatch.delenv("MEDSECURE_TEST_SMTP_PASSWORD")
    with SmtpSubmitter(conf) as sub, pytest.raises(ConfigError, match="is not set"):
        submit(sub)
    assert len(server.state.messages) == 1
    # nothing was sent in place of the missing password
    assert all(mechanism == "PLAIN" for mechanism, _ in server.state.auth_seen)
    assert len(server.state.auth_seen) == 1


def test_configuration_errors_are_config_errors(pki: Pki, server: SmtpServer) -> None:
    # an unusable token from its source, an unreadable certificate file: ConfigError, not a
    # transport failure as if the server were at fault
    with SmtpServer(pki, tokens={"alice": "x"}) as srv:
        conf = settings(pki, srv, password=None, oauth_token=lambda: "two words")
        with SmtpSubmitter(conf) as sub, pytest.raises(ConfigError, match="unusable token"):
            submit(sub)
        assert srv.state.auth_seen == []
    with pytest.raises(ConfigError, match="TLS certificates"):
        SmtpSubmitter(settings(pki, server, client_cert="/nonexistent/client.pem"))
    with pytest.raises(ConfigError, match="TLS certificates"):
        SmtpSubmitter(settings(pki, server, ca_file="/nonexistent/ca.pem"))


def test_xoauth2_token_from_a_callable_each_connection(pki: Pki) -> None:
    calls = []

    def token() -> str:
        calls.append(1)
        return "tok-123"

    with SmtpServer(pki, tokens={"alice": "tok-123"}) as srv:
        conf = settings(pki, srv, password=None, oauth_token=token)
        with SmtpSubmitter(conf) as sub:
            submit(sub)
            submit(sub)
            srv.drop_connections()
            submit(sub)
        assert len(calls) == 2  # one login per connection, nothing cached
        assert [a for a, _ in srv.state.auth_seen] == ["XOAUTH2", "XOAUTH2"]
        assert len(srv.state.messages) == 3


def test_xoauth2_refused_token(pki: Pki) -> None:
    with SmtpServer(pki, tokens={"alice": "good"}) as srv:
        conf = settings(pki, srv, password=None, oauth_token=lambda: "stale-token-xyz")
        with SmtpSubmitter(conf) as sub, pytest.raises(TransportError) as info:
            submit(sub)
        assert not isinstance(info.value, DeliveryRejected | TransportUnavailable)
        assert "stale-token-xyz" not in str(info.value)
        assert srv.state.messages == []


def test_client_certificate_is_presented(pki: Pki) -> None:
    with SmtpServer(pki, client_ca=True) as srv:
        conf = settings(pki, srv, client_cert=str(pki.client_cert), client_key=str(pki.client_key))
        with SmtpSubmitter(conf) as sub:
            submit(sub)
        [cert] = srv.state.client_certs
        assert cert is not None
        assert dict(x[0] for x in cert["subject"])["commonName"] == "app-mailbox.test"


# -- refusals before anything is sent -----------------------------------------------------------


def test_wrong_password(pki: Pki, server: SmtpServer) -> None:
    conf = settings(pki, server, password=lambda: "wrong password 42")
    with SmtpSubmitter(conf) as sub, pytest.raises(TransportError) as info:
        submit(sub)
    assert not isinstance(info.value, DeliveryRejected | TransportUnavailable)
    assert "refused the credentials" in str(info.value)
    assert "wrong password 42" not in str(info.value)
    assert server.state.messages == []


def test_server_without_starttls_is_refused_and_no_auth_is_sent(pki: Pki) -> None:
    with SmtpServer(pki, security="none") as srv:
        with SmtpSubmitter(settings(pki, srv)) as sub, pytest.raises(TransportError) as info:
            submit(sub)
        assert "does not offer STARTTLS" in str(info.value)
        assert srv.state.auth_seen == []
        # The wire tap holds every byte the client sent: EHLO, then QUIT, nothing else.
        wire = bytes(srv.state.cleartext).upper()
        assert b"EHLO" in wire
        assert b"AUTH" not in wire and b"MAIL" not in wire
        assert PASSWORD.upper().encode() not in wire
        assert base64.b64encode(b"\0alice\0" + PASSWORD.encode()).upper() not in wire
        assert srv.state.messages == []


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_certificate_for_another_host_is_refused(pki: Pki, security: str) -> None:
    with SmtpServer(pki, security=security, other_cert=True) as srv:
        with (
            SmtpSubmitter(settings(pki, srv, security=security)) as sub,
            pytest.raises(TransportError) as info,
        ):
            submit(sub)
        assert "certificate" in str(info.value)
        assert not isinstance(info.value, DeliveryRejected)
        assert srv.state.auth_seen == []
        assert srv.state.messages == []


def test_certificate_from_an_unknown_ca_is_refused(pki: Pki, server: SmtpServer) -> None:
    # Without ca_file the system trust store is used, which does not know the test CA.
    with (
        SmtpSubmitter(settings(pki, server, ca_file=None)) as sub,
        pytest.raises(TransportError, match="certificate"),
    ):
        submit(sub)
    assert server.state.auth_seen == []


def test_nothing_listening_is_transient(pki: Pki) -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    conf = MailServer(host=HOST, port=port, ca_file=str(pki.ca), timeout=5)
    with SmtpSubmitter(conf) as sub, pytest.raises(TransportUnavailable):
        submit(sub)


# -- reply classification -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verb", "reply"),
    [
        ("MAIL", "421 4.3.2 service shutting down"),
        ("MAIL", "451 4.3.0 try again later"),
        ("RCPT", "421 4.3.2 service shutting down"),
        ("RCPT", "450 4.2.1 mailbox busy"),
        ("DATA", "451 4.3.0 queue file write error"),
        ("DATA", "421 4.3.2 shutting down"),
    ],
)
def test_transient_replies_lose_nothing(
    pki: Pki, server: SmtpServer, verb: str, reply: str
) -> None:
    server.state.script[verb] = [reply]
    with SmtpSubmitter(settings(pki, server)) as sub:
        with pytest.raises(TransportUnavailable) as info:
            submit(sub)
        assert reply.split(" ", 1)[0] in str(info.value)
        assert server.state.messages == []
        # The outbox retries with the same (reopened) message: it arrives whole, once.
        submit(sub)
    assert [m.content for m in server.state.messages] == [EXPECTED]


def test_550_recipient_is_rejected_with_the_server_text(pki: Pki, server: SmtpServer) -> None:
    server.state.script["RCPT"] = ["550 5.1.1 <bob@mail.test>: Recipient address rejected: unknown"]
    with SmtpSubmitter(settings(pki, server)) as sub, pytest.raises(RecipientsRefused) as info:
        submit(sub)
    err = info.value
    assert isinstance(err, DeliveryRejected)
    assert "550 5.1.1" in str(err) and "Recipient address rejected: unknown" in str(err)
    assert "bob@mail.test" not in str(err)  # addresses are masked (an INS can be one)
    assert err.replies["bob@mail.test"].code == 550
    assert server.state.messages == []


def test_partial_recipient_refusal_is_reported_per_recipient(pki: Pki, server: SmtpServer) -> None:
    server.state.script["RCPT"] = ["250 OK", "550 5.1.1 unknown user", "452 4.2.2 mailbox full"]
    with SmtpSubmitter(settings(pki, server)) as sub:
        result = submit(sub, recipients=["a@mail.test", "b@mail.test", "c@mail.test"])
    assert result.accepted == ("a@mail.test",)  # type: ignore[attr-defined]
    assert result.refused["b@mail.test"].code == 550  # type: ignore[attr-defined]
    assert result.deferred["c@mail.test"].code == 452  # type: ignore[attr-defined]


def test_550_after_data_is_rejected_with_the_text(pki: Pki, server: SmtpServer) -> None:
    server.state.script["DATA"] = ["554 5.7.1 message refused by policy"]
    with SmtpSubmitter(settings(pki, server)) as sub:
        with pytest.raises(
            DeliveryRejected, match=r"554 5\.7\.1 message refused by policy"
        ) as info:
            submit(sub)
        assert "line one" not in str(info.value)
        submit(sub)  # the connection stays usable after a refused message
    assert len(server.state.messages) == 1
    assert server.state.connections == 1


def test_sender_refused_is_permanent(pki: Pki, server: SmtpServer) -> None:
    server.state.script["MAIL"] = ["553 5.7.1 sender not owned by user"]
    with SmtpSubmitter(settings(pki, server)) as sub, pytest.raises(DeliveryRejected, match="553"):
        submit(sub)


def test_connection_cut_during_data(pki: Pki, server: SmtpServer) -> None:
    server.state.cut_data_after = 20
    big = MESSAGE + b"\n" + b"x" * 70 + b"\n" * 3000
    with SmtpSubmitter(settings(pki, server)) as sub:
        with pytest.raises(TransportUnavailable):
            submit(sub, big)
        assert server.state.messages == []
        server.state.cut_data_after = None
        submit(sub, big)  # reconnects
    assert len(server.state.messages) == 1
    assert server.state.connections == 2


def test_unreadable_message_is_never_sent_truncated(pki: Pki, server: SmtpServer) -> None:
    class Failing(io.RawIOBase):
        def __init__(self) -> None:
            self.calls = 0

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            self.calls += 1
            if self.calls > 2:
                raise OSError(5, "Input/output error")
            return b"Subject: x\r\n\r\n" + b"y" * 1000 + b"\r\n"

    with SmtpSubmitter(settings(pki, server)) as sub:
        with pytest.raises(StorageError):
            sub.submit(Failing(), sender="s@mail.test", recipients=["r@mail.test"])  # type: ignore[arg-type]
        assert server.state.messages == []
        submit(sub)
    assert len(server.state.messages) == 1


# -- connection reuse and DSN ---------------------------------------------------------------------


def test_messages_reuse_one_connection(pki: Pki, server: SmtpServer) -> None:
    with SmtpSubmitter(settings(pki, server)) as sub:
        for i in range(5):
            submit(sub, MESSAGE + f"\nmessage {i}".encode())
        assert sub.connections == 1
    assert server.state.connections == 1
    assert len(server.state.messages) == 5
    assert server.state.auth_seen == [("PLAIN", True)]


def test_no_nagle_delay_on_the_connection(pki: Pki, server: SmtpServer) -> None:
    # Commands and DATA are small writes each waiting for a reply: with Nagle's algorithm on,
    # every one of them can wait for the peer's delayed ACK (about 40 ms on Linux), which
    # capped a reused connection at a few dozen messages per second.
    with SmtpSubmitter(settings(pki, server)) as sub:
        submit(sub)
        assert sub._conn is not None and sub._conn.sock is not None
        assert sub._conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_reconnects_when_the_server_closed_the_connection(pki: Pki, server: SmtpServer) -> None:
    with SmtpSubmitter(settings(pki, server)) as sub:
        submit(sub)
        server.drop_connections()
        submit(sub)
        assert sub.connections == 2
    assert len(server.state.messages) == 2


def test_dsn_is_requested_when_advertised(pki: Pki) -> None:
    with SmtpServer(pki, dsn=True) as srv, SmtpSubmitter(settings(pki, srv)) as sub:
        result = submit(sub, envid="<01HZX+1@medsecure>", size=len(MESSAGE))
        assert result.dsn_requested  # type: ignore[attr-defined]
        [msg] = srv.state.messages
        assert "RET=HDRS" in msg.mail_options
        assert "ENVID=<01HZX+2B1@MEDSECURE>" in msg.mail_options  # aiosmtpd upper-cases
        assert msg.rcpt_options == [["NOTIFY=SUCCESS,FAILURE", "ORCPT=RFC822;BOB@MAIL.TEST"]]


def test_no_dsn_parameters_without_the_extension(pki: Pki, server: SmtpServer) -> None:
    with SmtpSubmitter(settings(pki, server)) as sub:
        result = submit(sub, envid="<x@y>")
    assert not result.dsn_requested  # type: ignore[attr-defined]
    assert server.state.messages[0].rcpt_options == [[]]
    assert not any("RET" in o for o in server.state.messages[0].mail_options)


def test_misuse_is_value_error(pki: Pki, server: SmtpServer) -> None:
    with SmtpSubmitter(settings(pki, server)) as sub:
        for bad in (["a@b", "a@b"], [], ["x\r\nRCPT TO:<e@vil>"], ["<a@b>"]):
            with pytest.raises(ValueError):
                submit(sub, recipients=bad)
        with pytest.raises(ValueError):
            submit(sub, sender="a b@c")
    with pytest.raises(ValueError):
        MailServer(host="mail.test\r\nx")
    with pytest.raises(ValueError):
        MailServer(host="mail.test", password=lambda: "x")  # credentials without a user


# -- the DATA encoder and the small pure helpers --------------------------------------------------


def _decode(wire: bytes) -> bytes:
    """What a server stores: remove the terminator and the transparency dots."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    body = wire[: -len(b".\r\n")]
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def _normalise(data: bytes) -> bytes:
    out = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


def _encode(pieces: list[bytes]) -> bytes:
    enc = DataEncoder()
    return b"".join(enc.feed(p) for p in pieces) + enc.finish()


@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\x00", b"")), max_size=12))
def test_encoder_round_trips_whatever_the_chunking(pieces: list[bytes]) -> None:
    wire = _encode(pieces)
    whole = b"".join(pieces)
    assert _decode(wire) == _normalise(whole)
    assert wire == _encode([whole])  # chunk boundaries do not matter
    # Every LF ends a CRLF, and no CR stands alone.
    assert wire.count(b"\n") == wire.count(b"\r\n") == wire.count(b"\r")


@pytest.mark.parametrize(
    ("pieces", "wire"),
    [
        ([b"a\r", b"\nb"], b"a\r\nb\r\n.\r\n"),
        ([b"a\r", b"b"], b"a\r\nb\r\n.\r\n"),
        ([b"a\n", b".b"], b"a\r\n..b\r\n.\r\n"),
        ([b".", b"x\r\n"], b"..x\r\n.\r\n"),
        ([b"a\r"], b"a\r\n.\r\n"),
        ([], b".\r\n"),
        ([b"x\r\n"], b"x\r\n.\r\n"),
    ],
)
def test_encoder_chunk_boundaries(pieces: list[bytes], wire: bytes) -> None:
    assert _encode(pieces) == wire


def test_classify_and_xtext() -> None:
    assert [classify(c) for c in (250, 354, 421, 451, 550, 554, -1)] == [
        "ok",
        "ok",
        "transient",
        "transient",
        "permanent",
        "permanent",
        "permanent",
    ]
    assert xtext("<a+b=c d@é>") == "<a+2Bb+3Dc+20d@+C3+A9>"


# -- a 200 MiB message in bounded memory -----------------------------------------------------------


class GeneratedMessage(io.RawIOBase):
    """A message of a header and ``lines`` base64-looking lines, made on the fly and hashed as
    it is read (the test never holds it whole)."""

    HEADER = b"Subject: big\r\n\r\n"
    LINE = base64.b64encode(bytes(range(57))) + b"\r\n"  # 78 bytes, like base64 MIME

    def __init__(self, lines: int) -> None:
        self.size = len(self.HEADER) + lines * len(self.LINE)
        self.pos = 0
        self.block = self.LINE * 840
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        if self.pos >= self.size:
            return 0
        if self.pos < len(self.HEADER):
            data = self.HEADER[self.pos :]
        else:
            data = self.block[(self.pos - len(self.HEADER)) % len(self.LINE) :]
        data = data[: min(len(buf), self.size - self.pos)]
        buf[: len(data)] = data
        self.sha.update(data)
        self.pos += len(data)
        return len(data)


@pytest.mark.slow
def test_200_mib_message_in_bounded_memory(pki: Pki) -> None:
    raw = GeneratedMessage((200 << 20) // 78)
    assert raw.size > (200 << 20) - 100
    with smtp_sink(pki) as (port, proc):
        conf = MailServer(
            host=HOST,
            port=port,
            username="u",
            password=lambda: "p",
            ca_file=str(pki.ca),
            timeout=300,
        )
        source = io.BufferedReader(raw, 64 << 10)
        with SmtpSubmitter(conf) as sub:
            tracemalloc.start()
            try:
                sub.submit(source, sender="a@mail.test", recipients=["b@mail.test"], size=raw.size)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
    # CRLF lines and no leading dot: the server stores exactly the bytes read.
    assert line == ["received", str(raw.size), raw.sha.hexdigest()]
    assert peak < 4 << 20, f"client peak {peak} bytes"


def test_generated_message_is_well_formed() -> None:
    raw = GeneratedMessage(5000)
    data = io.BufferedReader(raw).read()
    assert len(data) == raw.size
    assert data.startswith(b"Subject: big\r\n\r\n") and data.endswith(b"\r\n")
    assert _normalise(data) == data
    assert raw.sha.hexdigest() == hashlib.sha256(data).hexdigest()
