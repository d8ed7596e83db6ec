"""``medsecure keygen | pubkey | seal | unseal``: keys and envelopes, no home needed."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any, BinaryIO, TypeVar

import click

import medsecure

from ._app import (
    PROGRESS_THRESHOLD,
    PUBLIC_SUFFIX,
    CliError,
    about,
    cli,
    load_identity,
    load_public,
    passphrase,
    public_beside,
)
from ._files import FileId, file_id, id_of, open_input, output, write_file

_F = TypeVar("_F", bound=Callable[..., Any])


def _output_option(help: str) -> Callable[[_F], _F]:
    return click.option("-o", "--output", "out", required=True, type=click.Path(), help=help)


_force_option = click.option(
    "--force", is_flag=True, help="Replace an existing output (never a file this command reads)."
)


class _Progress:
    """Wraps a binary reader and advances a click progress bar as it is read."""

    def __init__(self, raw: Any, bar: Any) -> None:
        self._raw = raw
        self._bar = bar

    def readinto(self, buf: Any) -> int:
        n = self._raw.readinto(buf)
        if n:
            self._bar.update(n)
        return n or 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._raw.read(n)
        self._bar.update(len(data))
        return data


@contextlib.contextmanager
def _maybe_progress(fh: IO[bytes], size: int, label: str) -> Iterator[BinaryIO]:
    if size >= PROGRESS_THRESHOLD and sys.stderr.isatty():
        with click.progressbar(length=size, label=label, file=sys.stderr) as bar:
            yield _Progress(fh, bar)  # type: ignore[misc]
    else:
        yield fh  # type: ignore[misc]


def _public_file(key: str) -> str:
    return f"{key}{PUBLIC_SUFFIX}"


@cli.command()
@_output_option("Key file to create.")
@click.option("--classic", is_flag=True, help="X25519 + Ed25519 only (not post-quantum).")
@click.option("--force", is_flag=True, help="Replace an existing key file (and its .pub).")
def keygen(out: str, classic: bool, force: bool) -> None:
    """Create a new identity, saved encrypted under a passphrase, with its public key beside it
    (KEY.pub, to give to others)."""
    pub_path = _public_file(out)
    for path in (out, pub_path):
        if os.path.lexists(path) and not force:
            raise CliError(f"-o/--output: {path!r} already exists (use --force to replace it)")
    identity = medsecure.Identity.generate("classic" if classic else "hybrid")
    secret = passphrase(confirm=True)
    with about("-o/--output", "write the key file"):
        identity.save(out, passphrase=secret)
    write_file(
        pub_path,
        (str(identity.public) + "\n").encode("ascii"),
        flag="-o/--output",
        force=True,
        mode=0o644,
    )
    click.echo(f"fingerprint: {identity.fingerprint}")
    click.echo(f"public key: {identity.public}")
    click.echo(f"wrote {out} (keep it secret) and {pub_path} (give it to others)", err=True)


@cli.command()
@click.argument("keyfile", type=click.Path())
@click.option("-o", "--output", "out", type=click.Path(), help="Write the public key here.")
def pubkey(keyfile: str, out: str | None) -> None:
    """Print the public key (text form) of KEYFILE.

    No passphrase is needed: the key file (format 2) carries its public identity in clear, and
    for an older key file KEYFILE.pub is read when it exists; otherwise the key file is
    decrypted."""
    with about("KEYFILE", "read the key file"):
        try:
            public = medsecure.PublicIdentity.from_key_file(keyfile)
        except medsecure.IdentityError:
            public = public_beside(keyfile) or load_identity(keyfile, "KEYFILE").public
    # what people compare by phone; on stderr so that stdout stays the key alone
    click.echo(f"fingerprint: {public.fingerprint}", err=True)
    if out:
        write_file(
            out,
            (str(public) + "\n").encode("ascii"),
            flag="-o/--output",
            force=True,
            protect=[id_of(keyfile)],
            mode=0o644,
        )
        click.echo(f"fingerprint: {public.fingerprint}", err=True)
    else:
        click.echo(str(public))


def _check_downgrade(
    sender: medsecure.PublicIdentity, recipients: list[medsecure.PublicIdentity], allowed: bool
) -> None:
    suites = {sender.suite, *(r.suite for r in recipients)}
    if len(suites) > 1 and not allowed:
        raise CliError(
            "--to/--from: a classic (non post-quantum) key would downgrade this envelope; "
            "pass --allow-classic to accept a classic envelope"
        )


@cli.command(name="seal")
@click.argument("file", type=click.Path())
@click.option("--from", "sender", required=True, help="Sender's key file.")
@click.option(
    "--to",
    "recipients",
    required=True,
    multiple=True,
    help="Recipient public key (file or text); repeatable.",
)
@_output_option("Envelope to write.")
@click.option("--allow-classic", is_flag=True, help="Accept a classic (non post-quantum) envelope.")
@_force_option
def seal_cmd(
    file: str,
    sender: str,
    recipients: tuple[str, ...],
    out: str,
    allow_classic: bool,
    force: bool,
) -> None:
    """Seal FILE for the recipients, signed by the sender."""
    publics = [load_public(r, "--to") for r in recipients]
    read: list[FileId | None] = [id_of(sender), *(id_of(r) for r in recipients)]
    with open_input(file, "FILE (the document to seal)") as src:
        read.append(file_id(os.fstat(src.fileno())))
        # refuse the output before asking for the passphrase
        with output(out, flag="-o/--output", force=force, protect=read) as dst:
            identity = load_identity(sender, "--from")
            _check_downgrade(identity.public, publics, allow_classic)
            size = os.fstat(src.fileno()).st_size
            with _maybe_progress(src, size, "sealing") as reader:
                medsecure.seal_stream(
                    reader, dst, sender=identity, recipients=publics, allow_classic=allow_classic
                )


@cli.command(name="unseal")
@click.argument("file", type=click.Path())
@click.option("--key", required=True, help="Recipient's key file.")
@_output_option("Where to write the document.")
@click.option("--from", "expected", help="Require this sender (public key file or text).")
@_force_option
def unseal_cmd(file: str, key: str, out: str, expected: str | None, force: bool) -> None:
    """Open an envelope; the output appears only if it is authentic (and, with --from, sent by
    that sender)."""
    expected_sender = load_public(expected, "--from") if expected else None
    read: list[FileId | None] = [id_of(key), id_of(expected) if expected else None]
    with open_input(file, "FILE (the envelope)") as src:
        read.append(file_id(os.fstat(src.fileno())))
        # decrypted bytes go to a temporary file that is removed unless everything verifies
        with output(out, flag="-o/--output", force=force, protect=read) as dst:
            identity = load_identity(key, "--key")
            size = os.fstat(src.fileno()).st_size
            with _maybe_progress(src, size, "opening") as reader:
                result = medsecure.unseal_stream(
                    reader,
                    dst,
                    identity=identity,
                    expected_sender=expected_sender,
                )
    if expected_sender is not None:
        click.echo(f"verified sender: {result.sender.fingerprint} (the one --from names)", err=True)
    else:
        click.echo(
            f"signed by: {result.sender.fingerprint} — the sender was not compared with anyone "
            "(give --from with the sender's public key to require it)",
            err=True,
        )
