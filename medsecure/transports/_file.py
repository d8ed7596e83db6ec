"""A drop-folder transport laid out like Maildir (shared folder, USB key, synchronised folder).

Each mailbox folder has ``tmp/`` and ``new/``. A writer creates ``tmp/<message id>.<random>``,
writes and fsyncs it, links it to ``new/<message id>.msec`` and fsyncs ``new/``: readers only
ever look in ``new/``, so they never see a partial file, and the link is atomic, so
concurrent writers and readers are safe. A waiting file is never replaced: a message id is the
sender's choice, so a second envelope under the same id (another sender's, or a re-delivery)
gets ``new/<message id>.<random>.msec`` and the receiving inbox tells them apart (a
re-delivery of the same envelope is dropped as a duplicate). File names carry only the message
id — never patient data.

Anyone who can write the folder can put anything in ``new/``. A reader takes only regular files
whose name is a message id: it looks without following links (``lstat``), opens with
``O_NOFOLLOW | O_NONBLOCK`` (a FIFO never blocks it, a symbolic link swapped in after the check
is refused), checks the open descriptor with ``fstat``, and links or copies from what it opened.
Anything else is offered to the client as ``unsupported`` — reported once and left alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, ClassVar

from .._errors import DeliveryRejected, StorageError, TransportError, TransportUnavailable
from .._fs import fsync_dir, new_file, removing_on_failure
from ..models import Endpoint
from ._base import Incoming, Transport, UnsupportedItem

__all__ = ["FileTransport"]

# <message id>.msec, or <message id>.<16 hex>.msec when another envelope with the same
# message id is already waiting (the id is the sender's choice: it never replaces a file)
_NAME_RE = re.compile(r"([0-9A-HJKMNP-TV-Z]{26})(?:\.[0-9a-f]{16})?\.msec")
_ID_RE = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")
_STALE_TMP_SECONDS = 36 * 3600  # Maildir's advice for abandoned tmp/ files
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_NOT_REGULAR = "not a regular file (a link, a FIFO, a device or a folder)"
_TRANSIENT = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EIO,
    errno.ETIMEDOUT,
    errno.EAGAIN,
    errno.ESTALE,
    errno.ENOTCONN,
}


def _same_content(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes (the same inode, or equal content)."""
    try:
        sa, sb = os.stat(a), os.stat(b, follow_symlinks=False)
        if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
            return True
        if not stat.S_ISREG(sb.st_mode) or sa.st_size != sb.st_size:
            return False
        fd = os.open(b, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
        with a.open("rb") as fa, os.fdopen(fd, "rb") as fb:
            while True:
                x, y = fa.read(1 << 20), fb.read(1 << 20)
                if x != y:
                    return False
                if not x:
                    return True
    except OSError:
        return False


class FileTransport(Transport):
    """Deliver to drop folders (``Endpoint(kind="drop", path=…)``); receive from ``root``."""

    kinds: ClassVar[frozenset[str]] = frozenset({"drop"})

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"<FileTransport {str(self.root)!r}>"

    @staticmethod
    def prepare(folder: str | os.PathLike[str]) -> Path:
        """Create a mailbox folder (``tmp/`` and ``new/``) if needed; return it."""
        path = Path(folder)
        for sub in ("tmp", "new"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        return path

    def deliver(
        self, endpoint: Endpoint, envelope: BinaryIO, *, message_id: str, size: int
    ) -> None:
        if endpoint.kind != "drop" or not endpoint.path:
            raise DeliveryRejected(f"FileTransport cannot deliver to a {endpoint.kind} endpoint")
        if not _ID_RE.fullmatch(message_id):
            raise ValueError("malformed message id")
        box = Path(endpoint.path)
        if not box.is_dir():
            raise TransportUnavailable(f"drop folder {str(box)!r} is not reachable")
        tmp = box / "tmp" / f"{message_id}.{secrets.token_hex(8)}"
        try:
            self.prepare(box)
            if not self._link(envelope, tmp):
                with new_file(tmp, mode=0o644) as out:
                    shutil.copyfileobj(envelope, out, 1 << 20)
            with removing_on_failure(tmp):
                self._publish(tmp, box / "new", message_id)
            fsync_dir(box / "new")
        except OSError as exc:
            where = f"drop folder {str(box)!r}"
            if exc.errno in _TRANSIENT:
                raise TransportUnavailable(f"cannot write to {where}: {exc.strerror}") from exc
            raise DeliveryRejected(f"cannot write to {where}: {exc.strerror}") from exc

    @staticmethod
    def _publish(tmp: Path, new: Path, message_id: str) -> None:
        """Move ``tmp`` into ``new/`` without ever replacing a waiting file: a message id is
        chosen by its sender, so another sender reusing it must not make an envelope vanish.
        A second envelope with the same id gets a unique name (the inbox deduplicates a
        re-delivery of the same envelope by its envelope id)."""
        final = new / f"{message_id}.msec"
        try:
            os.link(tmp, final)  # fails if the name exists: no replacement
        except FileExistsError:
            if _same_content(tmp, final):
                tmp.unlink()  # the same envelope delivered again: idempotent
                return
            os.replace(tmp, new / f"{message_id}.{secrets.token_hex(8)}.msec")
            return
        except OSError:
            # a file system without hard links (FAT, some network shares): check, then rename
            if final.exists():
                if _same_content(tmp, final):
                    tmp.unlink()
                    return
                final = new / f"{message_id}.{secrets.token_hex(8)}.msec"
            os.replace(tmp, final)
            return
        with contextlib.suppress(OSError):
            tmp.unlink()

    @staticmethod
    def _link(envelope: BinaryIO, tmp: Path) -> bool:
        """Hard-link the (already fsynced, immutable) source file instead of copying it, when
        it is a file on the same file system; False means "copy instead"."""
        name = getattr(envelope, "name", None)
        if not isinstance(name, str) or not os.path.isfile(name):
            return False
        try:
            os.link(name, tmp)
        except OSError:
            return False  # another file system, or links not supported: copy
        return True

    @property
    def name(self) -> str:
        return f"drop:{self.root}"

    def list(self) -> Sequence[Incoming]:
        new = self.root / "new"
        try:
            entries = sorted(os.scandir(new), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise TransportError(f"cannot list {str(new)!r}: {exc.strerror}") from exc
        self._clean_tmp()
        out = []
        for entry in entries:
            m = _NAME_RE.fullmatch(entry.name)
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # taken by a concurrent reader
            except OSError:
                continue
            if m is None or not stat.S_ISREG(st.st_mode):
                problem = "not a medsecure envelope name" if m is None else _NOT_REGULAR
                # the handle is the folder entry's name: it is reported, never opened
                out.append(
                    Incoming(
                        handle=entry.name, message_id=None, kind="unsupported", problem=problem
                    )
                )
                continue
            out.append(Incoming(handle=entry.name, message_id=m.group(1), size=st.st_size))
        return out

    def take(self, item: Incoming, target: Path) -> None:
        """Link (same file system) or copy a waiting regular file to ``target``, from the
        descriptor opened without following links and without blocking."""
        path, fd, st = self._open_regular(item)
        try:
            if self._link_same(path, target, st):
                return
            with os.fdopen(os.dup(fd), "rb") as src, new_file(target) as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except OSError as exc:
            raise StorageError(f"cannot store an incoming envelope: {exc.strerror}") from exc
        finally:
            os.close(fd)

    @staticmethod
    def _link_same(path: Path, target: Path, opened: os.stat_result) -> bool:
        """Hard-link ``path`` to ``target`` if it is still the file that was opened (its
        sender fsynced it); False means "copy from the descriptor instead".

        Only a file that nobody else can write is linked: one this process's user owns (so this
        user created it — a sender on the same machine, whose outbox links it here) and that
        neither its group nor others may write. Anyone else who owns the file, or may write
        it, could still rewrite the copy in the home after it was taken (between the computing
        of its id and its verification, or later); such a file is copied instead. Other links
        to a file only this user can write give nobody else that power."""
        geteuid = getattr(os, "geteuid", None)
        if geteuid is None or opened.st_uid != geteuid() or opened.st_mode & 0o022:
            return False
        try:
            os.link(path, target, follow_symlinks=False)
        except OSError:
            return False  # another file system, links unsupported, or gone: copy
        try:
            linked = os.lstat(target)
        except OSError:
            linked = None
        if (
            linked is not None
            and (linked.st_dev, linked.st_ino) == (opened.st_dev, opened.st_ino)
            and linked.st_uid == opened.st_uid
            and not linked.st_mode & 0o022  # not made writable meanwhile
        ):
            return True
        with contextlib.suppress(OSError):
            target.unlink()  # swapped or changed after it was opened: copy what was opened
        return False

    def _clean_tmp(self) -> None:
        tmp = self.root / "tmp"
        now = time.time()
        with contextlib.suppress(OSError):
            for entry in os.scandir(tmp):
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                        os.unlink(entry.path)

    def _path(self, item: Incoming) -> Path:
        if item.kind != "envelope" or not _NAME_RE.fullmatch(item.handle):
            raise ValueError("not an item of this transport")
        return self.root / "new" / item.handle

    def _open_regular(self, item: Incoming) -> tuple[Path, int, os.stat_result]:
        """Open a waiting item without following links and without blocking: its path, the
        descriptor (the caller closes it) and its status. Anything but a regular file is
        :class:`UnsupportedItem`, a file gone meanwhile :class:`TransportUnavailable`."""
        path = self._path(item)
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as exc:
            raise TransportUnavailable("the envelope was taken by another reader") from exc
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENXIO, errno.EISDIR):
                raise UnsupportedItem(_NOT_REGULAR) from exc
            raise StorageError(f"cannot read an incoming envelope: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsupportedItem(_NOT_REGULAR)
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, OSError):
                raise StorageError(f"cannot read an incoming envelope: {exc.strerror}") from exc
            raise
        return path, fd, st

    def fetch(self, item: Incoming) -> BinaryIO:
        _, fd, _ = self._open_regular(item)
        try:
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def acknowledge(self, item: Incoming) -> None:
        path = self._path(item)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot remove an incoming envelope: {exc.strerror}") from exc
        with contextlib.suppress(OSError):
            fsync_dir(path.parent)
