"""Local directories: in memory, and in a JSON or CBOR file a practice can edit."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .._errors import DirectoryError, PractitionerNotFound
from .._fs import atomic_write
from ..envelope import _cbor
from ..models import Practitioner
from ._base import Directory, Ref, normalize_ref, search_matches, unique

__all__ = ["FileDirectory", "MemoryDirectory"]

FILE_FORMAT_VERSION = 1


class MemoryDirectory(Directory):
    """Practitioners held in memory, indexed by IDNPS and by every MSSanté address."""

    def __init__(self, practitioners: Iterable[Practitioner] = ()) -> None:
        self._lock = threading.RLock()
        self._by_idnps: dict[str, Practitioner] = {}
        self._index: dict[str, set[str]] = {}
        for p in practitioners:
            self.add(p)

    def add(self, practitioner: Practitioner) -> None:
        """Add or replace the entry with the same IDNPS."""
        if not isinstance(practitioner, Practitioner):
            raise TypeError("expected a Practitioner")
        with self._lock:
            self._drop(practitioner.idnps)
            self._by_idnps[practitioner.idnps] = practitioner
            for key in practitioner.refs():
                self._index.setdefault(key, set()).add(practitioner.idnps)

    def _drop(self, idnps: str) -> bool:
        old = self._by_idnps.pop(idnps, None)
        if old is None:
            return False
        for key in old.refs():
            ids = self._index.get(key)
            if ids is not None:
                ids.discard(idnps)
                if not ids:
                    del self._index[key]
        return True

    def remove(self, ref: Ref) -> Practitioner:
        """Remove and return the practitioner ``ref`` names."""
        with self._lock:
            p = MemoryDirectory.lookup(self, ref)
            self._drop(p.idnps)
            return p

    def lookup(self, ref: Ref) -> Practitioner:
        key, _ = normalize_ref(ref)
        with self._lock:
            ids = self._index.get(key, set())
            return unique((self._by_idnps[i] for i in sorted(ids)), ref)

    def search(
        self,
        *,
        name: str | None = None,
        given: str | None = None,
        profession: str | None = None,
        city: str | None = None,
        limit: int = 200,
    ) -> list[Practitioner]:
        with self._lock:
            everyone = list(self._by_idnps.values())
        found = [
            p
            for p in everyone
            if search_matches(p, name=name, given=given, profession=profession, city=city)
        ]
        return sorted(found, key=lambda p: (p.family_name or "", p.given_name or "", p.idnps))[
            :limit
        ]

    def all(self) -> list[Practitioner]:
        """Every entry, sorted by IDNPS."""
        with self._lock:
            return [self._by_idnps[k] for k in sorted(self._by_idnps)]

    def __len__(self) -> int:
        return len(self._by_idnps)


class FileDirectory(MemoryDirectory):
    """A directory stored in one file (``.json`` — editable by hand — or ``.cbor``).

    The file is re-read when it changed on disk, and written atomically (temporary file, fsync,
    rename) on every :meth:`add` / :meth:`remove`. A missing file is an empty directory; a broken
    one raises :class:`DirectoryError` naming the problem.

    JSON layout: ``{"format": "medsecure-directory", "version": 1, "practitioners": [...]}``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path)
        self._cbor = self.path.suffix.lower() == ".cbor"
        self._stamp: tuple[int, int] | None = None
        self._reload(force=True)

    # -- persistence ------------------------------------------------------------------------
    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DirectoryError(
                f"cannot read directory file {str(self.path)!r}: {exc.strerror}"
            ) from exc
        return (st.st_mtime_ns, st.st_size)

    def _reload(self, force: bool = False) -> None:
        stamp = self._file_stamp()
        if not force and stamp == self._stamp:
            return
        with self._lock:
            entries = self._read() if stamp is not None else []
            self._by_idnps.clear()
            self._index.clear()
            for p in entries:
                MemoryDirectory.add(self, p)
            self._stamp = stamp

    def _read(self) -> list[Practitioner]:
        name = str(self.path)
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise DirectoryError(f"cannot read directory file {name!r}: {exc.strerror}") from exc
        try:
            if self._cbor:
                doc: Any = _cbor.decode(raw, error=ValueError, what="directory file")
            else:
                doc = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DirectoryError(
                f"directory file {name!r} is not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
            ) from exc
        except (ValueError, RecursionError) as exc:
            kind = "CBOR" if self._cbor else "JSON (bad encoding or nesting)"
            raise DirectoryError(f"directory file {name!r} is not valid {kind}") from exc
        if not isinstance(doc, dict) or doc.get("format") != "medsecure-directory":
            raise DirectoryError(f"{name!r} is not a medsecure directory file")
        if doc.get("version") != FILE_FORMAT_VERSION:
            raise DirectoryError(
                f"directory file {name!r} has unsupported version {doc.get('version')!r}"
            )
        items = doc.get("practitioners", [])
        if not isinstance(items, list):
            raise DirectoryError(f"directory file {name!r}: 'practitioners' must be a list")
        out = []
        for i, item in enumerate(items):
            try:
                out.append(Practitioner.model_validate(item))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(x) for x in first.get("loc", ()))
                raise DirectoryError(
                    f"directory file {name!r}: practitioner #{i + 1} is invalid at {where or 'top level'}: {first.get('msg')}"
                ) from exc
        return out

    def _write(self) -> None:
        items = [
            p.model_dump(mode="json", exclude_defaults=True, exclude={"stale"})
            for p in MemoryDirectory.all(self)
        ]
        doc = {
            "format": "medsecure-directory",
            "version": FILE_FORMAT_VERSION,
            "practitioners": items,
        }
        data = (
            _cbor.encode(doc)
            if self._cbor
            else (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        )
        try:
            atomic_write(self.path, data, mode=0o644)
        except OSError as exc:
            raise DirectoryError(
                f"cannot write directory file {str(self.path)!r}: {exc.strerror}"
            ) from exc
        self._stamp = self._file_stamp()

    # -- API --------------------------------------------------------------------------------
    def add(self, practitioner: Practitioner) -> None:
        with self._lock:
            self._reload()
            super().add(practitioner)
            self._write()

    def add_many(self, practitioners: Sequence[Practitioner]) -> None:
        """Add or replace several entries with one write."""
        with self._lock:
            self._reload()
            for p in practitioners:
                MemoryDirectory.add(self, p)
            self._write()

    def remove(self, ref: Ref) -> Practitioner:
        with self._lock:
            self._reload()
            p = super().remove(ref)
            self._write()
            return p

    def lookup(self, ref: Ref) -> Practitioner:
        self._reload()
        try:
            return super().lookup(ref)
        except PractitionerNotFound:
            raise PractitionerNotFound(
                f"no practitioner matches {ref!s} in {str(self.path)!r}"
            ) from None

    def search(
        self,
        *,
        name: str | None = None,
        given: str | None = None,
        profession: str | None = None,
        city: str | None = None,
        limit: int = 200,
    ) -> list[Practitioner]:
        self._reload()
        return super().search(name=name, given=given, profession=profession, city=city, limit=limit)

    def all(self) -> list[Practitioner]:
        self._reload()
        return super().all()
