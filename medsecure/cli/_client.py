"""``medsecure init | send | receive | outbox | flush | quarantine [release] | status | audit``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

import medsecure
import medsecure.identifiers
from medsecure.client import default_home

from ._app import (
    PROGRESS_THRESHOLD,
    PUBLIC_SUFFIX,
    CliError,
    TemporaryFailure,
    about,
    check_digit,
    check_ref,
    cli,
    load_public,
    passphrase,
    passphrase_hint,
    public_beside,
)
from ._files import output as output_file
from ._files import private_folder, write_file
from ._network import Network, network_from_options, network_options

_home_option = click.option(
    "--home",
    type=click.Path(),
    help="The medsecure home (default: $MEDSECURE_HOME or the per-user data folder).",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _home(home: str | None) -> Path:
    return Path(home).expanduser() if home else default_home()


def _existing_home(home: str | None) -> tuple[Path, dict[str, Any]]:
    """A home folder and its configuration; what every command that reads a home accepts."""
    root = _home(home)
    try:
        cfg = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CliError(
            f"--home: {str(root)!r} is not a medsecure home (no config.json): run 'medsecure init'"
        ) from exc
    except (OSError, ValueError) as exc:
        raise CliError("--home: cannot read the home's config.json") from exc
    if not isinstance(cfg, dict) or cfg.get("format") != "medsecure-home":
        raise CliError(f"--home: {str(root)!r} is not a medsecure home (bad config.json)")
    return root, cfg


def _client(home: str | None) -> medsecure.Client:
    root = _home(home)
    secret = passphrase(confirm=False)
    with about("--home", "open the home"):
        try:
            return medsecure.client_from_home(root, passphrase=secret)
        except medsecure.IdentityError as exc:  # the home's key file did not decrypt
            raise CliError(f"--home: {exc}{passphrase_hint()}") from exc


def _status_dict(s: medsecure.RecipientStatus) -> dict[str, Any]:
    return {
        "recipient": s.recipient,
        "status": s.status,
        "endpoint": s.endpoint,
        "attempts": s.attempts,
        "error": s.error,
        "skipped": list(s.skipped),
    }


def _skipped(s: medsecure.RecipientStatus) -> str:
    """Why endpoints were passed over for the one that took the message (empty if none was)."""
    return "skipped " + "; ".join(s.skipped) if s.skipped else ""


_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]*@")


def _shown(name: str) -> str:
    """A transport's name as printed: without credentials a URL in it might carry."""
    return _CREDENTIALS.sub("", name)


@contextlib.contextmanager
def _bar(total: int, label: str) -> Iterator[Any]:
    if total >= PROGRESS_THRESHOLD and sys.stderr.isatty():
        with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
            yield bar.update
    else:
        yield None


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what creating it will add)."""
    missing = None
    p = path.absolute()
    while not os.path.lexists(p):
        missing = p
        if p.parent == p:
            break
        p = p.parent
    return missing


@contextlib.contextmanager
def _undone_on_failure(root: Path, mailbox: Path | None) -> Iterator[None]:
    """Remove what a failed (or interrupted) init created, and only that."""
    created = [m for m in (_first_missing(root), mailbox and _first_missing(mailbox)) if m]
    before = set(os.listdir(root)) if root.is_dir() else None
    try:
        yield
    except BaseException:
        for top in created:
            shutil.rmtree(top, ignore_errors=True)
        if before is not None and root.is_dir():
            for name in set(os.listdir(root)) - before:
                path = root / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()
        raise


def _check_mailbox(box: Path) -> None:
    """Refuse a --mailbox that cannot become a drop folder before anything is created, naming
    the flag (init would otherwise fail half-way and blame --home)."""
    existing = box
    while not existing.exists() and not existing.is_symlink():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing == box:
        if not box.is_dir() or box.is_symlink():
            raise CliError(f"--mailbox: {str(box)!r} exists and is not a folder")
    elif not existing.is_dir() or existing.is_symlink():
        raise CliError(f"--mailbox: {str(existing)!r} is in the way and is not a folder")


def _next_steps(root: Path, me: str, authorities: bool, net: Network, fingerprint: str) -> str:
    key_pub = root / f"identity.key{PUBLIC_SUFFIX}"
    home = f" --home {root}"
    lines = [
        "Next steps (docs/getting-started.md walks through them):",
        f"  1. Give your public key file to the practitioners who will write to you: {key_pub}",
        "     and compare its fingerprint with them over another channel (phone, in person).",
    ]
    if net.relay is not None:
        lines.append(f"     Your mailbox on the relay {net.relay} is {fingerprint}")
    if net.mail_address is not None:
        lines.append(f"     Your mail address for medsecure messages is {net.mail_address}")
    if net.relay is not None or net.mail_address is not None:
        lines.append(
            f"     Your directory entry ({root / 'directory.json'}) lists where to reach you:"
            " give it with your key."
        )
    if authorities:
        lines += [
            "  2. Have your directory authority sign your key; give the statement with your key:",
            f"       medsecure trust sign --authority AUTHORITY.key --idnps {me} --key {key_pub}"
            " -o me.binding",
        ]
    else:
        lines += [
            "  2. (trust on first use: no authority signs keys; the first key your directory",
            "     lists for a practitioner is pinned, so add only keys you have checked)",
        ]
    reach = []
    if net.relay is not None:
        reach.append(f"--relay {net.relay} --relay-mailbox THEIR_FINGERPRINT")
    if net.mail_address is not None:
        reach.append("--mail THEIR_ADDRESS")
    if not reach:
        reach.append("--drop THEIR_FOLDER")
    lines += [
        "  3. Add each correspondent to your directory, with their key and "
        + ("where to reach them:" if net.relay or net.mail_address else "drop folder:"),
        f"       medsecure directory add --directory {root / 'directory.json'} --idnps rpps:…"
        " --key THEIR.pub"
        + (" --statement THEIR.binding" if authorities else "")
        + " "
        + " ".join(reach),
        "     (or import the directory file they give you: medsecure directory import"
        f" --directory {root / 'directory.json'} THEIR_directory.json)",
    ]
    if net.mail_password_env is not None:
        lines.append(
            f"     The mail password is read from ${net.mail_password_env} at each login"
            " (never stored): set it before sending or receiving."
        )
    lines += [
        f"  4. Send:    medsecure send FILE --to rpps:…{home}",
        f"     Receive: medsecure receive -o received/{home}",
    ]
    return "\n".join(lines)


@cli.command()
@_home_option
@click.option("--me", required=True, help="Who you are: rpps:…, adeli:… or your IDNPS.")
@click.option("--mailbox", type=click.Path(), help="Your drop folder (default: HOME/mailbox).")
@click.option("--family", help="Your family name (for your directory entry).")
@click.option("--given", help="Your given name.")
@click.option("--classic", is_flag=True, help="X25519 + Ed25519 only (not post-quantum).")
@click.option(
    "--authority",
    "authorities",
    multiple=True,
    help="Trusted directory authority public key (repeatable).",
)
@click.option(
    "--unsafe-tofu",
    is_flag=True,
    help="No authority: trust the first key your directory lists for each practitioner.",
)
@click.option(
    "--directory",
    "directory_files",
    multiple=True,
    type=click.Path(),
    help="Directory file(s) to use (default: HOME/directory.json).",
)
@click.option(
    "--fhir",
    "fhir_url",
    help="Also use this Annuaire Santé FHIR base URL (API key from $ESANTE_API_KEY).",
)
@network_options
@_json_option
def init(
    home: str | None,
    me: str,
    mailbox: str | None,
    family: str | None,
    given: str | None,
    classic: bool,
    authorities: tuple[str, ...],
    unsafe_tofu: bool,
    directory_files: tuple[str, ...],
    fhir_url: str | None,
    as_json: bool,
    **network: Any,
) -> None:
    """Create a medsecure home: identity, configuration, mailbox; print your public key and
    the next steps. Say who vouches for keys: --authority KEY, or explicitly --unsafe-tofu.

    A relay (--relay URL) and a mailbox (--mail-address with --smtp and --imap or --maildir)
    are optional transports; they come before the drop folder."""
    if bool(authorities) == unsafe_tofu:
        raise CliError(
            "say how keys are trusted: --authority AUTHORITY.pub (a key that signs "
            "practitioners' keys) or --unsafe-tofu (trust the first key seen), not both"
            if authorities
            else "say how keys are trusted: --authority AUTHORITY.pub (a key that signs "
            "practitioners' keys) or --unsafe-tofu (trust the first key seen)"
        )
    with about("--me", "read the identifier"):
        ident = medsecure.identifiers.parse(me)
    check_digit(ident, "--me")
    idnps = ident.idnps
    root = _home(home)
    if (root / "config.json").exists():
        raise CliError(f"--home: {str(root)!r} is already a medsecure home")
    net = network_from_options(network)
    trust: dict[str, Any] = (
        {"authorities": [str(load_public(a, "--authority")) for a in authorities]}
        if authorities
        else {"mode": "unsafe-tofu"}
    )
    sources: list[dict[str, Any]] = [{"file": str(Path(f).resolve())} for f in directory_files] or [
        {"file": "directory.json"}
    ]
    if fhir_url:
        sources.append({"fhir": fhir_url, "api_key_env": "ESANTE_API_KEY"})
    box = Path(mailbox).expanduser() if mailbox else None
    if box is not None:
        _check_mailbox(box)
    secret = passphrase(confirm=True)
    with _undone_on_failure(root, box), about("--home", "create the home"):
        if box is not None:
            from medsecure.transports import FileTransport

            with about("--mailbox", "create the drop folder"):
                FileTransport.prepare(box)
        identity = medsecure.init_home(
            root,
            passphrase=secret,
            me=idnps,
            mailbox=box,
            suite="classic" if classic else "hybrid",
            directory=sources,
            trust=trust,
            family_name=family,
            given_name=given,
            relay=net.relay,
            transports=net.transports,
            endpoints=net.endpoints,
        )
        write_file(
            root / f"identity.key{PUBLIC_SUFFIX}",
            (str(identity.public) + "\n").encode("ascii"),
            flag="--home",
            mode=0o644,
        )
    if as_json:
        info: dict[str, Any] = {
            "home": str(root),
            "fingerprint": identity.fingerprint,
            "public_key": str(identity.public),
            "public_key_file": str(root / f"identity.key{PUBLIC_SUFFIX}"),
        }
        if net.relay is not None:
            info["relay"] = {"url": net.relay, "mailbox": identity.fingerprint}
        if net.mail_address is not None:
            info["mail"] = {"address": net.mail_address}
        click.echo(json.dumps(info))
    else:
        click.echo(f"home: {root}")
        click.echo(f"fingerprint: {identity.fingerprint}")
        click.echo(f"public key: {identity.public}")
        if net.relay is not None:
            click.echo(f"relay: {net.relay} (mailbox {identity.fingerprint})")
        if net.mail_address is not None:
            click.echo(f"mail: {net.mail_address}")
    for warning in net.warnings:
        click.echo(f"warning: {warning}", err=True)
    if not authorities:
        click.echo(
            "warning: no directory authority: keys are trusted on first use (unsafe-tofu); "
            "compare fingerprints out of band",
            err=True,
        )
    click.echo(_next_steps(root, idnps, bool(authorities), net, identity.fingerprint), err=True)


@cli.command(name="send")
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option(
    "--to",
    "to",
    multiple=True,
    required=True,
    help="Recipient: rpps:…, adeli:…, IDNPS or MSSanté address (repeatable).",
)
@click.option("--subject", help="Subject (travels encrypted).")
@click.option("--body", help="Text body (travels encrypted).")
@click.option(
    "--receipt",
    "receipts",
    multiple=True,
    type=click.Choice(["delivered", "read"]),
    help="Ask for receipts.",
)
@_home_option
@_json_option
def send_cmd(
    files: tuple[str, ...],
    to: tuple[str, ...],
    subject: str | None,
    body: str | None,
    receipts: tuple[str, ...],
    home: str | None,
    as_json: bool,
) -> None:
    """Send FILES end to end encrypted to the recipients."""
    for ref in to:  # a typo is told before the passphrase is asked and the home opened
        check_ref(ref, "--to")
    docs = []
    for i, f in enumerate(files, 1):
        # the document is named by its position: its file name may name the patient
        with about(f"FILES (document #{i})", "read the document"):
            docs.append(medsecure.Document.from_path(f))
    with _client(home) as client, _bar(sum(d.size for d in docs), "sealing") as update:
        try:
            result = client.send(
                docs, to=list(to), subject=subject, body=body, receipts=receipts, progress=update
            )
        except (medsecure.DirectoryError, medsecure.TrustError) as exc:
            raise CliError(f"--to: {exc}") from exc  # which recipient could not be resolved
    if as_json:
        click.echo(
            json.dumps(
                {
                    "message_id": result.message_id,
                    "recipients": [_status_dict(s) for s in result.recipients],
                }
            )
        )
    else:
        click.echo(f"message {result.message_id}")
        for s in result.recipients:
            notes = [n for n in (s.error, _skipped(s)) if n]
            via = f" via {s.endpoint}" if s.skipped else ""
            click.echo(
                f"  {s.recipient}: {s.status}{via}" + (f" ({'; '.join(notes)})" if notes else "")
            )
    if any(s.status == "failed" for s in result.recipients):
        raise CliError("delivery failed for some recipients (see the outbox)")


_UNSAFE = re.compile(r"[^\w.\- ]+")


def _safe_name(name: str | None, fallback: str) -> str:
    cleaned = _UNSAFE.sub("_", name or "").strip(" .")
    return cleaned[:120] or fallback


_MESSAGE_ID = re.compile(r"[0-9A-Z]{26}")


def _holds_another_message(meta: Path, msg: medsecure.ReceivedMessage) -> bool:
    """Whether ``meta`` is the message.json of a message other than ``msg`` (same message id,
    another sender). A link or anything unreadable there is not a saved message."""
    try:
        if not meta.is_file() or meta.is_symlink():
            return False
        saved = json.loads(meta.read_bytes())
        sender = saved["sender"]["idnps"]
        return bool(saved["message_id"] != msg.message_id or sender != msg.sender.idnps)
    except (OSError, ValueError, KeyError, TypeError):
        return True  # a regular file we cannot read as ours: keep away from it


def _save_message(msg: medsecure.ReceivedMessage, out_dir: Path) -> list[str]:
    """Save a message's documents and ``message.json`` (sender, subject, body: health data) in
    a folder of its own, every file 0600 and written atomically, every folder 0700."""
    flag = "-o/--output"
    name = msg.message_id if _MESSAGE_ID.fullmatch(msg.message_id) else _safe_name(None, "message")
    # A message id is its sender's choice: another sender may reuse one already saved here.
    # Never write into a folder holding another message (its documents would be replaced).
    base, n = name, 1
    while _holds_another_message(out_dir / name / "message.json", msg):
        n += 1
        name = f"{base}-{n}"
    folder = private_folder(out_dir / name, flag)
    with about(flag, "protect the message folder"):
        os.chmod(folder, 0o700)  # a folder left by an older version may be wider
    saved: list[str] = []
    used: set[str] = set()
    for i, doc in enumerate(msg.documents):
        file_name = _safe_name(doc.filename, f"document-{i + 1}")
        while file_name in used or file_name == "message.json":
            file_name = f"{i + 1}-{file_name}"
        used.add(file_name)
        with about(flag, f"save document #{i + 1}"):
            doc.save(folder / file_name)
        saved.append(str(folder / file_name))
    meta = {
        "message_id": msg.message_id,
        "sender": msg.sender.model_dump(mode="json", exclude_defaults=True),
        "subject": msg.subject,
        "body": msg.body,
        "in_reply_to": msg.in_reply_to,
        "documents": [
            {"file": Path(p).name, "media_type": d.media_type, "title": d.title}
            for p, d in zip(saved, msg.documents, strict=True)
        ],
    }
    data = json.dumps(meta, ensure_ascii=False, indent=2).encode("utf-8")
    write_file(folder / "message.json", data, flag=flag, force=True, mode=0o600)
    return saved


@cli.command()
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    help="Save each message in a folder of its own (mode 0700) here, then acknowledge it.",
)
@click.option(
    "--limit", type=click.IntRange(1, 100000), help="Process at most this many new envelopes."
)
@_home_option
@_json_option
def receive(output: str | None, limit: int | None, home: str | None, as_json: bool) -> None:
    """Fetch and verify incoming messages; with -o, save them and acknowledge them."""
    out_dir = private_folder(Path(output), "-o/--output") if output else None
    listing = []
    with _client(home) as client:
        messages = client.receive(limit=limit)
        for msg in messages:
            entry: dict[str, Any] = {
                "message_id": msg.message_id,
                "sender": msg.sender.idnps,
                "sender_name": msg.sender.display_name,
                "subject": msg.subject,
                "documents": [],
            }
            if out_dir is not None:
                entry["documents"] = _save_message(msg, out_dir)
                msg.ack()  # only once everything is on disk
            else:
                entry["documents"] = [d.filename or d.id for d in msg.documents]
            listing.append(entry)
        quarantined = len(client.quarantine())
        unreachable = client.unreachable
        errors = client.mailbox_errors
    if as_json:
        click.echo(
            json.dumps(
                {
                    "messages": listing,
                    "quarantined": quarantined,
                    "unreachable": [name for name, _ in unreachable],
                },
                ensure_ascii=False,
            )
        )
    else:
        for e in listing:
            click.echo(
                f"{e['message_id']} from {e['sender_name']} ({e['sender']}): {len(e['documents'])} document(s)"
            )
        click.echo(
            f"{len(listing)} message(s)"
            + (f", {quarantined} in quarantine" if quarantined else ""),
            err=True,
        )
    if unreachable:
        from medsecure.transports import ClockSkew

        more = f" (and {len(unreachable) - 1} other mailbox(es))" if len(unreachable) > 1 else ""
        # a wrong URL, a refused signature or a clock to set right: retrying alone cannot help
        lasting = [
            (name, exc)
            for name, exc in errors
            if isinstance(exc, ClockSkew) or not isinstance(exc, medsecure.TransportUnavailable)
        ]
        if lasting:
            name, exc = lasting[0]
            raise CliError(
                f"could not read the {_shown(name)} mailbox: {exc}{more} (not a temporary failure)"
            )
        name, why = unreachable[0]
        raise TemporaryFailure(
            f"could not read the {_shown(name)} mailbox: {why}{more}; try again later"
        )


@cli.command()
@_home_option
@_json_option
def outbox(home: str | None, as_json: bool) -> None:
    """List sent messages and each recipient's status."""
    with _client(home) as client:
        entries = client.outbox()
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "message_id": e.message_id,
                        "created": e.created.isoformat(),
                        "size": e.size,
                        "recipients": [_status_dict(s) for s in e.recipients],
                    }
                    for e in entries
                ]
            )
        )
        return
    for e in entries:
        click.echo(f"{e.message_id}  {e.created:%Y-%m-%d %H:%M}  {e.size} bytes")
        for s in e.recipients:
            notes = [n for n in (s.error, _skipped(s)) if n]
            click.echo(
                f"  {s.recipient}: {s.status} via {s.endpoint}, {s.attempts} attempt(s)"
                + (f" — {'; '.join(notes)}" if notes else "")
            )


@cli.command()
@click.option(
    "--force", is_flag=True, help="Retry every queued delivery now, even before its backoff ends."
)
@_home_option
@_json_option
def flush(force: bool, home: str | None, as_json: bool) -> None:
    """Deliver what is pending in the outbox."""
    with _client(home) as client:
        if sys.stderr.isatty():
            with click.progressbar(length=1, label="delivering", file=sys.stderr) as bar:

                def step(done: int, total: int) -> None:
                    bar.length = total
                    bar.update(1)

                statuses = client.flush(force=force, progress=step)
        else:
            statuses = client.flush(force=force)
    if as_json:
        click.echo(json.dumps([_status_dict(s) for s in statuses]))
    else:
        for s in statuses:
            click.echo(f"{s.recipient}: {s.status}" + (f" ({s.error})" if s.error else ""))
        click.echo(f"{len(statuses)} delivery attempt(s)", err=True)


# A group whose bare invocation lists, as the command it replaces did: scripts running
# ``medsecure quarantine [--home H] [--json]`` see no change.
@cli.group(invoke_without_command=True)
@_home_option
@_json_option
@click.pass_context
def quarantine(ctx: click.Context, home: str | None, as_json: bool) -> None:
    """List incoming envelopes that failed verification; 'release ID' puts one back."""
    ctx.obj = {"home": home, "as_json": as_json}
    if ctx.invoked_subcommand is not None:
        return
    with _client(home) as client:
        items = client.quarantine()
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "id": q.id,
                        "received_at": q.received_at.isoformat(),
                        "reason": q.reason,
                        "path": str(q.path),
                    }
                    for q in items
                ]
            )
        )
    else:
        for q in items:
            click.echo(f"#{q.id} {q.received_at:%Y-%m-%d %H:%M}: {q.reason}")


_QUARANTINE_ID = re.compile(r"#?([0-9]{1,18})")  # ASCII digits only, as the listing prints them


@quarantine.command(name="release")
@click.argument("quarantine_id", metavar="ID")
@_home_option
@_json_option
@click.pass_context
def quarantine_release(
    ctx: click.Context, quarantine_id: str, home: str | None, as_json: bool
) -> None:
    """Put quarantined envelope ID back, to be verified again by the next 'receive' (once the
    cause is fixed: the sender added to the directory, its key trusted…)."""
    given = ctx.obj or {}
    if home and given.get("home") and home != given["home"]:
        raise CliError("--home: given twice, with different homes")
    home = home or given.get("home")
    as_json = as_json or bool(given.get("as_json"))
    match = _QUARANTINE_ID.fullmatch(quarantine_id)
    if match is None:
        raise CliError("ID: not a quarantine id (a number, as 'medsecure quarantine' lists them)")
    row_id = int(match.group(1))
    with _client(home) as client:
        released = client.release(row_id)  # audited ("release") by the client
    if not released:
        raise CliError(f"no envelope #{row_id} in quarantine ('medsecure quarantine' lists them)")
    if as_json:
        click.echo(json.dumps({"id": row_id, "released": True}))
        return
    again = "medsecure receive" + (f" --home {shlex.quote(home)}" if home else "")
    click.echo(f"#{row_id} released: '{again}' verifies it again")


@cli.command()
@click.argument("message_id")
@_home_option
@_json_option
def status(message_id: str, home: str | None, as_json: bool) -> None:
    """Show each recipient's status of a sent message (receipts included)."""
    with _client(home) as client:
        try:
            statuses = client.status(message_id)
        except medsecure.UnknownMessage as exc:
            raise CliError(
                f"no message {message_id!r} in the outbox ('medsecure outbox' lists them)"
            ) from exc
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        **_status_dict(s),
                        "receipts": list(s.receipts),
                        "late_receipts": list(s.late_receipts),
                        "reason": s.reason,
                    }
                    for s in statuses
                ]
            )
        )
        return
    for s in statuses:
        extra = f" (reason: {s.reason})" if s.reason else ""
        late = f" — late receipts: {', '.join(s.late_receipts)}" if s.late_receipts else ""
        click.echo(f"{s.recipient}: {s.status}{extra}{late}")


@cli.group()
def audit() -> None:
    """Check and export the tamper-evident audit log of a home."""


def _audit_folder(home: str | None) -> Path:
    """The audit log of a home; ``audit verify`` and ``audit export`` accept the same homes."""
    root, _ = _existing_home(home)
    folder = root / "audit"
    if not folder.is_dir():
        raise CliError(
            f"--home: {str(root)!r} has no audit log yet (nothing was sent or received), "
            "or it was removed"
        )
    return folder


def _checkpoint_key(home: str | None, key: str | None) -> medsecure.PublicIdentity:
    """The key that signs a home's checkpoints: --key, else the home identity's public key
    (read from identity.key.pub when present, so no passphrase is needed)."""
    if key:
        return load_public(key, "--key")
    root, cfg = _existing_home(home)
    identity = cfg.get("identity", "identity.key")
    if not isinstance(identity, str):
        raise CliError("--home: config.json names no identity file")
    path = Path(identity).expanduser()
    path = path if path.is_absolute() else root / path
    beside = public_beside(path)
    if beside is not None:
        return beside
    secret = passphrase(confirm=False)
    with about("--home", "read the home's identity"):
        return medsecure.Identity.load(path, passphrase=secret).public


@audit.command(name="verify")
@_home_option
@click.option("--key", help="Public key that signs the checkpoints (default: the home's identity).")
@_json_option
def audit_verify(home: str | None, key: str | None, as_json: bool) -> None:
    """Verify the chain and the signed checkpoints; report the first broken record."""
    from medsecure.audit import verify

    folder = _audit_folder(home)
    report = verify(folder, public=_checkpoint_key(home, key))
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": report.ok,
                    "records": report.records,
                    "checkpoints": report.checkpoints,
                    "first_broken": report.first_broken,
                    "problem": report.problem,
                    "file": report.file,
                    "torn_tail": report.torn_tail,
                    "warnings": report.warnings,
                }
            )
        )
    else:
        for w in report.warnings:
            click.echo(f"warning: {w}", err=True)
        if report.ok:
            click.echo(f"ok: {report.records} records, {report.checkpoints} signed checkpoints")
    if not report.ok:
        where = [f"record {report.first_broken}"] if report.first_broken is not None else []
        if report.file:
            where.append(f"in {report.file}")
        raise CliError(
            "audit log broken" + (f" at {' '.join(where)}" if where else "") + f": {report.problem}"
        )


def _date(value: str | None, flag: str) -> Any:
    import datetime as dt

    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise CliError(f"{flag}: bad date {value!r}: use YYYY-MM-DD or an ISO 8601 time") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


@audit.command(name="export")
@_home_option
@click.option("--since", help="Only records from this date/time (ISO 8601).")
@click.option("--until", help="Only records up to this date/time (ISO 8601).")
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True
)
@click.option("-o", "--output", type=click.Path(), help="Write here instead of stdout.")
def audit_export(
    home: str | None, since: str | None, until: str | None, fmt: str, output: str | None
) -> None:
    """Export records for a compliance officer (never any health data: there is none)."""
    from medsecure.audit import export

    folder = _audit_folder(home)
    start, end = _date(since, "--since"), _date(until, "--until")
    if output:
        with output_file(output, flag="-o/--output", force=True) as dst:
            text = io.TextIOWrapper(dst, encoding="utf-8", newline="")
            n = export(folder, text, since=start, until=end, fmt=fmt)
            text.flush()
            text.detach()
    else:
        n = export(folder, sys.stdout, since=start, until=end, fmt=fmt)
    click.echo(f"{n} record(s)", err=True)
