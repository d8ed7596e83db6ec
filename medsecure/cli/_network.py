"""``medsecure init``'s network transports: ``--relay URL`` and the mail options.

Every value is checked here, before anything is created, so that a mistake is one line naming
the option (never a password: the configuration names the variable that holds it, and no check
quotes a value). The sections themselves are built by the library —
``init_home(relay=URL)`` for the relay, :meth:`MailTransport.config_section` for mail — and
validated once more by ``init_home`` exactly as the client will read them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

import medsecure
from medsecure.models import Endpoint

from ._app import CliError

MAIL_PASSWORD_ENV = "MEDSECURE_MAIL_PASSWORD"  # noqa: S105 - the variable's name
DEFAULT_SECURITY = "starttls"

# The library's messages about a mail section, and the option each one is about. The first
# match wins: "username" before "'smtp'" (a user name error is about the smtp settings too),
# "'smtp'" before "address" ("host must be a host name or an IP address").
_MAIL_FLAGS: tuple[tuple[str, str], ...] = (
    ("username", "--mail-user"),
    ("password_env", "--mail-password-env"),
    ("TLS certificates", "--mail-ca-file"),
    ("X-MSS-NIL", "--product-reference"),
    ("product_reference", "--product-reference"),
    ("DNS", "--mail-discover"),
    ("'smtp'", "--smtp"),
    ("'imap'", "--imap"),
    ("Maildir", "--maildir"),
    ("maildir", "--maildir"),
    ("address", "--mail-address"),
)
# The mail options other than --mail-address (none of them means anything without it).
MAIL_OPTIONS = (
    "smtp",
    "imap",
    "maildir",
    "mail_security",
    "mail_user",
    "mail_password_env",
    "mail_ca_file",
    "mail_discover",
    "mail_dns",
    "product_reference",
    "mssante_fallback",
)


def mail_flag(message: str) -> str:
    """The option a library message about the mail section is about."""
    for needle, flag in _MAIL_FLAGS:
        if needle in message:
            return flag
    return "--mail-address"  # the section as a whole belongs to the address


def _flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def _host_port(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``HOST`` or ``HOST:PORT`` (an IPv6 literal has more colons and takes no port here, as
    in :meth:`MailTransport.config_section`)."""
    if value is None:
        return None
    host, sep, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    if not host or (sep and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536)):
        raise click.BadParameter("give HOST or HOST:PORT (PORT from 1 to 65535)")
    return value


def network_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options of ``medsecure init`` that set up the relay and mail transports."""
    options = [
        click.option(
            "--relay",
            metavar="URL",
            help="A relay's URL (https://…): its transport comes first, and your directory "
            "entry lists your mailbox there (named by your key's fingerprint).",
        ),
        click.option(
            "--mail-address",
            metavar="ADDRESS",
            help="Your mailbox (MSSanté or any mail service): medsecure messages are sent from "
            "it and read from it. The other mail options need it.",
        ),
        click.option(
            "--smtp",
            metavar="HOST[:PORT]",
            callback=_host_port,
            help="The SMTP submission server (default port: 587 with starttls, 465 with tls).",
        ),
        click.option(
            "--imap",
            metavar="HOST[:PORT]",
            callback=_host_port,
            help="The IMAP server where your mail is read (default port: 143 / 993).",
        ),
        click.option(
            "--maildir",
            metavar="DIR",
            type=click.Path(),
            help="Instead of --imap: a Maildir folder the mail server delivers to locally.",
        ),
        click.option(
            "--mail-security",
            type=click.Choice(["starttls", "tls"]),
            help="TLS for both servers: starttls (the default) or tls (implicit TLS).",
        ),
        click.option(
            "--mail-user",
            metavar="NAME",
            help="The login for both servers (default: the --mail-address).",
        ),
        click.option(
            "--mail-password-env",
            metavar="VAR",
            help=f"The environment variable that holds the mail password, read at each login "
            f"and never stored (default: {MAIL_PASSWORD_ENV}).",
        ),
        click.option(
            "--mail-ca-file",
            metavar="PEM",
            type=click.Path(),
            help="CA certificates (PEM) to verify the servers with, instead of the system's.",
        ),
        click.option(
            "--mail-discover",
            is_flag=True,
            help="Find the servers not given with --smtp/--imap in DNS (RFC 6186 SRV records of "
            "the address's domain), each time the client starts; only servers inside that "
            "domain are used.",
        ),
        click.option(
            "--mail-dns",
            metavar="ADDRESS[:PORT]",
            help="With --mail-discover: ask this DNS server instead of the system's resolver.",
        ),
        click.option(
            "--product-reference",
            metavar="REF",
            help="Your software's MSSanté product reference (X-MSS-NIL), put on every message.",
        ),
        click.option(
            "--mssante-fallback",
            is_flag=True,
            help="Allow the MSSanté profile for recipients without a medsecure key: TLS hop by "
            "hop only, not end to end; every such message is recorded in the audit log.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@dataclass
class Network:
    """What ``init_home`` takes for the network transports, and what to tell the user."""

    relay: str | None = None
    transports: list[dict[str, Any]] = field(default_factory=list)
    endpoints: list[Endpoint] = field(default_factory=list)
    mail_address: str | None = None
    mail_password_env: str | None = None
    warnings: list[str] = field(default_factory=list)


def relay_url(url: str, flag: str = "--relay") -> str:
    """A relay URL given on the command line, checked as the transports check it (no password,
    no query string: see ``check_relay_url``); one line naming ``flag`` otherwise."""
    from medsecure.transports._relay import check_relay_url  # httpx: only when used

    try:
        check_relay_url(url)
    except ValueError as exc:
        raise CliError(f"{flag}: {exc}") from None
    return url


def _dns_server(value: str) -> dict[str, Any]:
    host, sep, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    if not host or (sep and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536)):
        raise CliError("--mail-dns: give ADDRESS or ADDRESS:PORT (PORT from 1 to 65535)")
    return {"nameserver": host, "port": int(port) if sep else 53}


def network_from_options(options: dict[str, Any]) -> Network:
    """Check the network options of ``init`` and build what ``init_home`` takes."""
    net = Network()
    if options.get("relay") is not None:
        net.relay = relay_url(options["relay"])
    address = options.get("mail_address")
    given = [name for name in MAIL_OPTIONS if options.get(name) not in (None, False)]
    if address is None:
        if given:
            raise CliError(
                f"{_flag_of(given[0])}: the mail options need --mail-address (your mailbox)"
            )
        return net
    if options.get("imap") and options.get("maildir"):
        raise CliError("--maildir: give --imap or --maildir, not both")
    if not options.get("smtp") and not options.get("mail_discover"):
        raise CliError(
            "--smtp: the mail transport needs its SMTP server (HOST[:PORT]), "
            "or --mail-discover to find it in DNS"
        )
    if options.get("mail_dns") and not options.get("mail_discover"):
        raise CliError("--mail-dns: it is the DNS server of --mail-discover; add --mail-discover")
    if options.get("mssante_fallback") and not options.get("product_reference"):
        raise CliError(
            "--mssante-fallback: the MSSanté profile needs --product-reference (X-MSS-NIL)"
        )
    maildir = options.get("maildir")
    if maildir is not None:
        box = Path(maildir).expanduser()
        if box.exists() and not box.is_dir():
            raise CliError("--maildir: this is not a folder")
        if not (box / "new").is_dir():
            net.warnings.append(
                "--maildir: no Maildir there yet (no new/ folder): nothing is read from it until "
                "the mail server delivers there"
            )
    ca_file = options.get("mail_ca_file")
    if ca_file is not None and not os.path.isfile(ca_file):
        raise CliError("--mail-ca-file: no such file")
    from medsecure.transports import MailTransport  # the mail modules load only when used

    password_env = options.get("mail_password_env") or MAIL_PASSWORD_ENV
    try:
        section = MailTransport.config_section(
            address,
            smtp=options.get("smtp"),
            imap=options.get("imap"),
            maildir=maildir,
            security=options.get("mail_security") or DEFAULT_SECURITY,
            username=options.get("mail_user"),
            password_env=password_env,
            ca_file=ca_file,
            discover=bool(options.get("mail_discover")),
            product_reference=options.get("product_reference"),
            mssante_fallback=bool(options.get("mssante_fallback")),
        )
        if options.get("mail_dns"):
            section["discover"] = _dns_server(options["mail_dns"])
        # built as the client will build it (no connection is opened; --mail-discover asks DNS)
        MailTransport.from_config(section).close()
        endpoint = Endpoint(kind="mail", address=address)
    except CliError:
        raise
    except (ValueError, medsecure.MedsecureError) as exc:
        message = " ".join(str(exc).split())
        raise CliError(f"{mail_flag(message)}: {message}") from exc
    net.transports.append(section)
    net.endpoints.append(endpoint)
    net.mail_address = address
    net.mail_password_env = password_env
    return net
