"""Where the CLI reads and writes files.

An output is written to a temporary file beside its target (mode 0600 unless said otherwise),
fsynced, and only then given its name; on any failure or stop signal the temporary file is
removed, so a half-written (or, for ``unseal``, not yet verified) file never stays behind.

An output never replaces a file the command reads (the input, a key file), whatever path leads
to it — another spelling, a symbolic link, a hard link: files are compared by device and inode.
An existing output is replaced only with ``--force``; without it, the final step is a hard link,
which fails if the name appeared in the meantime, instead of a rename, which would replace it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

from ._app import CliError, about, reason, signals_deferred

FileId = tuple[int, int]

# Every WRITEBACK_EVERY bytes the kernel is asked to start writing the range out (Linux:
# POSIX_FADV_DONTNEED starts write-back of dirty pages without waiting, then drops them), so the
# final fsync has little left to wait for and a large output does not fill the page cache.
WRITEBACK_EVERY = 16 << 20
_NO_HARD_LINKS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.EOPNOTSUPP}


def file_id(st: os.stat_result) -> FileId:
    """What identifies a file whatever path reaches it."""
    return (st.st_dev, st.st_ino)


def id_of(path: str | os.PathLike[str]) -> FileId | None:
    """The file ``path`` leads to (links followed), or None if there is none."""
    try:
        return file_id(os.stat(path))
    except OSError:
        return None


def open_input(path: str, flag: str) -> IO[bytes]:
    """Open a file the command reads; the error names ``flag``, never the file name."""
    try:
        fh = Path(path).open("rb")  # noqa: SIM115 - returned to the caller, who closes it
    except FileNotFoundError as exc:
        raise CliError(f"{flag}: the file does not exist") from exc
    except IsADirectoryError as exc:
        raise CliError(f"{flag}: this is a folder, not a file") from exc
    except OSError as exc:
        raise CliError(f"{flag}: cannot read the file: {reason(exc)}") from exc
    if stat.S_ISDIR(os.fstat(fh.fileno()).st_mode):  # pragma: no cover - open() refuses first
        fh.close()
        raise CliError(f"{flag}: this is a folder, not a file")
    return fh


def _check_target(target: Path, flag: str, force: bool, protect: set[FileId]) -> None:
    try:
        st = os.stat(target)
    except FileNotFoundError:
        if os.path.lexists(target) and not force:  # a link to nothing is still a name taken
            raise CliError(
                f"{flag}: the output already exists (use --force to replace it)"
            ) from None
        return
    except OSError as exc:
        raise CliError(f"{flag}: cannot use this output: {reason(exc)}") from exc
    if file_id(st) in protect:
        raise CliError(f"{flag}: the output is a file this command reads; choose another name")
    if stat.S_ISDIR(st.st_mode):
        raise CliError(f"{flag}: the output is a folder; give a file name")
    if not force:
        raise CliError(f"{flag}: the output already exists (use --force to replace it)")


class _Writer:
    """The temporary output file, asking for write-back as it grows."""

    def __init__(self, fh: IO[bytes], flag: str) -> None:
        self._fh = fh
        self._flag = flag
        self._synced = 0
        self._written = 0

    def write(self, data: Any) -> int:
        try:
            n = self._fh.write(data)
            self._written += len(data)
            if self._written - self._synced >= WRITEBACK_EVERY and hasattr(os, "posix_fadvise"):
                self._fh.flush()
                os.posix_fadvise(
                    self._fh.fileno(),
                    self._synced,
                    self._written - self._synced,
                    os.POSIX_FADV_DONTNEED,
                )
                self._synced = self._written
        except OSError as exc:
            raise CliError(f"{self._flag}: cannot write the output: {reason(exc)}") from exc
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def _commit(tmp: str, target: Path, flag: str, force: bool) -> None:
    if force:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)
    except FileExistsError as exc:
        raise CliError(f"{flag}: the output already exists (use --force to replace it)") from exc
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        # a file system without hard links: check, then rename (a narrow race remains)
        if os.path.lexists(target):
            raise CliError(
                f"{flag}: the output already exists (use --force to replace it)"
            ) from exc
        os.replace(tmp, target)
        return
    os.unlink(tmp)


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":  # pragma: no cover - renames are journaled; folders cannot be opened
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def output(
    path: str | os.PathLike[str],
    *,
    flag: str,
    force: bool = False,
    protect: Iterable[FileId | None] = (),
    mode: int = 0o600,
) -> Iterator[BinaryIO]:
    """Yield a writable file that becomes ``path`` only if the block completes."""
    target = Path(path)
    guarded = {p for p in protect if p is not None}
    _check_target(target, flag, force, guarded)
    folder = target.parent
    tmp: str | None = None
    try:
        with signals_deferred():
            try:
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=".medsecure-", suffix=".tmp")
            except FileNotFoundError as exc:
                raise CliError(f"{flag}: the output's folder does not exist") from exc
            except OSError as exc:
                raise CliError(f"{flag}: cannot create the output: {reason(exc)}") from exc
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):  # POSIX; mkstemp's file is already private elsewhere
                with about(flag, "create the output"):
                    os.fchmod(fd, mode)
            yield _Writer(fh, flag)  # type: ignore[misc]
            with about(flag, "write the output"):
                fh.flush()
                os.fsync(fh.fileno())
        _check_target(target, flag, force, guarded)  # the same checks, right before the name
        with signals_deferred(), about(flag, "write the output"):
            _commit(tmp, target, flag, force)
            tmp = None
            _fsync_dir(folder)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_file(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    flag: str,
    force: bool = False,
    protect: Iterable[FileId | None] = (),
    mode: int = 0o600,
) -> None:
    """Write ``data`` to ``path`` as :func:`output` does."""
    with output(path, flag=flag, force=force, protect=protect, mode=mode) as fh:
        fh.write(data)


def private_folder(path: Path, flag: str) -> Path:
    """Create ``path`` and any missing parent with mode 0700 (an existing folder is kept as it
    is), refusing a symbolic link at the last step: what is saved there is health data."""
    missing: list[Path] = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    try:
        for folder in reversed(missing):
            folder.mkdir(mode=0o700)
            os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask
        st = os.lstat(path)
    except FileExistsError:
        st = os.lstat(path)
    except OSError as exc:
        raise CliError(f"{flag}: cannot create the folder: {reason(exc)}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise CliError(f"{flag}: the output is not a folder (or is a link)")
    return path
