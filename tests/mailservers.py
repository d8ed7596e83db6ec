"""Real mail servers on loopback for the mail driver tests: a test PKI, aiosmtpd with STARTTLS or
implicit TLS and AUTH, dovecot with a throwaway configuration, and a tiny DNS responder.

Run as a script (``python tests/mailservers.py smtp-sink CERT KEY``) it serves an SMTP sink in
its own process that keeps only the SHA-256 and the length of what it receives; the 200 MiB test
uses it so that the server's memory does not count in the client's tracemalloc figures.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import imaplib
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOST = "127.0.0.1"

# ---------------------------------------------------------------------------------------------
# Test PKI


@dataclass
class Pki:
    """PEM files of a throwaway CA and the certificates the tests need."""

    root: Path
    ca: Path
    server_cert: Path
    server_key: Path
    other_cert: Path  # valid, same CA, but for another host name
    other_key: Path
    client_cert: Path  # a client certificate (IGC-Santé ORG certificates play this role)
    client_key: Path

    def server_context(self, *, other: bool = False, client_ca: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        if other:
            ctx.load_cert_chain(self.other_cert, self.other_key)
        else:
            ctx.load_cert_chain(self.server_cert, self.server_key)
        if client_ca:
            ctx.load_verify_locations(self.ca)
            ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o644)  # dovecot reads it after dropping privileges


def make_pki(root: Path) -> Pki:
    """A CA, a server certificate for localhost/127.0.0.1, one for another host, a client one."""
    root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("medsecure test CA"))
        .issuer_name(_name("medsecure test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    (root / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(
        stem: str, cn: str, names: list[x509.GeneralName], usage: x509.ObjectIdentifier
    ) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        cert_path, key_path = root / f"{stem}.pem", root / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return cert_path, key_path

    server = leaf(
        "server",
        "localhost",
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    other = leaf(
        "other",
        "mail.other.example",
        [x509.DNSName("mail.other.example")],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    client = leaf("client", "app-mailbox.test", [], ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(root, root / "ca.pem", *server, *other, *client)


# ---------------------------------------------------------------------------------------------
# aiosmtpd on loopback


@dataclass
class Received:
    """One message the test SMTP server accepted."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]
    rcpt_options: list[list[str]]
    login: str | None


@dataclass
class SmtpState:
    """What the server saw, and what the test scripted it to answer."""

    messages: list[Received] = field(default_factory=list)
    connections: int = 0
    cleartext: bytearray = field(default_factory=bytearray)  # client bytes before TLS
    auth_seen: list[tuple[str, bool]] = field(default_factory=list)  # (mechanism, under TLS)
    # verb ("MAIL", "RCPT", "DATA" for the end of data) -> replies to give instead of success
    script: dict[str, list[str]] = field(default_factory=dict)
    cut_data_after: int | None = None  # abort the connection after N bytes of DATA
    client_certs: list[dict[str, Any] | None] = field(default_factory=list)
    deliver: Callable[[Received], None] | None = None


class _RecordingSMTP(SMTP):
    """aiosmtpd's SMTP with the hooks the tests need: a wire tap on cleartext bytes, DSN
    parameters accepted, 421 closes the connection, a connection cut during DATA."""

    state: SmtpState
    _implicit_tls = False

    def data_received(self, data: bytes) -> None:
        if self._tls_protocol is None and not self._implicit_tls:
            self.state.cleartext += data
        super().data_received(data)

    def _getparams(self, params: Any) -> Any:
        # Accept the RFC 3461 parameters when DSN is advertised (aiosmtpd does not know them).
        kept = [p for p in params if p.split("=", 1)[0] not in ("RET", "ENVID", "NOTIFY", "ORCPT")]
        return super()._getparams(kept)

    async def push(self, status: Any) -> None:
        await super().push(status)
        text = status if isinstance(status, str) else status.decode()
        if text.startswith("421") and self.transport is not None:
            self.transport.close()

    async def smtp_AUTH(self, arg: str) -> None:
        mechanism = (arg or "").split(" ", 1)[0].upper()
        self.state.auth_seen.append(
            (mechanism, self._tls_protocol is not None or self._implicit_tls)
        )
        await super().smtp_AUTH(arg)

    async def smtp_DATA(self, arg: str) -> None:
        cut = self.state.cut_data_after
        if cut is None or not self.envelope or not self.envelope.rcpt_tos:
            await super().smtp_DATA(arg)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        with contextlib.suppress(Exception):
            await self._reader.readexactly(cut)
        assert self.transport is not None
        self.transport.abort()


class _Handler:
    def __init__(self, state: SmtpState, dsn: bool, tokens: dict[str, str]) -> None:
        self.state = state
        self.dsn = dsn
        self.tokens = tokens

    def _scripted(self, verb: str) -> str | None:
        queue = self.state.script.get(verb)
        return queue.pop(0) if queue else None

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.dsn:
            responses.insert(-1, "250-DSN")
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        scripted = self._scripted("MAIL")
        if scripted:
            return scripted
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        scripted = self._scripted("RCPT")
        if scripted and not scripted.startswith("2"):
            return scripted
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(options)  # type: ignore[arg-type]
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        scripted = self._scripted("DATA")
        if scripted:
            return scripted
        assert isinstance(envelope.original_content, bytes)
        auth = session.auth_data
        received = Received(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            content=envelope.original_content,
            mail_options=list(envelope.mail_options),
            rcpt_options=list(envelope.rcpt_options),  # type: ignore[arg-type]
            login=auth.login.decode() if isinstance(auth, LoginPassword) else auth,
        )
        if self.state.deliver is not None:
            self.state.deliver(received)
        self.state.messages.append(received)
        return "250 2.0.0 OK queued"

    def handle_STARTTLS(self, server: SMTP, session: Session, envelope: Envelope) -> bool:
        ssl_object = (session.ssl or {}).get("ssl_object")
        self.state.client_certs.append(ssl_object.getpeercert() if ssl_object else None)
        return True

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) < 2:
            return AuthResult(success=False, handled=False)
        try:
            raw = base64.b64decode(args[1], validate=True).decode()
            fields = dict(part.split("=", 1) for part in raw.split("\x01") if part)
            user, auth = fields["user"], fields["auth"]
        except Exception:
            await server.push("501 5.5.2 malformed XOAUTH2")
            return AuthResult(success=False, handled=True)
        if self.tokens.get(user) and auth == f"Bearer {self.tokens[user]}":
            return AuthResult(success=True, auth_data=user)
        # RFC 7628-style error challenge; the client answers with an empty line.
        await server.challenge_auth(b'{"status":"401","schemes":"bearer"}')
        return AuthResult(success=False, handled=False)


class SmtpServer:
    """aiosmtpd on 127.0.0.1 in a thread, with its own asyncio loop.

    ``security``: ``"starttls"`` (STARTTLS and AUTH required, as a submission server),
    ``"tls"`` (implicit TLS), or ``"none"`` (no STARTTLS offered, AUTH offered in clear: the
    server a client must refuse).
    """

    def __init__(
        self,
        pki: Pki,
        *,
        security: str = "starttls",
        users: dict[str, str] | None = None,
        tokens: dict[str, str] | None = None,
        dsn: bool = False,
        other_cert: bool = False,
        client_ca: bool = False,
        exclude_auth: tuple[str, ...] = (),
    ) -> None:
        self.exclude_auth = exclude_auth
        self._live: list[SMTP] = []
        self.pki = pki
        self.security = security
        self.users = {"alice": "correct horse"} if users is None else users
        self.state = SmtpState()
        self._handler = _Handler(self.state, dsn, tokens or {})
        self._ctx = pki.server_context(other=other_cert, client_ca=client_ca)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    def _authenticator(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if isinstance(data, LoginPassword):
            user, password = data.login.decode(), data.password.decode()
            if self.users.get(user) == password:
                return AuthResult(success=True, auth_data=data)
        return AuthResult(success=False, handled=False)

    def _factory(self) -> SMTP:
        self.state.connections += 1
        kwargs: dict[str, Any] = {
            "hostname": "mail.test",
            "data_size_limit": None,
            "auth_required": True,
            "authenticator": self._authenticator,
            "auth_exclude_mechanism": self.exclude_auth,
            "loop": self._loop,
        }
        if self.security == "starttls":
            kwargs.update(tls_context=self._ctx, require_starttls=True, auth_require_tls=True)
        else:
            kwargs.update(auth_require_tls=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            smtp = _RecordingSMTP(self._handler, **kwargs)
        smtp.state = self.state
        smtp._implicit_tls = self.security == "tls"
        self._live.append(smtp)
        return smtp

    def drop_connections(self) -> None:
        """Close every open connection from the server side (an idle timeout, a restart)."""

        def close() -> None:
            for smtp in self._live:
                if smtp.transport is not None:
                    smtp.transport.close()

        self._loop.call_soon_threadsafe(close)

    def start(self) -> SmtpServer:
        self._thread.start()
        ssl_ctx = self._ctx if self.security == "tls" else None

        async def serve() -> asyncio.AbstractServer:
            return await self._loop.create_server(self._factory, HOST, 0, ssl=ssl_ctx)

        self._server = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        with contextlib.suppress(Exception):
            self._loop.close()

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# dovecot on loopback, with a throwaway configuration


class DovecotUnavailable(Exception):
    """dovecot is not installed or could not be started here (the reason is the message)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Dovecot:
    """``dovecot -F -c <conf>`` in a subprocess: its own base_dir, state and log in a temporary
    folder, one passwd-file user whose Maildir is in that folder, IMAP with STARTTLS and IMAPS
    with the test CA's certificate, listening on 127.0.0.1 only. Not a system service: nothing
    outside the temporary folder is touched, and :meth:`stop` ends it."""

    USER = "bob"
    PASSWORD = "dovecot pass 1"
    # dovecot checks an XOAUTH2 token as the user's password in a passwd-file passdb: the
    # application user "app" has a token as its password.
    APP_USER = "app"
    TOKEN = "app-oauth-token-1"

    def __init__(
        self,
        pki: Pki,
        binary: str | None = None,
        *,
        extra: str = "",
        users: dict[str, str] | None = None,
    ) -> None:
        self.pki = pki
        self.extra = extra
        #: user -> password of every mailbox (the two above and ``users``)
        self.passwords = {self.USER: self.PASSWORD, self.APP_USER: self.TOKEN, **(users or {})}
        self.binary = (
            binary
            or os.environ.get("MEDSECURE_TEST_DOVECOT")
            or shutil.which("dovecot")
            or "/usr/sbin/dovecot"
        )
        self.root = Path(tempfile.mkdtemp(prefix="medsecure-dovecot-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = self.ssl_port = 0

    @property
    def maildir(self) -> Path:
        """The user's Maildir (INBOX; sub-folders are ``.Name`` inside, Maildir++)."""
        return self.maildir_of(self.USER)

    def maildir_of(self, user: str) -> Path:
        """The Maildir of any of the configured users."""
        return self.root / "mail" / user

    def _config(self) -> str:
        root = self.root
        if os.geteuid() == 0:
            # As root dovecot drops privileges: its own users for its processes, and an
            # unprivileged uid for the mail (uid 0 may not own mail).
            internal, login = "dovecot", "dovenull"
            mail_uid, mail_gid = 65534, 65534
        else:
            import pwd

            me = pwd.getpwuid(os.geteuid()).pw_name
            internal = login = me
            mail_uid, mail_gid = os.geteuid(), os.getegid()
        (root / "passwd").write_text(
            "".join(
                f"{user}:{{PLAIN}}{password}:{mail_uid}:{mail_gid}::{self.maildir_of(user)}::\n"
                for user, password in self.passwords.items()
            )
        )
        (root / "passwd").chmod(0o644)
        for sub in ("mail", "state"):
            (root / sub).mkdir(exist_ok=True)
        if os.geteuid() == 0:
            os.chown(root / "mail", mail_uid, mail_gid)
        dh = "/usr/share/dovecot/dh.pem"
        return f"""
instance_name = medsecure-test-{os.getpid()}-{root.name}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap
listen = {HOST}
default_internal_user = {internal}
default_login_user = {login}
first_valid_uid = 1
last_valid_uid = 0
ssl = yes
ssl_cert = <{self.pki.server_cert}
ssl_key = <{self.pki.server_key}
ssl_min_protocol = TLSv1.2
{"ssl_dh = <" + dh if os.path.exists(dh) else ""}
disable_plaintext_auth = yes
auth_mechanisms = plain login xoauth2
mail_location = maildir:~
mail_fsync = always
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/passwd
}}
service imap-login {{
  inet_listener imap {{
    address = {HOST}
    port = {self.port}
  }}
  inet_listener imaps {{
    address = {HOST}
    port = {self.ssl_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
{self.extra}
"""

    def start(self) -> Dovecot:
        if not os.path.exists(self.binary):
            raise DovecotUnavailable("dovecot is not installed (apt-get install dovecot-imapd)")
        os.chmod(self.root, 0o755)  # the unprivileged mail user must reach its Maildir
        last = ""
        for _ in range(3):  # a port taken between picking and binding: pick again
            self.port, self.ssl_port = _free_port(), _free_port()
            conf = self.root / "dovecot.conf"
            conf.write_text(self._config())
            self.proc = subprocess.Popen(
                [self.binary, "-F", "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if self._wait_ready():
                return self
            last = self._failure()
            self.stop(keep_files=True)
        raise DovecotUnavailable(f"dovecot did not start: {last}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as sock:
                    if sock.recv(64).startswith(b"* OK"):
                        return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def _failure(self) -> str:
        text = ""
        if self.proc is not None and self.proc.poll() is not None and self.proc.stderr:
            text = self.proc.stderr.read().decode(errors="replace")
        log = self.root / "dovecot.log"
        if log.exists():
            text += log.read_text(errors="replace")[-2000:]
        return text.strip()[-2000:] or "no output"

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, *, keep_files: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()
        if not keep_files:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_dovecot(pki: Pki, **kwargs: Any) -> Dovecot:
    """A started dovecot, or: fail in CI (``CI`` set), skip locally saying why."""
    import pytest

    server = Dovecot(pki, **kwargs)
    try:
        return server.start()
    except DovecotUnavailable as exc:
        server.stop()
        if os.environ.get("CI"):
            pytest.fail(f"dovecot is required in CI and could not be started: {exc}")
        pytest.skip(f"dovecot cannot be started here: {exc}")


def empty_mailboxes(server: Dovecot) -> None:
    """Every user's INBOX emptied and every other folder removed."""
    for user in server.passwords:
        with imap_admin(server, user) as imap:
            _, folders = imap.list()
            for line in folders:
                name = line.decode().rsplit(' "." ', 1)[-1].strip('"')  # type: ignore[union-attr]
                if name != "INBOX":
                    imap.delete(f'"{name}"')
            _, exists = imap.select("INBOX")
            if exists[0] != b"0":
                imap.store("1:*", "+FLAGS.SILENT", "(\\Deleted)")
                imap.expunge()
            imap.logout()


def imap_admin(server: Dovecot, user: str | None = None) -> imaplib.IMAP4_SSL:
    """A plain imaplib session (the test's own, not the driver's) to set up and inspect."""
    ctx = ssl.create_default_context(cafile=str(server.pki.ca))
    imap = imaplib.IMAP4_SSL(HOST, server.ssl_port, ssl_context=ctx, timeout=30)
    name = user or server.USER
    imap.login(name, server.passwords[name])
    return imap


def imap_append(
    server: Dovecot, data: bytes, folder: str = "INBOX", flags: str = "", user: str | None = None
) -> None:
    with imap_admin(server, user) as imap:
        imap.create(folder)
        typ, resp = imap.append(folder, flags or None, None, data)
        assert typ == "OK", resp
        imap.logout()


class HostileImap:
    """A TLS IMAP server on loopback that behaves until a FETCH, then announces a literal far
    larger than asked for (and never sends it)."""

    def __init__(self, pki: Pki, literal: int = 1 << 40) -> None:
        self.ctx = pki.server_context()
        self.literal = literal
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.sock.accept()
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                f = tls.makefile("rb")
                tls.sendall(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hostile\r\n")
                while True:
                    line = f.readline()
                    if not line:
                        return
                    tag, cmd = line.split(b" ", 2)[:2]
                    cmd = cmd.strip().upper()
                    if cmd == b"CAPABILITY":
                        tls.sendall(
                            b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n" + tag + b" OK done\r\n"
                        )
                    elif cmd == b"AUTHENTICATE":
                        tls.sendall(b"+ \r\n")
                        f.readline()
                        tls.sendall(tag + b" OK logged in\r\n")
                    elif cmd == b"SELECT":
                        tls.sendall(
                            b"* 1 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n" + tag + b" OK done\r\n"
                        )
                    elif cmd == b"UID" and b"RFC822.SIZE" in line:
                        tls.sendall(
                            b"* 1 FETCH (UID 1 RFC822.SIZE 10 FLAGS ())\r\n" + tag + b" OK done\r\n"
                        )
                    elif cmd == b"UID":
                        head = b"* 1 FETCH (UID 1 RFC822.SIZE 10 BODY[]<0> {%d}\r\n" % self.literal
                        tls.sendall(head + b"x" * 1000)
                        f.readline()  # wait until the client goes away
                        return
                    else:
                        tls.sendall(tag + b" OK done\r\n")

    def __enter__(self) -> HostileImap:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
        self.thread.join(10)


# ---------------------------------------------------------------------------------------------
# A DNS responder on loopback (RFC 6186 SRV answers)


class DnsResponder:
    """Answers SRV questions from a table over UDP on 127.0.0.1 with dnspython's message
    codec; every other question gets NXDOMAIN. ``queries`` records the names asked."""

    def __init__(self, records: dict[str, list[tuple[int, int, int, str]]]) -> None:
        self.records = records
        self.queries: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        import dns.message
        import dns.rcode
        import dns.rdataclass
        import dns.rdatatype
        import dns.rrset

        while not self._stop.is_set():
            try:
                wire, peer = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            query = dns.message.from_wire(wire)
            question = query.question[0]
            name = question.name.to_text()
            self.queries.append(name)
            response = dns.message.make_response(query)
            answers = self.records.get(name.lower())
            if answers is None or question.rdtype != dns.rdatatype.SRV:
                response.set_rcode(dns.rcode.NXDOMAIN)
            else:
                texts = [f"{p} {w} {port} {target}" for p, w, port, target in answers]
                response.answer.append(
                    dns.rrset.from_text_list(question.name, 300, "IN", "SRV", texts)
                )
            self.sock.sendto(response.to_wire(), peer)

    def __enter__(self) -> DnsResponder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(10)
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# An SMTP sink in its own process (for memory measurements of the client alone)


class _SinkHandler:
    def __init__(self, maildir: str | None = None) -> None:
        self.maildir = Path(maildir) if maildir else None
        self.count = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        digest = hashlib.sha256(content).hexdigest()
        envelope.original_content = envelope.content = None
        if self.maildir is not None:
            # what a local delivery agent does: write in tmp/, rename into new/
            self.count += 1
            name = f"{int(time.time())}.sink{os.getpid()}_{self.count}.sink"
            tmp = self.maildir / "tmp" / name
            with open(tmp, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            if os.geteuid() == 0:
                st = os.stat(self.maildir)
                os.chown(tmp, st.st_uid, st.st_gid)
            os.rename(tmp, self.maildir / "new" / name)
        size = len(content)
        del content
        print(f"received {size} {digest}", flush=True)
        return "250 2.0.0 OK"


def _serve_sink(cert: str, key: str, maildir: str | None = None) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    loop = asyncio.new_event_loop()
    handler = _SinkHandler(maildir)

    def factory() -> SMTP:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return SMTP(
                handler,
                hostname="sink.test",
                data_size_limit=None,
                tls_context=ctx,
                require_starttls=True,
                auth_required=True,
                auth_require_tls=True,
                authenticator=lambda *a: AuthResult(success=True),
                loop=loop,
            )

    server = loop.run_until_complete(loop.create_server(factory, HOST, 0))
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.run_forever()


@contextlib.contextmanager
def smtp_sink(pki: Pki, maildir: Path | None = None) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """Start the sink subprocess; yield (port, process); its stdout has one line per message
    (``received <size> <sha256>``). With ``maildir``, each message is also delivered there."""
    extra = [str(maildir)] if maildir is not None else []
    proc = subprocess.Popen(
        [sys.executable, __file__, "smtp-sink", str(pki.server_cert), str(pki.server_key), *extra],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("port "):
            raise RuntimeError("the SMTP sink did not start")
        yield int(line.split()[1]), proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "smtp-sink":
        _serve_sink(*sys.argv[2:])
    else:
        sys.exit("usage: mailservers.py smtp-sink CERT KEY [MAILDIR]")
