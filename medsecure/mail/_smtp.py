"""SMTP submission of ready-made RFC 5322 messages, streamed (RFC 6409, RFC 3207, RFC 4954,
RFC 3461 DSN requests), over :mod:`smtplib`.

Theory of operation
-------------------
:class:`SmtpSubmitter` moves an already-built message, given as a binary stream, to a submission
server. It never looks inside the message (format-agnostic) and never holds it whole: smtplib's
``sendmail``/``data`` take the message as one ``bytes`` object, so the DATA phase is written here
over smtplib's own socket in bounded chunks (:class:`DataEncoder`: CRLF line ends, dot-stuffing,
the final ``CRLF.CRLF``), while smtplib does everything else (greeting, EHLO, STARTTLS, AUTH,
MAIL, RCPT, reply parsing, RSET, QUIT).

Security: TLS 1.2+ with certificate and host-name verification (see :mod:`._config`); with
``security="starttls"`` a server that does not offer STARTTLS is refused and nothing else is
sent, so AUTH never travels in clear. AUTH is PLAIN or LOGIN with a password read from its source
at each login, or XOAUTH2 with a token from a callable; neither is stored on the connection
(smtplib's ``login`` would keep them as attributes, so ``auth`` is called with a closure).

Replies are classified by :func:`classify`: 2xx/3xx as expected, 4xx and lost connections are
transient (:class:`~medsecure.TransportUnavailable`, the outbox retries later), 5xx permanent
(:class:`~medsecure.DeliveryRejected` with the server's text, per recipient where RCPT fails).
Error messages carry the reply code and the server's text with any mail address masked (a
patient mailbox's local part is an INS), never the message, a password or a token.

Several messages reuse one connection: each transaction ends in a clean state, and when the server
closed the connection meanwhile the next MAIL fails before anything was sent and the submitter
reconnects once.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import BinaryIO, Literal

from .._errors import (
    DeliveryRejected,
    MedsecureError,
    StorageError,
    TransportError,
    TransportUnavailable,
)
from ._config import MailServer, server_text, tls_failure, translate_os_errors
from ._connection import MailConnection

__all__ = [
    "DataEncoder",
    "RecipientsRefused",
    "SmtpReply",
    "SmtpSubmitter",
    "SubmitResult",
    "classify",
    "xtext",
]

CHUNK_SIZE = 64 << 10

# A mailbox for the SMTP envelope: ASCII addr-spec, no spaces, angle brackets or controls
# (SMTPUTF8 is not used: the messages medsecure builds have ASCII envelopes).
_ADDR_RE = re.compile(r"[\x21-\x3b\x3d\x3f-\x7e]{1,256}@[A-Za-z0-9.\[\]:-]{1,255}")


def classify(code: int) -> Literal["ok", "transient", "permanent"]:
    """Classify an SMTP reply code: 2xx/3xx ``ok``, 4xx ``transient``, anything else
    (5xx, or a malformed code smtplib reports as -1) ``permanent``."""
    if 200 <= code < 400:
        return "ok"
    if 400 <= code < 500:
        return "transient"
    return "permanent"


def xtext(value: str) -> str:
    """RFC 3461 §4 xtext: printable ASCII but ``+`` and ``=`` as is, everything else ``+HH``."""
    out = []
    for byte in value.encode("utf-8"):
        if 0x21 <= byte <= 0x7E and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


class DataEncoder:
    """The SMTP DATA transparency of RFC 5321 §4.5.2, one chunk at a time.

    ``feed`` takes raw message bytes and returns them ready for the wire: every line end
    (CRLF, bare LF or bare CR) becomes CRLF, and a line that starts with ``.`` gets one more.
    ``finish`` ends the last line if needed and adds the ``.`` line. Memory is one chunk.
    """

    _EOL = re.compile(rb"\r\n|\r|\n")

    def __init__(self) -> None:
        self._line_start = True
        self._pending_cr = False

    def feed(self, data: bytes) -> bytes:
        """Encode the next piece of the message."""
        if not data:
            return b""
        head = b""
        if self._pending_cr:
            # A CR that ended the previous chunk: CRLF if this one starts with LF, else bare.
            self._pending_cr = False
            head = b"\r\n"
            self._line_start = True
            if data[:1] == b"\n":
                data = data[1:]
        if data[-1:] == b"\r":
            self._pending_cr = True
            data = data[:-1]
        if data:
            data = self._EOL.sub(b"\r\n", data).replace(b"\n.", b"\n..")
            if self._line_start and data[:1] == b".":
                data = b"." + data
            self._line_start = data[-1:] == b"\n"
        return head + data

    def finish(self) -> bytes:
        """The end of the DATA phase (ends the last line if it was not ended)."""
        tail = b""
        if self._pending_cr:
            self._pending_cr = False
            tail = b"\r\n"
        elif not self._line_start:
            tail = b"\r\n"
        self._line_start = True
        return tail + b".\r\n"


@dataclass(frozen=True)
class SmtpReply:
    """A server reply: the code and the text (one line, mail addresses masked)."""

    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()

    @classmethod
    def of(cls, code: int, text: bytes | str) -> SmtpReply:
        """A reply from smtplib's ``(code, bytes)`` pair."""
        return cls(code, server_text(text))


@dataclass(frozen=True)
class SubmitResult:
    """What the server did with one message.

    ``accepted`` recipients were taken (the final DATA reply is ``reply``); ``refused`` ones were
    refused for good (5xx at RCPT) and ``deferred`` ones for now (4xx at RCPT: submit the message
    again to them later). ``dsn_requested`` says whether DSNs were asked for (the server
    advertised DSN).
    """

    accepted: tuple[str, ...]
    reply: SmtpReply
    refused: Mapping[str, SmtpReply] = field(default_factory=dict)
    deferred: Mapping[str, SmtpReply] = field(default_factory=dict)
    dsn_requested: bool = False


class RecipientsRefused(DeliveryRejected):
    """Every recipient of a message was refused for good. ``replies`` maps each address to the
    server's reply (the addresses are not repeated in the message text)."""

    def __init__(self, message: str, replies: Mapping[str, SmtpReply]) -> None:
        super().__init__(message)
        self.replies = dict(replies)


class _Drop(Exception):
    """Internal: the connection is unusable; close it and report ``error``."""

    def __init__(self, error: MedsecureError, *, before_mail: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.before_mail = before_mail


class SmtpSubmitter(MailConnection[smtplib.SMTP]):
    """Submit RFC 5322 messages to a submission server, streamed, over one reused connection.

    Use as a context manager (or call :meth:`close`). Not thread-safe across threads beyond a
    lock that serialises :meth:`submit` calls on one instance.
    """

    protocol = "smtp"

    def __init__(
        self,
        server: MailServer,
        *,
        local_hostname: str | None = None,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        super().__init__(server)
        if not 1024 <= chunk_size <= 16 << 20:
            raise ValueError("chunk_size must be between 1 KiB and 16 MiB")
        self._local_hostname = local_hostname
        self._chunk = chunk_size

    # -- connection ----------------------------------------------------------------------------

    def _goodbye(self, smtp: smtplib.SMTP) -> None:
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()

    def _cut(self, smtp: smtplib.SMTP) -> None:
        smtp.close()

    def _connect(self) -> smtplib.SMTP:
        server = self.server
        host, port = server.host, server.port_for("smtp")
        smtp: smtplib.SMTP | None = None
        with translate_os_errors("cannot reach the SMTP server", host):
            try:
                if server.security == "tls":
                    smtp = smtplib.SMTP_SSL(
                        host,
                        port,
                        local_hostname=self._local_hostname,
                        timeout=server.timeout,
                        context=self._context,
                    )
                else:
                    smtp = smtplib.SMTP(
                        host, port, local_hostname=self._local_hostname, timeout=server.timeout
                    )
                self.connections += 1
                if smtp.sock is not None:
                    # Each command and the DATA chunks are small writes that wait for a reply:
                    # with Nagle's algorithm they wait for the server's delayed ACK too
                    # (~40 ms each on Linux), which capped a reused connection at a few dozen
                    # messages per second.
                    smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._ehlo(smtp)
                if server.security == "starttls":
                    if not smtp.has_extn("starttls"):
                        raise TransportError(
                            f"SMTP server {host} does not offer STARTTLS: refusing to "
                            "continue without TLS"
                        )
                    try:
                        # smtplib verifies against the host name given above and, as RFC 3207
                        # §4.2 asks, forgets the EHLO answer received before TLS.
                        smtp.starttls(context=self._context)
                    except smtplib.SMTPResponseException as exc:
                        raise self._status_error(
                            f"SMTP server {host} refused STARTTLS",
                            SmtpReply.of(exc.smtp_code, exc.smtp_error),
                        ) from exc
                    self._ehlo(smtp)
                if server.has_credentials:
                    self._authenticate(smtp)
            except smtplib.SMTPConnectError as exc:
                self._cut_quietly(smtp)
                raise self._status_error(
                    f"SMTP server {host} refused the connection",
                    SmtpReply.of(exc.smtp_code, exc.smtp_error),
                ) from exc
            except smtplib.SMTPServerDisconnected as exc:
                self._cut_quietly(smtp)
                raise TransportUnavailable(f"SMTP server {host} closed the connection") from exc
            except ssl.SSLError as exc:
                self._cut_quietly(smtp)
                if isinstance(exc, ssl.SSLCertVerificationError):
                    raise tls_failure(host, exc) from exc
                raise TransportError(
                    f"TLS with SMTP server {host} failed: {exc.reason or type(exc).__name__}"
                ) from exc
            except BaseException:
                self._cut_quietly(smtp)
                raise
        assert smtp is not None
        return smtp

    def _cut_quietly(self, smtp: smtplib.SMTP | None) -> None:
        if smtp is not None:
            self._cut(smtp)

    def _ehlo(self, smtp: smtplib.SMTP) -> None:
        code, text = smtp.ehlo()
        if code != 250:
            # No ESMTP means no STARTTLS and no AUTH: nothing medsecure may use.
            raise self._status_error(
                f"SMTP server {self.server.host} refused EHLO", SmtpReply.of(code, text)
            )

    def _authenticate(self, smtp: smtplib.SMTP) -> None:
        server = self.server
        host = server.host
        if server.security == "starttls" and not isinstance(smtp.sock, ssl.SSLSocket):
            raise TransportError("refusing to authenticate without TLS")  # defensive
        offered = set(smtp.esmtp_features.get("auth", "").upper().split())
        user = server.username or ""
        if server.oauth_token is not None:
            if "XOAUTH2" not in offered:
                raise TransportError(f"SMTP server {host} does not offer XOAUTH2")
            mechanism = "XOAUTH2"
            calls = [0]

            def respond(challenge: bytes | None = None) -> str:
                calls[0] += 1
                if calls[0] > 1:
                    return ""  # the server sent an error challenge: answer empty (RFC 7628)
                return f"user={user}\x01auth=Bearer {server.token()}\x01\x01"

        else:
            if "PLAIN" in offered:
                mechanism = "PLAIN"

                def respond(challenge: bytes | None = None) -> str:
                    return f"\0{user}\0{server.secret()}"

            elif "LOGIN" in offered:
                mechanism = "LOGIN"
                step = [0]

                def respond(challenge: bytes | None = None) -> str:
                    step[0] += 1
                    return user if step[0] == 1 else server.secret()

            else:
                raise TransportError(f"SMTP server {host} offers neither AUTH PLAIN nor LOGIN")
        try:
            smtp.auth(mechanism, respond, initial_response_ok=mechanism != "LOGIN")
        except smtplib.SMTPAuthenticationError as exc:
            reply = SmtpReply.of(exc.smtp_code, exc.smtp_error)
            if classify(reply.code) == "transient":
                raise TransportUnavailable(
                    f"SMTP server {host} could not authenticate now: {reply}"
                ) from exc
            raise TransportError(
                f"SMTP server {host} refused the credentials ({mechanism}): {reply}"
            ) from exc
        except UnicodeEncodeError as exc:
            raise TransportError("the mail credentials are not ASCII") from exc
        except smtplib.SMTPException as exc:
            raise TransportError(f"SMTP authentication with {host} failed") from exc

    def _ready(self) -> tuple[smtplib.SMTP, bool]:
        """A connection ready for a new transaction, and whether it is a reused one.

        A reused connection is not probed (a RSET would cost a round trip per message): every
        transaction ends in a clean state (success, or a RSET after a refusal), and one the
        server closed meanwhile fails at MAIL, before anything of the message was sent, which
        :meth:`submit` retries once on a fresh connection."""
        return self._opened()

    @staticmethod
    def _status_error(what: str, reply: SmtpReply) -> TransportError:
        if classify(reply.code) == "transient":
            return TransportUnavailable(f"{what}: {reply}")
        return TransportError(f"{what}: {reply}")

    # -- submission ----------------------------------------------------------------------------

    def submit(
        self,
        message: BinaryIO,
        *,
        sender: str,
        recipients: Sequence[str],
        envid: str | None = None,
        size: int | None = None,
        dsn: bool = True,
    ) -> SubmitResult:
        """Submit one message read from ``message`` (a binary stream, read once, in chunks).

        ``sender`` is the envelope sender (``""`` for the null reverse-path), ``recipients`` the
        envelope recipients. With ``dsn`` (the default), when the server advertises DSN
        (RFC 3461), delivery notifications are requested: ``NOTIFY=SUCCESS,FAILURE`` and
        ``ORCPT`` per recipient, ``RET=HDRS`` and ``ENVID=envid`` (the message id, at most 100
        characters). ``size`` (bytes) is declared with SIZE when the server advertises it.

        Returns a :class:`SubmitResult` when at least one recipient was accepted. Raises
        :class:`RecipientsRefused` (a :class:`~medsecure.DeliveryRejected`) when every recipient
        was refused for good, :class:`~medsecure.DeliveryRejected` for a permanent refusal of
        the message, :class:`~medsecure.TransportUnavailable` for a transient one or a lost
        connection (then nothing is known to be accepted: submit the same message again later),
        :class:`~medsecure.TransportError` for TLS, authentication or configuration failures,
        and :class:`~medsecure.StorageError` when ``message`` cannot be read.
        """
        if not hasattr(message, "read"):
            raise TypeError("message must be a binary stream")
        if isinstance(recipients, str) or not recipients:
            raise ValueError("recipients must be a non-empty list of addresses")
        if sender != "" and not _ADDR_RE.fullmatch(sender):
            raise ValueError("malformed sender address")
        for rcpt in recipients:
            if not isinstance(rcpt, str) or not _ADDR_RE.fullmatch(rcpt):
                raise ValueError("malformed recipient address")
        if len(set(recipients)) != len(recipients):
            raise ValueError("duplicate recipient address")
        if envid is not None and not re.fullmatch(r"[\x20-\x7e]{1,100}", envid):
            raise ValueError("envid must be printable ASCII, at most 100 characters")
        if size is not None and (not isinstance(size, int) or size < 0):
            raise ValueError("size must be a non-negative int")
        with self._lock:
            for attempt in (1, 2):
                smtp, reused = self._ready()
                try:
                    return self._transaction(smtp, message, sender, recipients, envid, size, dsn)
                except _Drop as drop:
                    self._drop()
                    # A reused connection closed under us before MAIL was accepted: nothing of
                    # this message was sent yet, so one fresh connection may try again.
                    if drop.before_mail and reused and attempt == 1:
                        continue
                    raise drop.error from drop.__cause__
                except MedsecureError:
                    raise  # a reply the server gave in good order: the connection stays usable
                except BaseException:
                    self._drop()  # unknown state (maybe mid-DATA): never reuse it
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _transaction(
        self,
        smtp: smtplib.SMTP,
        message: BinaryIO,
        sender: str,
        recipients: Sequence[str],
        envid: str | None,
        size: int | None,
        dsn: bool,
    ) -> SubmitResult:
        host = self.server.host
        use_dsn = dsn and smtp.has_extn("dsn")
        mail_options = []
        if size is not None and smtp.has_extn("size"):
            mail_options.append(f"SIZE={size}")
        if use_dsn:
            mail_options.append("RET=HDRS")
            if envid is not None:
                mail_options.append(f"ENVID={xtext(envid)}")

        reply = self._command(smtp, "MAIL", partial(smtp.mail, sender, mail_options), first=True)
        if reply.code != 250:
            self._reset(smtp)
            if classify(reply.code) == "transient":
                raise TransportUnavailable(f"SMTP server {host} deferred the sender: {reply}")
            raise DeliveryRejected(f"SMTP server {host} refused the sender: {reply}")

        accepted: list[str] = []
        refused: dict[str, SmtpReply] = {}
        deferred: dict[str, SmtpReply] = {}
        for rcpt in recipients:
            options = ["NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;{xtext(rcpt)}"] if use_dsn else []
            reply = self._command(smtp, "RCPT", partial(smtp.rcpt, rcpt, options))
            if reply.code in (250, 251):
                accepted.append(rcpt)
            elif classify(reply.code) == "transient":
                deferred[rcpt] = reply
            else:
                refused[rcpt] = reply
        if not accepted:
            self._reset(smtp)
            detail = "; ".join(
                f"recipient {i + 1}: {refused.get(r) or deferred.get(r)}"
                for i, r in enumerate(recipients)
            )
            if deferred:
                raise TransportUnavailable(f"SMTP server {host} deferred the recipients: {detail}")
            raise RecipientsRefused(f"SMTP server {host} refused the recipients: {detail}", refused)

        reply = self._command(smtp, "DATA", partial(smtp.docmd, "DATA"))
        if reply.code != 354:
            self._reset(smtp)
            if classify(reply.code) == "transient":
                raise TransportUnavailable(f"SMTP server {host} deferred the message: {reply}")
            raise DeliveryRejected(f"SMTP server {host} refused the message: {reply}")

        self._send_data(smtp, message)
        reply = self._command(smtp, "end of DATA", smtp.getreply)
        if reply.code != 250:
            if classify(reply.code) == "transient":
                raise TransportUnavailable(f"SMTP server {host} deferred the message: {reply}")
            raise DeliveryRejected(f"SMTP server {host} refused the message: {reply}")
        return SubmitResult(
            accepted=tuple(accepted),
            reply=reply,
            refused=refused,
            deferred=deferred,
            dsn_requested=use_dsn,
        )

    def _command(
        self,
        smtp: smtplib.SMTP,
        name: str,
        call: Callable[[], tuple[int, bytes]],
        *,
        first: bool = False,
    ) -> SmtpReply:
        """Run one smtplib command; a lost connection or a 421 drops it (``_Drop``)."""
        host = self.server.host
        try:
            code, text = call()
        except smtplib.SMTPServerDisconnected as exc:
            error = TransportUnavailable(f"SMTP server {host} closed the connection at {name}")
            raise _Drop(error, before_mail=first) from exc
        except OSError as exc:
            error = TransportUnavailable(
                f"SMTP connection to {host} failed at {name}: {exc.strerror or type(exc).__name__}"
            )
            raise _Drop(error, before_mail=first) from exc
        except smtplib.SMTPNotSupportedError as exc:
            raise _Drop(TransportError(f"SMTP server {host}: {exc}")) from exc
        reply = SmtpReply.of(code, text)
        if reply.code == 421 or reply.code < 0:
            # 421: the server is closing the channel (RFC 5321 §3.8); -1: unreadable reply.
            error = TransportUnavailable(
                f"SMTP server {host} closed the session at {name}: {reply}"
            )
            raise _Drop(error, before_mail=first)
        return reply

    def _reset(self, smtp: smtplib.SMTP) -> None:
        try:
            code, _ = smtp.rset()
        except (smtplib.SMTPException, OSError):
            code = -1
        if code != 250:
            self._drop()

    def _send_data(self, smtp: smtplib.SMTP, message: BinaryIO) -> None:
        """Stream the message as DATA in chunks over smtplib's socket.

        A failure while reading ``message`` closes the connection without the final ``.``: the
        server then discards the partial message (RFC 5321 §4.1.1.4) instead of delivering a
        truncated one.
        """
        host = self.server.host
        encoder = DataEncoder()
        sock = smtp.sock
        if sock is None:
            raise _Drop(TransportUnavailable(f"SMTP server {host} closed the connection"))
        # Reads may return less than asked (a message produced on demand yields its pieces):
        # they are gathered up to one chunk per write, so a small message goes out in one
        # TLS record instead of one per header block and part (memory stays one chunk).
        pending = bytearray()
        while True:
            try:
                chunk = message.read(self._chunk)
            except OSError as exc:
                raise _Drop(StorageError("cannot read the message to submit")) from exc
            if not chunk:
                break
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise TypeError("message must be a binary stream")
            pending += encoder.feed(bytes(chunk))
            if len(pending) >= self._chunk:
                self._sendall(sock, bytes(pending))
                pending.clear()
        pending += encoder.finish()
        self._sendall(sock, bytes(pending))

    def _sendall(self, sock: object, data: bytes) -> None:
        if not data:
            return
        try:
            sock.sendall(data)  # type: ignore[attr-defined]
        except OSError as exc:
            error = TransportUnavailable(
                f"SMTP connection to {self.server.host} lost during DATA: "
                f"{exc.strerror or type(exc).__name__}"
            )
            raise _Drop(error) from exc
