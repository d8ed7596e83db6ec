"""``medsecure init | send | receive | outbox | flush | quarantine``."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from .._document import Document
from .._home import client_from_home, init_home
from ..client import Client, RecipientStatus, default_home
from ._app import PROGRESS_THRESHOLD, CliError, _load_public, _passphrase, cli

_home_option = click.option(
    "--home",
    type=click.Path(file_okay=False),
    help="The medsecure home (default: $MEDSECURE_HOME or the per-user data folder).",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _home(home: str | None) -> Path:
    return Path(home).expanduser() if home else default_home()


def _client(home: str | None) -> Client:
    return client_from_home(_home(home), passphrase=_passphrase(confirm=False))


def _status_dict(s: RecipientStatus) -> dict[str, Any]:
    return {
        "recipient": s.recipient,
        "status": s.status,
        "endpoint": s.endpoint,
        "attempts": s.attempts,
        "error": s.error,
    }


@contextlib.contextmanager
def _bar(total: int, label: str) -> Iterator[Any]:
    if total >= PROGRESS_THRESHOLD and sys.stderr.isatty():
        with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
            yield bar.update
    else:
        yield None


@cli.command()
@_home_option
@click.option("--me", required=True, help="Who you are: rpps:…, adeli:… or your IDNPS.")
@click.option(
    "--mailbox", type=click.Path(file_okay=False), help="Your drop folder (default: HOME/mailbox)."
)
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
    "--directory",
    "directory_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Directory file(s) to use (default: HOME/directory.json).",
)
@click.option(
    "--fhir",
    "fhir_url",
    help="Also use this Annuaire Santé FHIR base URL (API key from $ESANTE_API_KEY).",
)
@_json_option
def init(
    home: str | None,
    me: str,
    mailbox: str | None,
    family: str | None,
    given: str | None,
    classic: bool,
    authorities: tuple[str, ...],
    directory_files: tuple[str, ...],
    fhir_url: str | None,
    as_json: bool,
) -> None:
    """Create a medsecure home: identity, configuration, mailbox; print your public key."""
    root = _home(home)
    trust: dict[str, Any] = (
        {"authorities": [str(_load_public(a)) for a in authorities]}
        if authorities
        else {"mode": "unsafe-tofu"}
    )
    sources: list[dict[str, Any]] = [{"file": str(Path(f).resolve())} for f in directory_files] or [
        {"file": "directory.json"}
    ]
    if fhir_url:
        sources.append({"fhir": fhir_url, "api_key_env": "ESANTE_API_KEY"})
    identity = init_home(
        root,
        passphrase=_passphrase(confirm=True),
        me=me,
        mailbox=mailbox,
        suite="classic" if classic else "hybrid",
        directory=sources,
        trust=trust,
        family_name=family,
        given_name=given,
    )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "home": str(root),
                    "fingerprint": identity.fingerprint,
                    "public_key": str(identity.public),
                }
            )
        )
    else:
        click.echo(f"home: {root}")
        click.echo(f"fingerprint: {identity.fingerprint}")
        click.echo(f"public key: {identity.public}")
    if not authorities:
        click.echo(
            "warning: no directory authority given: keys are trusted on first use (unsafe-tofu); compare fingerprints out of band",
            err=True,
        )


@cli.command(name="send")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
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
    docs = []
    for i, f in enumerate(files, 1):
        try:
            docs.append(Document.from_path(f))
        except ValueError as exc:
            raise CliError(f"file #{i} of the command line: {exc}") from exc
    with _client(home) as client, _bar(sum(d.size for d in docs), "sealing") as update:
        result = client.send(
            docs, to=list(to), subject=subject, body=body, receipts=receipts, progress=update
        )
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
            click.echo(f"  {s.recipient}: {s.status}" + (f" ({s.error})" if s.error else ""))
    if any(s.status == "failed" for s in result.recipients):
        raise CliError("delivery failed for some recipients (see the outbox)")


_UNSAFE = re.compile(r"[^\w.\- ]+")


def _safe_name(name: str | None, fallback: str) -> str:
    cleaned = _UNSAFE.sub("_", name or "").strip(" .")
    return cleaned[:120] or fallback


@cli.command()
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False),
    help="Save documents into this folder and acknowledge the messages.",
)
@click.option(
    "--limit", type=click.IntRange(1, 100000), help="Process at most this many new envelopes."
)
@_home_option
@_json_option
def receive(output: str | None, limit: int | None, home: str | None, as_json: bool) -> None:
    """Fetch and verify incoming messages; with -o, save them and acknowledge them."""
    out_dir = Path(output) if output else None
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
                folder = out_dir / msg.message_id
                folder.mkdir(parents=True, exist_ok=True)
                used: set[str] = set()
                for i, doc in enumerate(msg.documents):
                    name = _safe_name(doc.filename, f"document-{i + 1}")
                    while name in used or name == "message.json":
                        name = f"{i + 1}-{name}"
                    used.add(name)
                    doc.save(folder / name)
                    entry["documents"].append(str(folder / name))
                meta = {
                    "message_id": msg.message_id,
                    "sender": msg.sender.model_dump(mode="json", exclude_defaults=True),
                    "subject": msg.subject,
                    "body": msg.body,
                    "in_reply_to": msg.in_reply_to,
                    "documents": [
                        {"file": Path(p).name, "media_type": d.media_type, "title": d.title}
                        for p, d in zip(entry["documents"], msg.documents, strict=True)
                    ],
                }
                (folder / "message.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2))
                msg.ack()
            else:
                entry["documents"] = [d.filename or d.id for d in msg.documents]
            listing.append(entry)
        quarantined = len(client.quarantine())
    if as_json:
        click.echo(
            json.dumps({"messages": listing, "quarantined": quarantined}, ensure_ascii=False)
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
            click.echo(
                f"  {s.recipient}: {s.status} via {s.endpoint}, {s.attempts} attempt(s)"
                + (f" — {s.error}" if s.error else "")
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


@cli.command()
@_home_option
@_json_option
def quarantine(home: str | None, as_json: bool) -> None:
    """List incoming envelopes that failed verification."""
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


@cli.command()
@click.argument("message_id")
@_home_option
@_json_option
def status(message_id: str, home: str | None, as_json: bool) -> None:
    """Show each recipient's status of a sent message (receipts included)."""
    with _client(home) as client:
        try:
            statuses = client.status(message_id)
        except KeyError as exc:
            raise CliError(f"no message {message_id!r} in the outbox") from exc
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


def _home_public(root: Path, key: str | None) -> Any:
    if key:
        return _load_public(key)
    from .._identity import Identity

    return Identity.load(root / "identity.key", passphrase=_passphrase(confirm=False)).public


@audit.command(name="verify")
@_home_option
@click.option("--key", help="Public key that signs the checkpoints (default: the home's identity).")
@_json_option
def audit_verify(home: str | None, key: str | None, as_json: bool) -> None:
    """Verify the chain and the signed checkpoints; report the first broken record."""
    from ..audit import verify

    root = _home(home)
    report = verify(root / "audit", public=_home_public(root, key))
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
        raise CliError(
            f"audit log broken at record {report.first_broken} ({report.file}): {report.problem}"
        )


def _date(value: str | None) -> Any:
    import datetime as dt

    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise CliError(f"bad date {value!r}: use YYYY-MM-DD or an ISO 8601 time") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


@audit.command(name="export")
@_home_option
@click.option("--since", help="Only records from this date/time (ISO 8601).")
@click.option("--until", help="Only records up to this date/time (ISO 8601).")
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True
)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="Write here instead of stdout."
)
def audit_export(
    home: str | None, since: str | None, until: str | None, fmt: str, output: str | None
) -> None:
    """Export records for a compliance officer (never any health data: there is none)."""
    from ..audit import export

    root = _home(home)
    if not (root / "audit").is_dir():
        raise CliError(f"{str(root)!r} has no audit log")
    if output:
        with open(output, "w", newline="", encoding="utf-8") as out:
            n = export(root / "audit", out, since=_date(since), until=_date(until), fmt=fmt)
    else:
        n = export(root / "audit", sys.stdout, since=_date(since), until=_date(until), fmt=fmt)
    click.echo(f"{n} record(s)", err=True)
