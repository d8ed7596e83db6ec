"""A drop-folder transport laid out like Maildir (shared folder, USB key, synchronised folder).

Each mailbox folder has ``tmp/`` and ``new/``. A writer creates ``tmp/<message id>.<random>``,
writes and fsyncs it, renames it to ``new/<message id>.msec`` and fsyncs ``new/``: readers only
ever look in ``new/``, so they never see a partial file, and the rename is atomic, so
concurrent writers and readers are safe. Re-delivering the same message replaces the file with
identical bytes (idempotent). File names carry only the message id — never patient data.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, ClassVar

from .._errors import DeliveryRejected, StorageError, TransportError, TransportUnavailable
from .._fs import fsync_dir
from ..models import Endpoint
from ._base import Incoming, Transport

__all__ = ["FileTransport"]

_NAME_RE = re.compile(r"([0-9A-HJKMNP-TV-Z]{26})\.msec")
_STALE_TMP_SECONDS = 36 * 3600  # Maildir's advice for abandoned tmp/ files
_TRANSIENT = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EIO,
    errno.ETIMEDOUT,
    errno.EAGAIN,
    errno.ESTALE,
    errno.ENOTCONN,
}


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
        if not _NAME_RE.fullmatch(message_id + ".msec"):
            raise ValueError("malformed message id")
        box = Path(endpoint.path)
        if not box.is_dir():
            raise TransportUnavailable(f"drop folder {str(box)!r} is not reachable")
        tmp = box / "tmp" / f"{message_id}.{secrets.token_hex(8)}"
        try:
            self.prepare(box)
            if not self._link(envelope, tmp):
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(envelope, out, 1 << 20)
                        out.flush()
                        os.fsync(out.fileno())
                except BaseException:
                    with contextlib.suppress(OSError):
                        tmp.unlink()
                    raise
            try:
                os.replace(tmp, box / "new" / f"{message_id}.msec")
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            fsync_dir(box / "new")
        except OSError as exc:
            where = f"drop folder {str(box)!r}"
            if exc.errno in _TRANSIENT:
                raise TransportUnavailable(f"cannot write to {where}: {exc.strerror}") from exc
            raise DeliveryRejected(f"cannot write to {where}: {exc.strerror}") from exc

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

    def local_path(self, item: Incoming) -> Path:
        """Where a waiting envelope lies (lets a receiver link instead of copying)."""
        return self._path(item)

    def list(self) -> Sequence[Incoming]:
        new = self.root / "new"
        try:
            names = sorted(os.listdir(new))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise TransportError(f"cannot list {str(new)!r}: {exc.strerror}") from exc
        self._clean_tmp()
        out = []
        for name in names:
            m = _NAME_RE.fullmatch(name)
            if m is None:
                continue
            try:
                size = (new / name).stat().st_size
            except FileNotFoundError:
                continue  # taken by a concurrent reader
            out.append(Incoming(handle=name, message_id=m.group(1), size=size))
        return out

    def _clean_tmp(self) -> None:
        tmp = self.root / "tmp"
        now = time.time()
        with contextlib.suppress(OSError):
            for entry in os.scandir(tmp):
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                        os.unlink(entry.path)

    def _path(self, item: Incoming) -> Path:
        if not _NAME_RE.fullmatch(item.handle):
            raise ValueError("not an item of this transport")
        return self.root / "new" / item.handle

    def fetch(self, item: Incoming) -> BinaryIO:
        try:
            return self._path(item).open("rb")
        except FileNotFoundError as exc:
            raise TransportUnavailable("the envelope was taken by another reader") from exc
        except OSError as exc:
            raise StorageError(f"cannot read an incoming envelope: {exc.strerror}") from exc

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
