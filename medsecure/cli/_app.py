"""The ``medsecure`` command group, and how every command fails: one line, never a traceback.

Errors name the option (or argument) and the step that failed, never a document's file name (it
may name the patient). SIGINT, SIGTERM and SIGHUP all unwind the command the same way, so every
temporary file is removed and every open client is closed before the process exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

import click

import medsecure
from medsecure._fs import os_reason

PASSPHRASE_ENV = "MEDSECURE_PASSPHRASE"  # noqa: S105 - the variable name, not a secret
PROGRESS_THRESHOLD = 4 << 20  # progress bars for files over 4 MiB, on a terminal only
PUBLIC_SUFFIX = ".pub"  # the public key is written beside the key file: alice.key.pub


class CliError(Exception):
    """A failure to report as one line."""


class TemporaryFailure(CliError):
    """A failure worth retrying later (exit status 75, EX_TEMPFAIL): a mailbox was unreachable."""


def reason(exc: OSError) -> str:
    """What an OSError means, without the file name it carries (which may name a patient)."""
    return os_reason(exc)


@contextlib.contextmanager
def about(flag: str, what: str) -> Iterator[None]:
    """Name ``flag`` and the step ``what`` in any failure raised inside the block."""
    try:
        yield
    except CliError:
        raise
    except OSError as exc:
        raise CliError(f"{flag}: cannot {what}: {reason(exc)}") from exc
    except (medsecure.MedsecureError, ValueError) as exc:
        raise CliError(f"{flag}: {exc}") from exc


def passphrase(confirm: bool) -> str:
    """The passphrase from ``$MEDSECURE_PASSPHRASE``, else asked on the terminal."""
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env
    if not sys.stdin.isatty():
        raise CliError(f"no passphrase: set {PASSPHRASE_ENV} or run on a terminal")
    value: str = click.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm, err=True)
    return value


def passphrase_hint() -> str:
    """Where a refused passphrase came from: a wrong one in the environment is easy to miss."""
    if os.environ.get(PASSPHRASE_ENV):
        return f" (the passphrase was taken from ${PASSPHRASE_ENV}: check it)"
    return ""


def check_digit(ident: medsecure.identifiers.Identifier, flag: str) -> None:
    """Refuse an RPPS number typed with ``flag`` whose check digit is wrong (the last of its 11
    digits is a Luhn check digit: one mistyped digit or two swapped neighbours fail it). The
    library only reports ``checksum_ok``: what a directory serves is not ours to refuse, but what
    a user types here is most likely a typo, which would name nobody or somebody else."""
    if ident.kind == "rpps" and ident.checksum_ok is False:
        raise CliError(
            f"{flag}: rpps:{ident.value} is not a valid RPPS number: its last digit is not the "
            "Luhn check digit of the others (mistyped?)"
        )


def check_ref(ref: str, flag: str) -> None:
    """Refuse a malformed practitioner reference given with ``flag``, saying how to write it."""
    from medsecure.directory import normalize_ref

    try:
        _key, parsed = normalize_ref(ref)
    except ValueError as exc:
        hint = ""
        if ref.isascii() and ref.isdigit() and len(ref) == 11:
            hint = f" (an RPPS number is written rpps:{ref})"
        elif ref.isascii() and ref.isdigit() and len(ref) == 9:
            hint = f" (an ADELI number is written adeli:{ref})"
        raise CliError(f"{flag}: {exc}{hint}") from exc
    if isinstance(parsed, medsecure.identifiers.Identifier):
        check_digit(parsed, flag)


def load_identity(path: str, flag: str) -> medsecure.Identity:
    """Decrypt the key file given with ``flag``."""
    secret = passphrase(confirm=False)
    try:
        return medsecure.Identity.load(path, passphrase=secret)
    except medsecure.IdentityError as exc:
        # the message quotes the path; a document given here by mistake may name a patient
        text = str(exc).replace(f"key file {path!r}", "the key file")
        text = text.replace(repr(path), "the file")
        raise CliError(f"{flag}: {text}{passphrase_hint()}") from exc


def public_beside(path: str | Path) -> medsecure.PublicIdentity | None:
    """The public key written beside a key file (``<key>.pub``), if there is one.

    It spares the passphrase when only the public half is needed. (It is as trustworthy as the
    folder it sits in: whoever can replace it could replace the key file too.)
    """
    beside = Path(f"{os.fspath(path)}{PUBLIC_SUFFIX}")
    try:
        text = beside.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read the public key beside the key file: {exc}") from exc
    try:
        return medsecure.PublicIdentity.from_text(text.strip())
    except medsecure.MedsecureError as exc:
        raise CliError(f"the public key beside the key file is damaged: {exc}") from exc


def load_public(ref: str, flag: str) -> medsecure.PublicIdentity:
    """A public key given as its text form, a ``.pub`` file, or a key file (whose ``.pub``
    beside it is read when it exists; otherwise the key file is decrypted)."""
    text = ref.strip()
    if text.startswith("msp1"):
        with about(flag, "read the public key"):
            return medsecure.PublicIdentity.from_text(text)
    with about(flag, "read the public key file"):
        with Path(ref).open("rb") as fh:
            raw = fh.read(1 << 16)
        if raw.startswith(b"MEDSECK"):
            try:  # a key file of format 2 carries its public identity in clear
                return medsecure.PublicIdentity.from_key_file(ref)
            except medsecure.IdentityError:
                beside = public_beside(ref)
                return beside if beside is not None else load_identity(ref, flag).public
        try:
            return medsecure.PublicIdentity.from_text(raw.decode("ascii").strip())
        except (UnicodeDecodeError, medsecure.MedsecureError) as exc:
            raise CliError(f"{flag}: the file is not a medsecure public key") from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="medsecure", prog_name="medsecure")
def cli() -> None:
    """medsecure: end-to-end encrypted, signed health documents."""


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


class Stopped(BaseException):
    """SIGINT, SIGTERM or SIGHUP, raised where the command is so that it unwinds: temporary
    files are removed and clients closed on the way out.

    A BaseException, as KeyboardInterrupt is: nothing that catches Exception swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turn the first SIGINT/SIGTERM/SIGHUP into an exception; ignore the ones after it, which
    would otherwise interrupt the clean-up the first one started."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread (CLI run in-process)
        return
    fired: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if fired:
            return
        fired.append(signum)
        raise Stopped(signum)  # not KeyboardInterrupt, which click turns into a blank line

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold the stop signals for a few statements that must not be cut in two (creating a
    temporary file and remembering to remove it); they are delivered right after."""
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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
        with _stop_on_signals():
            cli.main(
                args=list(argv) if argv is not None else None,
                prog_name="medsecure",
                standalone_mode=False,
            )
    except click.exceptions.Abort:
        return _fail("interrupted", 130)
    except click.ClickException as exc:
        return _fail(exc.format_message(), exc.exit_code if exc.exit_code else 2)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code or 0)
    except TemporaryFailure as exc:
        return _fail(str(exc), 75)
    except (CliError, medsecure.MedsecureError, ValueError) as exc:
        return _fail(str(exc), 1)
    except OSError as exc:  # the file name is not repeated: it may name a patient
        return _fail(f"a file operation failed: {reason(exc)}", 1)
    except KeyboardInterrupt:
        return _fail("interrupted: nothing was left half-written", 130)
    except Stopped as exc:
        name = signal.Signals(exc.signum).name
        what = "interrupted" if exc.signum == signal.SIGINT else f"stopped by {name}"
        return _fail(f"{what}: nothing was left half-written", 128 + exc.signum)
    except Exception as exc:  # never a traceback, even for a bug of ours
        return _fail(f"unexpected {type(exc).__name__}: {exc}", 70)
    finally:
        logger.removeHandler(deferred)
        logger.propagate = True
    deferred.flush_to_stderr()
    return 0
