"""A Maildir folder as a source of messages, for servers that deliver locally (Postfix, dovecot's
LDA, any MTA writing ``~/Maildir``).

Theory of operation
-------------------
A Maildir (https://cr.yp.to/proto/maildir.html) has ``tmp/``, ``new/`` and ``cur/``. A delivery
agent writes into ``tmp/`` and renames into ``new/``; a mail client (dovecot among them) renames
``new/NAME`` to ``cur/NAME:2,FLAGS`` once it has seen it. :class:`MaildirFolder` lists both
``new/`` and ``cur/``, reads messages and moves the ones the caller has processed into another
Maildir; it never writes, flags or deletes any other message.

The folder is hostile ground (a shared mailbox, another local user's delivery agent): every file
is opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked to be a regular file on the descriptor
itself, so a symbolic link to a secret or a FIFO that would block the reader is refused. A name
is the stable part before ``:`` (the Maildir unique name); when a client renamed a message from
``new/`` to ``cur/`` between listing and reading, the item is found again by that part.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
from pathlib import Path
from typing import BinaryIO

from .._errors import StorageError, TransportError
from .._fs import fsync_dir
from ._config import MailItem

__all__ = ["MaildirFolder"]

HEADER_LIMIT = 64 << 10
_NAME_RE = re.compile(r"[^/\x00.][^/\x00]{0,254}")
_HANDLE_RE = re.compile(r"maildir:(new|cur)/([^/\x00]{1,255})")
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


class MaildirFolder:
    """One Maildir folder: list, read (headers or whole), move processed messages.

    ``path`` is the folder (the one holding ``new/`` and ``cur/``); ``create`` makes it (and its
    ``tmp/``, ``new/``, ``cur/``) if missing.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.path = Path(path)
        if create:
            self.prepare(self.path)

    def __repr__(self) -> str:
        return f"<MaildirFolder {str(self.path)!r}>"

    @staticmethod
    def prepare(path: str | os.PathLike[str]) -> Path:
        """Create a Maildir (``tmp/``, ``new/``, ``cur/``, mode 0700) if needed; return it."""
        root = Path(path)
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for sub in ("tmp", "new", "cur"):
                (root / sub).mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the Maildir folder: {exc.strerror}") from exc
        return root

    def subfolder(self, name: str) -> Path:
        """The path of a Maildir++ sub-folder (``<path>/.<name>``), as dovecot lays them out."""
        if not isinstance(name, str) or not re.fullmatch(
            r"[A-Za-z0-9_-][A-Za-z0-9_ .-]{0,99}", name
        ):
            raise ValueError("malformed folder name")
        return self.path / f".{name}"

    # -- listing and reading -------------------------------------------------------------------

    def list(self, *, headers: bool = False, header_limit: int = HEADER_LIMIT) -> list[MailItem]:
        """Messages in ``new/`` and ``cur/``, oldest first (by modification time, then name).

        Entries that are not regular files (links, FIFOs, folders) and names that cannot be
        Maildir names are left out. ``headers`` fills :attr:`MailItem.header` with the start
        of each header (at most ``header_limit`` bytes).
        """
        found: list[tuple[float, str, MailItem]] = []
        for sub in ("new", "cur"):
            folder = self.path / sub
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise TransportError(f"cannot list the Maildir folder: {exc.strerror}") from exc
            for entry in entries:
                if not _NAME_RE.fullmatch(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # taken by another reader meanwhile
                if not stat.S_ISREG(st.st_mode):
                    continue
                item = MailItem(handle=f"maildir:{sub}/{entry.name}", size=st.st_size)
                found.append((st.st_mtime, entry.name, item))
        found.sort(key=lambda t: (t[0], t[1]))
        items = [t[2] for t in found]
        if headers:
            out = []
            for item in items:
                try:
                    head = self.headers(item, limit=header_limit)
                except TransportError:
                    continue  # gone or not readable: the next listing says what remains
                out.append(MailItem(handle=item.handle, size=item.size, header=head))
            items = out
        return items

    def _locate(self, item: MailItem) -> Path:
        """Where the item is now: its listed path, or ``cur/`` under the same unique name."""
        m = _HANDLE_RE.fullmatch(item.handle) if isinstance(item, MailItem) else None
        if m is None or not _NAME_RE.fullmatch(m.group(2)):
            raise ValueError("not an item of a Maildir folder")
        sub, name = m.group(1), m.group(2)
        path = self.path / sub / name
        if os.path.lexists(path):
            return path
        unique = name.split(":", 1)[0]
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.path / "cur"):
                if entry.name == unique or entry.name.startswith(unique + ":"):
                    return Path(entry.path)
        raise TransportError("the message is no longer in the Maildir folder")

    def open(self, item: MailItem) -> BinaryIO:
        """Open one message for reading (a regular file, never through a link)."""
        path = self._locate(item)
        try:
            fd = os.open(
                path, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
            )
        except FileNotFoundError as exc:
            raise TransportError("the message is no longer in the Maildir folder") from exc
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK):
                raise TransportError("refused a Maildir entry that is a symbolic link") from exc
            raise TransportError(f"cannot read a Maildir message: {exc.strerror}") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise TransportError("refused a Maildir entry that is not a regular file")
            if _O_NONBLOCK:
                os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def headers(self, item: MailItem, *, limit: int = HEADER_LIMIT) -> bytes:
        """The start of the message: up to the blank line ending the header, at most ``limit``
        bytes."""
        with self.open(item) as f:
            try:
                data = f.read(limit)
            except OSError as exc:
                raise TransportError(f"cannot read a Maildir message: {exc.strerror}") from exc
        for sep in (b"\r\n\r\n", b"\n\n"):
            end = data.find(sep)
            if end >= 0:
                return data[: end + len(sep)]
        return data

    def fetch(self, item: MailItem) -> BinaryIO:
        """A binary stream of one message (the caller closes it)."""
        return self.open(item)

    def fetch_to(self, item: MailItem, out: BinaryIO) -> int:
        """Copy one message to ``out``; return its size."""
        size = 0
        with self.open(item) as f:
            while True:
                try:
                    chunk = f.read(1 << 20)
                except OSError as exc:
                    raise TransportError(f"cannot read a Maildir message: {exc.strerror}") from exc
                if not chunk:
                    return size
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise StorageError("cannot write the fetched message") from exc
                size += len(chunk)

    # -- moving ----------------------------------------------------------------------------------

    def move(self, item: MailItem, dest: str | os.PathLike[str]) -> None:
        """Move one message into the Maildir ``dest`` (created if missing), as seen (``cur/``).

        The move is a rename (atomic); across file systems the message is copied, fsynced and
        renamed into place before the original is removed, so it exists in at least one folder
        at every instant. A message already gone is not an error (moved by an earlier call).
        """
        target = self.prepare(dest)
        if target.resolve() == self.path.resolve():
            raise ValueError("cannot move a message to the folder it is in")
        try:
            path = self._locate(item)
        except TransportError:
            return
        unique = path.name.split(":", 1)[0]
        info = path.name.split(":", 1)[1] if ":" in path.name else "2,S"
        final = target / "cur" / f"{unique}:{info}"
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise TransportError("refused a Maildir entry that is not a regular file")
            try:
                os.rename(path, final)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                self._copy_then_remove(path, target, final)
            fsync_dir(target / "cur")
            fsync_dir(path.parent)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise TransportError(f"cannot move a Maildir message: {exc.strerror}") from exc

    def _copy_then_remove(self, path: Path, target: Path, final: Path) -> None:
        tmp = target / "tmp" / final.name.split(":", 1)[0]
        with self.open(MailItem(handle=f"maildir:{path.parent.name}/{path.name}")) as src:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
        os.rename(tmp, final)
        fsync_dir(final.parent)
        os.unlink(path)
