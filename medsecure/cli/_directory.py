"""``medsecure directory …`` and ``medsecure trust …`` commands."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from medsecure import PractitionerNotFound
from medsecure.directory import (
    Directory,
    FhirDirectory,
    FileDirectory,
    merge_practitioners,
    practitioners_from_bundle,
)
from medsecure.models import Endpoint, KeyEntry, Mailbox, Practitioner
from medsecure.trust import Statement, sign_binding, sign_revocation, sign_rotation

from ._app import CliError, about, check_ref, cli, load_identity, load_public
from ._files import write_file
from ._network import relay_url

API_KEY_ENV = "ESANTE_API_KEY"


def _source_options(f: Any) -> Any:
    f = click.option(
        "--directory",
        "directory_path",
        type=click.Path(),
        help="A medsecure directory file (.json or .cbor).",
    )(f)
    f = click.option("--fhir", "fhir_url", help="An Annuaire Santé FHIR base URL.")(f)
    f = click.option("--api-key", help=f"ESANTE-API-KEY for --fhir (default: ${API_KEY_ENV}).")(f)
    return f


def _open_source(
    directory_path: str | None, fhir_url: str | None, api_key: str | None
) -> Directory:
    if bool(directory_path) == bool(fhir_url):
        raise CliError("give exactly one of --directory FILE or --fhir URL")
    if fhir_url:
        return FhirDirectory(fhir_url, api_key=api_key or os.environ.get(API_KEY_ENV))
    assert directory_path is not None
    return FileDirectory(directory_path)


def _describe(p: Practitioner) -> str:
    lines = [f"{p.display_name}  (IDNPS {p.idnps})" + ("  [stale]" if p.stale else "")]
    if p.profession:
        lines.append(
            f"  profession: {p.profession.label or p.profession.code}"
            + (f", {p.specialty.label or p.specialty.code}" if p.specialty else "")
        )
    for o in p.organizations:
        lines.append(f"  organization: {o.name or o.idnst}" + (f" ({o.city})" if o.city else ""))
    for m in p.mailboxes:
        flags: list[str] = [m.type] if m.type else []
        if m.liste_rouge:
            flags.append("liste rouge")
        lines.append(f"  mailbox: {m.address}" + (f" [{', '.join(flags)}]" if flags else ""))
    for k in p.keys:
        lines.append(
            f"  key: {k.public.fingerprint} ({k.public.suite}, {len(k.statements)} statement(s))"
        )
    for e in p.endpoints:
        target = (e.url and f"{e.url} {e.mailbox}") or e.address or e.path
        lines.append(f"  endpoint: {e.kind} {target}")
    return "\n".join(lines)


def _emit(items: list[Practitioner], as_json: bool) -> None:
    if as_json:
        click.echo(
            json.dumps(
                [p.model_dump(mode="json", exclude_defaults=True) for p in items],
                ensure_ascii=False,
                indent=2,
            )
        )
    else:
        for p in items:
            click.echo(_describe(p))


@cli.group()
def directory() -> None:
    """Look up practitioners and maintain a directory file."""


@directory.command()
@click.argument("ref")
@_source_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def lookup(
    ref: str, directory_path: str | None, fhir_url: str | None, api_key: str | None, as_json: bool
) -> None:
    """Find the practitioner REF names (rpps:…, adeli:…, IDNPS or MSSanté address)."""
    check_ref(ref, "REF")
    with _open_source(directory_path, fhir_url, api_key) as d:
        try:
            p = d.lookup(ref)
        except ValueError as exc:
            raise CliError(str(exc)) from exc
    _emit([p], as_json)


@directory.command()
@click.option("--name", help="Family name (prefix).")
@click.option("--given", help="Given name (prefix).")
@click.option("--profession", help="Profession or specialty code or label.")
@click.option("--city", help="City of one of their organizations.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@_source_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def search(
    name: str | None,
    given: str | None,
    profession: str | None,
    city: str | None,
    limit: int,
    directory_path: str | None,
    fhir_url: str | None,
    api_key: str | None,
    as_json: bool,
) -> None:
    """Search practitioners."""
    if not any((name, given, profession, city)):
        raise CliError("give at least one of --name, --given, --profession, --city")
    with _open_source(directory_path, fhir_url, api_key) as d:
        found = d.search(name=name, given=given, profession=profession, city=city, limit=limit)
    _emit(found, as_json)
    if not as_json:
        click.echo(f"{len(found)} practitioner(s)", err=True)


def _statement(ref: str, flag: str) -> Statement:
    text = ref
    with about(flag, "read the statement"):
        if not ref.strip().startswith("mst1"):
            text = Path(ref).read_text(encoding="ascii")
        return Statement.parse(text.strip())


@directory.command()
@click.option("--directory", "directory_path", required=True, type=click.Path())
@click.option("--idnps", required=True, help="rpps:…, adeli:… or the IDNPS.")
@click.option("--family", help="Family name.")
@click.option("--given", help="Given name.")
@click.option(
    "--mailbox",
    "mailboxes",
    multiple=True,
    help="MSSanté address, for the TLS-only MSSanté profile (repeatable).",
)
@click.option("--key", "keys", multiple=True, help="Public key file or text (repeatable).")
@click.option(
    "--statement", "statements", multiple=True, help="Signed statement file or text (repeatable)."
)
@click.option("--drop", "drops", multiple=True, help="Drop-folder endpoint (repeatable).")
@click.option("--relay", help="Relay endpoint URL (with --relay-mailbox).")
@click.option("--relay-mailbox", help="Mailbox name on the relay.")
@click.option(
    "--mail",
    "mail_addresses",
    multiple=True,
    help="Mail endpoint: an address where their software reads medsecure messages (repeatable).",
)
def add(
    directory_path: str,
    idnps: str,
    family: str | None,
    given: str | None,
    mailboxes: tuple[str, ...],
    keys: tuple[str, ...],
    statements: tuple[str, ...],
    drops: tuple[str, ...],
    relay: str | None,
    relay_mailbox: str | None,
    mail_addresses: tuple[str, ...],
) -> None:
    """Add or update a practitioner in a directory file (merged with an existing entry).

    A --statement is attached to the key it is about (the old and the new key of a rotation),
    whether that key is given with --key now or is already in the entry; a statement about no
    key of the entry, or about another practitioner, is refused rather than dropped."""
    check_ref(idnps, "--idnps")
    parsed = [_statement(s, "--statement") for s in statements]
    publics = [load_public(k, "--key") for k in keys]
    endpoints = [Endpoint(kind="drop", path=str(Path(d).resolve())) for d in drops]
    if relay is not None:
        relay_url(relay)
    if relay or relay_mailbox:
        endpoints.append(Endpoint(kind="relay", url=relay, mailbox=relay_mailbox))
    try:
        endpoints += [Endpoint(kind="mail", address=a) for a in mail_addresses]
    except ValidationError as exc:
        raise CliError("--mail: not a mail address") from exc
    try:
        new = Practitioner(
            idnps=idnps,
            family_name=family,
            given_name=given,
            mailboxes=tuple(Mailbox(address=m) for m in mailboxes),
            keys=tuple(KeyEntry(public=pub) for pub in publics),
            endpoints=tuple(endpoints),
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CliError(
            f"invalid entry: {'.'.join(str(x) for x in first['loc'])}: {first['msg']}"
        ) from exc
    d = FileDirectory(directory_path)
    existing = _existing_entry(d, new.idnps)
    merged = _merge(new, existing)
    keys_by_fp = {k.fingerprint: k for k in merged.keys}
    attach: dict[str, list[str]] = {}
    for st in parsed:
        if st.subject != merged.idnps:
            raise CliError(f"--statement: this {st.type} is about practitioner {st.subject}")
        targets = [fp for fp in (st.key, st.new_key) if fp and fp in keys_by_fp]
        if not targets:
            raise CliError(
                f"--statement: this {st.type} is about key {st.key}, which the entry does not "
                "list; give that key with --key"
            )
        for fp in targets:
            attach.setdefault(fp, []).append(st.to_text())
    merged = _with_statements(merged, attach)
    d.add(merged)
    verb = "updated" if existing is not None else "added"
    click.echo(
        f"{verb} {merged.idnps} in {directory_path}: {len(merged.keys)} key(s), "
        f"{sum(len(k.statements) for k in merged.keys)} statement(s)",
        err=True,
    )


def _existing_entry(d: FileDirectory, idnps: str) -> Practitioner | None:
    try:
        return d.lookup(f"idnps:{idnps}")
    except PractitionerNotFound:
        return None


def _with_statements(p: Practitioner, extra: dict[str, list[str]]) -> Practitioner:
    """``p`` with each key's statements unioned with ``extra`` (in order, no repeats)."""
    keys = []
    for k in p.keys:
        statements = tuple(dict.fromkeys([*k.statements, *extra.get(k.fingerprint, [])]))
        keys.append(k.model_copy(update={"statements": statements}))
    return Practitioner.model_validate({**p.model_dump(), "keys": keys})


def _merge(new: Practitioner, existing: Practitioner | None) -> Practitioner:
    """Merge an entry into the existing one: one key entry per key (statements unioned, the
    first validity given wins), the other fields as ``merge_practitioners`` does."""
    if existing is None:
        return _merge(new, new) if len({k.fingerprint for k in new.keys}) != len(new.keys) else new
    by_fp: dict[str, KeyEntry] = {}
    statements: dict[str, list[str]] = {}
    for k in (*new.keys, *existing.keys):
        first = by_fp.setdefault(k.fingerprint, k)
        if first is not k:
            by_fp[k.fingerprint] = first.model_copy(
                update={
                    "not_before": first.not_before or k.not_before,
                    "not_after": first.not_after or k.not_after,
                }
            )
        statements.setdefault(k.fingerprint, []).extend(k.statements)
    # with their keys, so that each entry's endpoints remember the keys they came with
    merged = merge_practitioners([new, existing])
    keys = tuple(
        k.model_copy(update={"statements": tuple(dict.fromkeys(statements[fp]))})
        for fp, k in by_fp.items()
    )
    return Practitioner.model_validate({**merged.model_dump(), "keys": keys})


@directory.command(name="import")
@click.option("--directory", "directory_path", required=True, type=click.Path())
@click.argument("source", type=click.Path(exists=True))
def import_cmd(directory_path: str, source: str) -> None:
    """Merge SOURCE (a medsecure directory file or an Annuaire FHIR Bundle) into a directory file."""
    try:
        doc = json.loads(Path(source).read_bytes())
    except (OSError, ValueError) as exc:
        raise CliError(f"{source!r} is not a readable JSON file") from exc
    if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
        resources: list[dict[str, Any]] = [
            e["resource"]
            for e in doc.get("entry", [])
            if isinstance(e, dict) and isinstance(e.get("resource"), dict)
        ]
        incoming = practitioners_from_bundle(resources, source=f"import:{Path(source).name}")
    else:
        incoming = FileDirectory(source).all()
    d = FileDirectory(directory_path)
    merged = [_merge(p, _existing_entry(d, p.idnps)) for p in incoming]
    d.add_many(merged)
    click.echo(f"imported {len(merged)} practitioner(s) into {directory_path}", err=True)


@directory.command()
@click.option("--directory", "directory_path", required=True, type=click.Path(exists=True))
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    help="Write here (.json or .cbor) instead of stdout.",
)
def export(directory_path: str, output: str | None) -> None:
    """Export a directory file (JSON on stdout, or to another file/format)."""
    src = FileDirectory(directory_path)
    if output:
        if Path(output).exists():
            Path(output).unlink()
        FileDirectory(output).add_many(src.all())
    else:
        _emit(src.all(), True)


# ----------------------------------------------------------------------------------------------


@cli.group()
def trust() -> None:
    """Sign and verify statements binding keys to practitioners (docs/trust.md)."""


def _write_statement(st: Statement, output: str | None) -> None:
    if output:
        write_file(
            output, (st.to_text() + "\n").encode(), flag="-o/--output", force=True, mode=0o644
        )
        click.echo(f"wrote {st.type} statement to {output}", err=True)
    else:
        click.echo(st.to_text())


@trust.command()
@click.option("--authority", required=True, help="The authority's key file.")
@click.option("--idnps", required=True)
@click.option(
    "--key", "key_ref", required=True, help="The practitioner's public key (file or text)."
)
@click.option("--days", default=365, show_default=True, type=click.IntRange(1, 3650))
@click.option("-o", "--output", type=click.Path())
def sign(authority: str, idnps: str, key_ref: str, days: int, output: str | None) -> None:
    """Sign a binding: KEY belongs to IDNPS for DAYS days from now."""
    check_ref(idnps, "--idnps")
    pub = load_public(key_ref, "--key")
    issuer = load_identity(authority, "--authority")
    now = dt.datetime.now(dt.UTC)
    try:
        st = sign_binding(
            issuer, idnps=idnps, key=pub, not_before=now, not_after=now + dt.timedelta(days=days)
        )
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    _write_statement(st, output)


@trust.command()
@click.option("--old", required=True, help="The old (current) key file.")
@click.option("--idnps", required=True)
@click.option("--new", "new_ref", required=True, help="The new public key (file or text).")
@click.option("-o", "--output", type=click.Path())
def rotate(old: str, idnps: str, new_ref: str, output: str | None) -> None:
    """Sign, with the old key, a rotation to a new key."""
    new = load_public(new_ref, "--new")
    st = sign_rotation(load_identity(old, "--old"), idnps=idnps, new_key=new)
    _write_statement(st, output)


@trust.command()
@click.option("--issuer", required=True, help="Authority key file, or the revoked key's own file.")
@click.option("--idnps", required=True)
@click.option("--key", "key_ref", required=True, help="The public key to revoke (file or text).")
@click.option("--reason", default="unspecified", show_default=True)
@click.option("-o", "--output", type=click.Path())
def revoke(issuer: str, idnps: str, key_ref: str, reason: str, output: str | None) -> None:
    """Sign a revocation of KEY for IDNPS."""
    pub = load_public(key_ref, "--key")
    st = sign_revocation(load_identity(issuer, "--issuer"), idnps=idnps, key=pub, reason=reason)
    _write_statement(st, output)


@trust.command()
@click.argument("statement")
@click.option(
    "--authority", "authorities", multiple=True, help="Accepted authority public key (repeatable)."
)
def verify(statement: str, authorities: tuple[str, ...]) -> None:
    """Verify a statement's signature and, with --authority, that an accepted authority issued it."""
    st = _statement(statement, "STATEMENT")
    issuer_ok = True
    if authorities:
        accepted = {load_public(a, "--authority").fingerprint for a in authorities}
        issuer_ok = st.issuer.fingerprint in accepted or (
            st.type != "binding" and st.issuer.fingerprint == st.key
        )
    click.echo(f"type: {st.type}")
    click.echo(f"practitioner: {st.subject}")
    click.echo(f"key: {st.key}")
    if st.new_key:
        click.echo(f"new key: {st.new_key}")
    if st.not_before and st.not_after:
        click.echo(f"valid: {st.not_before.isoformat()} to {st.not_after.isoformat()}")
    if st.reason:
        click.echo(f"reason: {st.reason}")
    click.echo(f"issued: {st.issued_at.isoformat()} by {st.issuer.fingerprint}")
    if not issuer_ok:
        raise CliError("the signature is valid but the issuer is not an accepted authority")
