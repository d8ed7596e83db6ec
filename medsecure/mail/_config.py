"""Mail server settings, the TLS context built from them, DNS SRV autoconfiguration, and the
vocabulary shared by the mail drivers (:class:`MailItem`, error translation).

Theory of operation
-------------------
A :class:`MailServer` says where a submission (SMTP) or retrieval (IMAP) server is and how to log
in. It holds no secret itself: a password is named by an environment variable or produced by a
callable, and an OAuth access token (a Pro Santé Connect token, Ségur CONF.28) always comes from a
callable that the drivers call at each login and never keep.

Every connection is TLS 1.2 or newer with certificate and host-name verification, built here by
:func:`tls_context` (never ``ssl._create_stdlib_context``): either implicit TLS (``"tls"``: SMTP
port 465, IMAPS 993) or STARTTLS (``"starttls"``: submission 587, IMAP 143), where a server that
does not offer STARTTLS is refused before any credential is sent. An application mailbox may
authenticate with a client certificate (IGC-Santé "ORG" certificates, Ségur CONF.27).

:func:`discover` implements RFC 6186 (Ségur CONF.04): ``_submissions._tcp`` / ``_submission._tcp``
and ``_imaps._tcp`` / ``_imap._tcp`` SRV records of the mail domain, with dnspython (extra
``mail``). DNS answers are unauthenticated: as RFC 6186 §6 and RFC 7817 §4 advise, the targets are
suggestions that a person confirms (``medsecure init`` shows them); TLS then verifies the target's
certificate for the target's name.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .._errors import ConfigError, TransportError, TransportUnavailable

__all__ = [
    "DiscoveredServer",
    "MailItem",
    "MailServer",
    "Security",
    "discover",
    "tls_context",
]

Security = Literal["starttls", "tls"]

_DEFAULT_PORTS: dict[tuple[str, str], int] = {
    ("smtp", "starttls"): 587,
    ("smtp", "tls"): 465,
    ("imap", "starttls"): 143,
    ("imap", "tls"): 993,
}
# RFC 1123 host names and IP literals; anything else (spaces, CR/LF, "@") is misuse.
_HOST_RE = re.compile(r"[A-Za-z0-9._:-]{1,253}")
# Printable ASCII without spaces: user names go into SMTP AUTH and IMAP commands.
_USER_RE = re.compile(r"[\x21-\x7e]{1,320}")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


@dataclass(frozen=True)
class MailServer:
    """Where a mail server is and how to log in to it (no secret is stored in it).

    ``security`` is ``"starttls"`` (port 587 for SMTP, 143 for IMAP) or ``"tls"`` (implicit TLS,
    465 / 993); ``port=None`` picks the standard port for the protocol. The password comes from
    the environment variable ``password_env`` or from the callable ``password``; ``oauth_token``,
    a callable returning a fresh access token, selects XOAUTH2 instead. ``ca_file`` replaces the
    system's trust store with the given PEM file (an operator's private CA, or a test CA).
    ``client_cert`` / ``client_key`` (PEM files; the key may be in the certificate file) present a
    client certificate; ``client_key_password`` decrypts the key.
    """

    host: str
    port: int | None = None
    security: Security = "starttls"
    username: str | None = None
    password_env: str | None = None
    password: Callable[[], str] | None = field(default=None, repr=False)
    oauth_token: Callable[[], str] | None = field(default=None, repr=False)
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    client_key_password: Callable[[], str] | None = field(default=None, repr=False)
    timeout: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not _HOST_RE.fullmatch(self.host):
            raise ValueError("host must be a host name or an IP address")
        if self.security not in ("starttls", "tls"):
            raise ValueError('security must be "starttls" or "tls"')
        if self.port is not None and (
            isinstance(self.port, bool)
            or not isinstance(self.port, int)
            or not 0 < self.port < 65536
        ):
            raise ValueError("port must be between 1 and 65535")
        if self.username is not None and not _USER_RE.fullmatch(self.username):
            raise ValueError("username must be printable ASCII without spaces")
        if self.password_env is not None and not _ENV_RE.fullmatch(self.password_env):
            raise ValueError("password_env must be an environment variable name")
        if self.password_env is not None and self.password is not None:
            raise ValueError("give password_env or password, not both")
        if self.oauth_token is not None and (self.password_env or self.password):
            raise ValueError("give a password or an oauth_token, not both")
        if (self.password_env or self.password or self.oauth_token) and not self.username:
            raise ValueError("credentials need a username")
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("client_key needs client_cert")
        if not self.timeout > 0:
            raise ValueError("timeout must be positive")

    def port_for(self, protocol: Literal["smtp", "imap"]) -> int:
        """The port to connect to: ``port`` or the standard one for ``protocol`` and security."""
        return self.port if self.port is not None else _DEFAULT_PORTS[(protocol, self.security)]

    @property
    def has_credentials(self) -> bool:
        """Whether the drivers will authenticate (a password source or a token callable)."""
        return bool(self.password_env or self.password or self.oauth_token)

    def secret(self) -> str:
        """The password, read now from its source (never kept by the drivers). Raises
        :class:`~medsecure.ConfigError` when the variable is not set or the value is unusable."""
        if self.password is not None:
            value = self.password()
        elif self.password_env is not None:
            value = os.environ.get(self.password_env, "")
            if not value:
                raise ConfigError(f"the mail password variable {self.password_env} is not set")
        else:
            raise ConfigError("no mail password is configured")
        if not isinstance(value, str) or not value or "\r" in value or "\n" in value:
            raise ConfigError("the configured mail password is not a usable string")
        return value

    def token(self) -> str:
        """A fresh OAuth access token from ``oauth_token`` (never kept by the drivers). Raises
        :class:`~medsecure.ConfigError` when no source is configured or it returns an unusable
        token; what the callable itself raises passes through."""
        if self.oauth_token is None:
            raise ConfigError("no OAuth token source is configured")
        value = self.oauth_token()
        if not isinstance(value, str) or not re.fullmatch(r"[\x21-\x7e]{1,16384}", value):
            raise ConfigError("the OAuth token source returned an unusable token")
        return value


def tls_context(server: MailServer) -> ssl.SSLContext:
    """A client TLS context for ``server``: TLS 1.2 or newer, certificate and host-name
    verification, the system's CAs or ``server.ca_file``, and the client certificate if any.
    Raises :class:`~medsecure.ConfigError` when a configured file cannot be read or used."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=server.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        if server.client_cert is not None:
            ctx.load_cert_chain(
                server.client_cert, server.client_key, password=server.client_key_password
            )
    except (OSError, ssl.SSLError) as exc:
        # The file names are configuration, not health data; the reason is the library's.
        raise ConfigError(
            f"cannot load the TLS certificates configured for {server.host}: "
            f"{getattr(exc, 'strerror', None) or type(exc).__name__}"
        ) from exc
    return ctx


@dataclass(frozen=True)
class MailItem:
    """A message waiting in a mailbox folder (IMAP or Maildir).

    ``handle`` is opaque and stable while the message stays in the folder (for IMAP it names the
    folder's UIDVALIDITY and the message's UID; for Maildir the file's unique name). ``size`` is
    what the server or file system says, an untrusted hint. ``header`` is the first bytes of the
    message header when the listing was asked for them (untrusted, possibly truncated).
    """

    handle: str
    size: int | None = None
    header: bytes | None = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------
# Error translation helpers shared by the drivers

_CTRL_RE = re.compile(r"[\x00-\x1f\x7f]+")
_ADDR_RE = re.compile(r"<?[^\s<>@]+@[^\s<>@]+>?")


def server_text(text: bytes | str, *, limit: int = 300) -> str:
    """A server's reply text made safe to put in an error message: one line, printable, no
    mail address (a patient mailbox's local part is an INS), at most ``limit`` characters."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = _CTRL_RE.sub(" ", text).strip()
    text = _ADDR_RE.sub("<address>", text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def tls_failure(host: str, exc: ssl.SSLError) -> TransportError:
    """The error for a failed TLS handshake (certificate, host name or protocol version)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or "certificate verification failed"
        return TransportError(f"TLS certificate of {host} refused: {reason}")
    return TransportError(f"TLS handshake with {host} failed: {exc.reason or type(exc).__name__}")


@contextlib.contextmanager
def translate_os_errors(what: str, host: str) -> Iterator[None]:
    """Translate the socket-level errors common to both drivers."""
    try:
        yield
    except ssl.SSLError as exc:  # before ValueError: SSLCertVerificationError is one
        if isinstance(exc, ssl.SSLCertVerificationError):
            raise tls_failure(host, exc) from exc
        raise TransportUnavailable(
            f"{what} {host}: TLS error {exc.reason or type(exc).__name__}"
        ) from exc
    except (TransportError, TypeError, ValueError):
        raise
    except TimeoutError as exc:
        raise TransportUnavailable(f"{what} {host}: timed out") from exc
    except socket.gaierror as exc:
        raise TransportUnavailable(f"{what} {host}: name not resolved") from exc
    except OSError as exc:
        raise TransportUnavailable(f"{what} {host}: {exc.strerror or type(exc).__name__}") from exc


# ---------------------------------------------------------------------------------------------
# RFC 6186 autoconfiguration


@dataclass(frozen=True)
class DiscoveredServer:
    """One SRV answer of :func:`discover`: a suggestion to confirm, not a trusted setting.

    ``in_domain`` is true when the target is the mail domain itself or one of its sub-domains
    (RFC 7817 §4: otherwise the DNS answer alone does not bind the target to the domain).
    """

    protocol: Literal["smtp", "imap"]
    host: str
    port: int
    security: Security
    priority: int
    weight: int
    in_domain: bool

    def settings(self, **kwargs: object) -> MailServer:
        """A :class:`MailServer` for this target; ``kwargs`` add credentials and TLS files."""
        return MailServer(
            host=self.host,
            port=self.port,
            security=self.security,
            **kwargs,  # type: ignore[arg-type]
        )


# Service labels in preference order: implicit TLS first (RFC 8314 §5.1), then STARTTLS.
_SERVICES: dict[str, tuple[tuple[str, Security], ...]] = {
    "smtp": (("_submissions._tcp", "tls"), ("_submission._tcp", "starttls")),
    "imap": (("_imaps._tcp", "tls"), ("_imap._tcp", "starttls")),
}
_DOMAIN_RE = re.compile(r"(?=.{1,253}$)([A-Za-z0-9-]{1,63}\.)*[A-Za-z0-9-]{1,63}\.?")


def discover(
    domain: str,
    *,
    protocols: Sequence[Literal["smtp", "imap"]] = ("smtp", "imap"),
    nameserver: tuple[str, int] | None = None,
    timeout: float = 5.0,
) -> list[DiscoveredServer]:
    """Look up the RFC 6186 SRV records of a mail ``domain`` (the part after ``@``).

    Returns the targets found, per protocol in preference order (implicit TLS before STARTTLS,
    then SRV priority, then weight); a target of ``"."`` (service explicitly absent) is left
    out. ``nameserver`` (address, port) replaces the system resolver (tests use a responder on
    loopback). Needs dnspython (``pip install medsecure[mail]``). Raises
    :class:`~medsecure.TransportUnavailable` when DNS cannot answer.
    """
    if not isinstance(domain, str) or not _DOMAIN_RE.fullmatch(domain):
        raise ValueError("not a mail domain")
    for protocol in protocols:
        if protocol not in _SERVICES:
            raise ValueError("protocols are 'smtp' and 'imap'")
    try:
        import dns.exception
        import dns.resolver
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise TransportError(
            "DNS autoconfiguration needs dnspython: pip install 'medsecure[mail]'"
        ) from exc

    if nameserver is None:
        resolver = dns.resolver.Resolver()
    else:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [nameserver[0]]
        resolver.port = nameserver[1]
    resolver.lifetime = timeout
    resolver.timeout = timeout

    base = domain.rstrip(".").lower()
    found: list[DiscoveredServer] = []
    for protocol in protocols:
        for label, security in _SERVICES[protocol]:
            try:
                answer = resolver.resolve(f"{label}.{base}.", "SRV", raise_on_no_answer=False)
            except dns.resolver.NXDOMAIN:
                continue
            except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
                raise TransportUnavailable(f"DNS lookup of {label}.{base} failed") from exc
            except dns.exception.DNSException as exc:
                raise TransportUnavailable(
                    f"DNS lookup of {label}.{base} failed: {type(exc).__name__}"
                ) from exc
            records = []
            for rdata in answer.rrset or ():
                target = rdata.target.to_text(omit_final_dot=True).lower()
                if target in ("", ".") or not _HOST_RE.fullmatch(target) or rdata.port == 0:
                    continue  # "." means "no such service here" (RFC 2782, RFC 6186 §3.4)
                records.append((rdata.priority, -rdata.weight, target, rdata.port, rdata.weight))
            for priority, _, target, port, weight in sorted(records):
                found.append(
                    DiscoveredServer(
                        protocol=protocol,
                        host=target,
                        port=port,
                        security=security,
                        priority=priority,
                        weight=weight,
                        in_domain=target == base or target.endswith("." + base),
                    )
                )
    return found
