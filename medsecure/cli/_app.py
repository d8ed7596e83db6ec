"""Commands of the ``medsecure`` CLI, built with click."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO

import click

from .._errors import MedsecureError
from .._fs import atomic_output, atomic_write
from .._identity import Identity, PublicIdentity
from ..envelope import seal_stream, unseal_stream

PASSPHRASE_ENV = "MEDSECURE_PASSPHRASE"  # noqa: S105 - the variable name, not a secret
PROGRESS_THRESHOLD = 4 << 20  # progress bars for files over 4 MiB, on a terminal only


class CliError(Exception):
    """A failure to report as one line."""


def _passphrase(confirm: bool) -> str:
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env
    if not sys.stdin.isatty():
        raise CliError(f"no passphrase: set {PASSPHRASE_ENV} or run on a terminal")
    value: str = click.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm, err=True)
    return value


def _load_identity(path: str) -> Identity:
    return Identity.load(path, passphrase=_passphrase(confirm=False))


def _load_public(ref: str) -> PublicIdentity:
    """A public key given as its text form, or as a file holding it (or a private key file)."""
    text = ref.strip()
    if text.startswith("msp1"):
        return PublicIdentity.from_text(text)
    path = Path(ref)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise CliError(f"public key file {ref!r} does not exist") from exc
    except OSError as exc:
        raise CliError(f"cannot read {ref!r}: {exc.strerror}") from exc
    if raw.startswith(b"MEDSECK"):
        return _load_identity(ref).public
    try:
        return PublicIdentity.from_text(raw.decode("ascii"))
    except UnicodeDecodeError as exc:
        raise CliError(f"{ref!r} is not a medsecure public key") from exc


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


def _open_input(path: str) -> IO[bytes]:
    try:
        return Path(path).open("rb")
    except FileNotFoundError as exc:
        # document paths are not repeated in messages: a file name may name the patient
        raise CliError("the input file does not exist") from exc
    except IsADirectoryError as exc:
        raise CliError("the input file is a folder") from exc
    except OSError as exc:
        raise CliError(f"cannot read the input file: {exc.strerror}") from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="medsecure", prog_name="medsecure")
def cli() -> None:
    """medsecure: end-to-end encrypted, signed health documents."""


@cli.command()
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="Key file to create."
)
@click.option("--classic", is_flag=True, help="X25519 + Ed25519 only (not post-quantum).")
@click.option("--force", is_flag=True, help="Replace an existing key file.")
def keygen(output: str, classic: bool, force: bool) -> None:
    """Create a new identity and save it encrypted under a passphrase."""
    if Path(output).exists() and not force:
        raise CliError(f"{output!r} already exists (use --force to replace it)")
    identity = Identity.generate("classic" if classic else "hybrid")
    identity.save(output, passphrase=_passphrase(confirm=True))
    click.echo(f"fingerprint: {identity.fingerprint}")
    click.echo(f"public key: {identity.public}")


@cli.command()
@click.argument("keyfile", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the public key here.")
def pubkey(keyfile: str, output: str | None) -> None:
    """Print the public key (text form) of a key file."""
    public = _load_identity(keyfile).public
    if output:
        atomic_write(output, (str(public) + "\n").encode("ascii"), mode=0o644)
        click.echo(f"fingerprint: {public.fingerprint}", err=True)
    else:
        click.echo(str(public))


@cli.command(name="seal")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--from", "sender", required=True, help="Sender's key file.")
@click.option(
    "--to",
    "recipients",
    required=True,
    multiple=True,
    help="Recipient public key (file or text); repeatable.",
)
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="Envelope to write."
)
@click.option("--allow-classic", is_flag=True, help="Accept a classic (non post-quantum) envelope.")
def seal_cmd(
    file: str, sender: str, recipients: tuple[str, ...], output: str, allow_classic: bool
) -> None:
    """Seal FILE for the recipients, signed by the sender."""
    publics = [_load_public(r) for r in recipients]
    identity = _load_identity(sender)
    with _open_input(file) as src:
        size = os.fstat(src.fileno()).st_size
        with (
            atomic_output(output, mode=0o600) as dst,
            _maybe_progress(src, size, "sealing") as reader,
        ):
            seal_stream(
                reader, dst, sender=identity, recipients=publics, allow_classic=allow_classic
            )


@cli.command(name="unseal")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--key", required=True, help="Recipient's key file.")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the document.",
)
@click.option("--from", "expected", help="Require this sender (public key file or text).")
def unseal_cmd(file: str, key: str, output: str, expected: str | None) -> None:
    """Open an envelope; the output appears only if it is authentic."""
    expected_sender = _load_public(expected) if expected else None
    identity = _load_identity(key)
    with _open_input(file) as src:
        size = os.fstat(src.fileno()).st_size
        with _maybe_progress(src, size, "opening") as reader:
            result = unseal_stream(
                reader, output, identity=identity, expected_sender=expected_sender
            )
    click.echo(f"verified sender: {result.sender.fingerprint}", err=True)


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


class _Deferred(logging.Handler):
    """Holds warnings until the command ends: shown on success, dropped on failure (whose one
    line says what matters)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"medsecure: warning: {_one_line(record.getMessage())}")

    def flush_to_stderr(self) -> None:
        for line in dict.fromkeys(self.lines):
            click.echo(line, err=True)


def _fail(message: str, code: int) -> int:
    click.echo(f"medsecure: error: {_one_line(message)}", err=True)
    return code


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI, turning every failure into one line on stderr and an exit status."""
    deferred = _Deferred()
    logger = logging.getLogger("medsecure")
    logger.addHandler(deferred)
    logger.propagate = False
    try:
        cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="medsecure",
            standalone_mode=False,
        )
    except click.exceptions.Abort:
        return _fail("aborted", 130)
    except click.ClickException as exc:
        return _fail(exc.format_message(), exc.exit_code if exc.exit_code else 2)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code or 0)
    except (CliError, MedsecureError, ValueError) as exc:
        return _fail(str(exc), 1)
    except OSError as exc:  # the file name is not repeated: it may name a patient
        return _fail(f"{exc.strerror or type(exc).__name__}", 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # never a traceback, even for a bug of ours
        return _fail(f"unexpected {type(exc).__name__}: {exc}", 70)
    finally:
        logger.removeHandler(deferred)
        logger.propagate = True
    deferred.flush_to_stderr()
    return 0
