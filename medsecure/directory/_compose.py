"""Directories built from others: an on-disk cache for offline work, and a merging chain."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from .._errors import (
    AmbiguousPractitioner,
    DirectoryError,
    DirectoryUnavailable,
    PractitionerNotFound,
    StorageError,
)
from ..models import Practitioner
from ._base import Directory, Ref, merge_practitioners, normalize_ref, search_matches

__all__ = ["CachedDirectory", "ChainDirectory"]

log = logging.getLogger("medsecure.directory")


class CachedDirectory(Directory):
    """Cache ``inner``'s answers in memory and in SQLite at ``path`` for ``ttl`` seconds.

    Fresh entries are answered without asking ``inner`` (a memory hit costs microseconds).
    When ``inner`` is unavailable, expired entries are still served, marked ``stale=True``, so a
    practice keeps working offline; a practitioner the directory no longer knows is dropped.
    """

    def __init__(
        self,
        inner: Directory,
        *,
        path: str | Path | None = None,
        ttl: float | dt.timedelta = 24 * 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.inner = inner
        self.ttl = ttl.total_seconds() if isinstance(ttl, dt.timedelta) else float(ttl)
        self._clock = clock
        self._lock = threading.RLock()
        self._memory: dict[str, tuple[Practitioner, float]] = {}
        self._db: sqlite3.Connection | None = None
        if path is not None:
            try:
                self._db = sqlite3.connect(
                    str(path), check_same_thread=False, timeout=10, isolation_level=None
                )
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, idnps TEXT NOT NULL,"
                    " entry TEXT NOT NULL, fetched_at REAL NOT NULL)"
                )
            except sqlite3.Error as exc:
                raise StorageError(f"cannot open the directory cache {str(path)!r}: {exc}") from exc

    # -- storage ----------------------------------------------------------------------------
    def _get(self, key: str) -> tuple[Practitioner, float] | None:
        hit = self._memory.get(key)
        if hit is not None or self._db is None:
            return hit
        try:
            row = self._db.execute(
                "SELECT entry, fetched_at FROM cache WHERE key = ?", (key,)
            ).fetchone()
        except sqlite3.Error as exc:
            log.warning("directory cache unreadable: %s", exc)
            return None
        if row is None:
            return None
        try:
            p = Practitioner.model_validate_json(row[0])
        except ValidationError:
            return None
        self._memory[key] = (p, row[1])
        return self._memory[key]

    def _put(self, keys: Sequence[str], p: Practitioner) -> None:
        now = self._clock()
        p = p.model_copy(update={"stale": False}) if p.stale else p
        all_keys = list(dict.fromkeys([*keys, *p.refs()]))
        with self._lock:
            for k in all_keys:
                self._memory[k] = (p, now)
            if self._db is not None:
                entry = p.model_dump_json()
                try:
                    self._db.execute("BEGIN")
                    self._db.executemany(
                        "INSERT OR REPLACE INTO cache VALUES (?, ?, ?, ?)",
                        [(k, p.idnps, entry, now) for k in all_keys],
                    )
                    self._db.execute("COMMIT")
                except sqlite3.Error as exc:
                    log.warning("directory cache not written: %s", exc)
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")

    def _forget(self, key: str) -> None:
        with self._lock:
            hit = self._memory.pop(key, None)
            idnps = hit[0].idnps if hit else None
            if idnps:
                for k in [k for k, v in self._memory.items() if v[0].idnps == idnps]:
                    del self._memory[k]
            if self._db is not None:
                try:
                    self._db.execute(
                        "DELETE FROM cache WHERE key = ? OR idnps = ?", (key, idnps or "")
                    )
                except sqlite3.Error as exc:
                    log.warning("directory cache not updated: %s", exc)

    def _fresh(self, fetched_at: float) -> bool:
        return self._clock() - fetched_at < self.ttl

    # -- Directory --------------------------------------------------------------------------
    def lookup(self, ref: Ref) -> Practitioner:
        key, _ = normalize_ref(ref)
        hit = self._get(key)
        if hit is not None and self._fresh(hit[1]):
            return hit[0]
        try:
            p = self.inner.lookup(ref)
        except DirectoryUnavailable:
            if hit is None:
                raise
            log.warning("directory unavailable: serving a stale entry for %s", hit[0].idnps)
            return hit[0].model_copy(update={"stale": True})
        except PractitionerNotFound:
            self._forget(key)
            raise
        self._put([key], p)
        return p

    def lookup_many(self, refs: Sequence[Ref]) -> dict[str, Practitioner]:
        out: dict[str, Practitioner] = {}
        missing: list[Ref] = []
        stale: dict[str, Practitioner] = {}
        for ref in refs:
            key, _ = normalize_ref(ref)
            hit = self._get(key)
            if hit is not None and self._fresh(hit[1]):
                out[key] = hit[0]
            else:
                if hit is not None:
                    stale[key] = hit[0]
                missing.append(ref)
        if not missing:
            return out
        try:
            fetched = self.inner.lookup_many(missing)
        except DirectoryUnavailable:
            for ref in missing:
                key, _ = normalize_ref(ref)
                if key not in stale:
                    raise
                out[key] = stale[key].model_copy(update={"stale": True})
            return out
        for key, p in fetched.items():
            self._put([key], p)
            out[key] = p
        return out

    def search(
        self,
        *,
        name: str | None = None,
        given: str | None = None,
        profession: str | None = None,
        city: str | None = None,
        limit: int = 200,
    ) -> list[Practitioner]:
        try:
            found = self.inner.search(
                name=name, given=given, profession=profession, city=city, limit=limit
            )
        except DirectoryUnavailable:
            cached = self._all_cached()
            if not cached:
                raise
            matches = [
                p.model_copy(update={"stale": True})
                for p in cached
                if search_matches(p, name=name, given=given, profession=profession, city=city)
            ]
            return matches[:limit]
        for p in found:
            self._put([], p)
        return found

    def _all_cached(self) -> list[Practitioner]:
        seen: dict[str, Practitioner] = {p.idnps: p for p, _ in self._memory.values()}
        if self._db is not None:
            try:
                rows = self._db.execute("SELECT entry FROM cache").fetchall()
            except sqlite3.Error:
                rows = []
            for (entry,) in rows:
                try:
                    p = Practitioner.model_validate_json(entry)
                except ValidationError:
                    continue
                seen.setdefault(p.idnps, p)
        return list(seen.values())

    def close(self) -> None:
        self.inner.close()
        if self._db is not None:
            self._db.close()


class ChainDirectory(Directory):
    """Ask several directories and merge what they say about each practitioner (by IDNPS).

    Typical use: ``ChainDirectory([key_directory, annuaire])`` — end-to-end keys and endpoints
    from a medsecure key directory, names and mailboxes from the Annuaire Santé. For scalar
    fields the first directory that has a value wins; lists (mailboxes, keys, endpoints,
    organizations) are merged.
    """

    def __init__(self, directories: Sequence[Directory]) -> None:
        if isinstance(directories, Directory) or not directories:
            raise ValueError("ChainDirectory needs a non-empty list of directories")
        self.directories = list(directories)

    def _each(self, call: Callable[[Directory], list[Practitioner]]) -> list[list[Practitioner]]:
        answers: list[list[Practitioner]] = []
        unavailable: DirectoryUnavailable | None = None
        for d in self.directories:
            try:
                answers.append(call(d))
            except PractitionerNotFound:
                answers.append([])
            except DirectoryUnavailable as exc:
                unavailable = unavailable or exc
                answers.append([])
        if unavailable is not None and not any(answers):
            raise unavailable
        return answers

    def lookup(self, ref: Ref) -> Practitioner:
        normalize_ref(ref)
        answers = self._each(lambda d: [d.lookup(ref)])
        ids = {p.idnps for a in answers for p in a}
        if not ids:
            raise PractitionerNotFound(f"no practitioner matches {ref!s} in any directory")
        if len(ids) > 1:
            raise AmbiguousPractitioner(
                f"directories disagree on {ref!s}: {', '.join(sorted(ids))}"
            )
        (idnps,) = ids
        # a directory that did not know the reference (e.g. a key directory without mailboxes)
        # may still know the practitioner by IDNPS
        for i, d in enumerate(self.directories):
            if not answers[i]:
                with contextlib.suppress(PractitionerNotFound, DirectoryUnavailable):
                    answers[i] = [d.lookup(f"idnps:{idnps}")]
        return merge_practitioners([p for a in answers for p in a])

    def search(
        self,
        *,
        name: str | None = None,
        given: str | None = None,
        profession: str | None = None,
        city: str | None = None,
        limit: int = 200,
    ) -> list[Practitioner]:
        answers = self._each(
            lambda d: d.search(
                name=name, given=given, profession=profession, city=city, limit=limit
            )
        )
        by_id: dict[str, list[Practitioner]] = {}
        for a in answers:
            for p in a:
                by_id.setdefault(p.idnps, []).append(p)
        return [merge_practitioners(v) for v in by_id.values()][:limit]

    def lookup_many(self, refs: Sequence[Ref]) -> dict[str, Practitioner]:
        return {normalize_ref(ref)[0]: self.lookup(ref) for ref in refs}

    def close(self) -> None:
        errors: list[Exception] = []
        for d in self.directories:
            try:
                d.close()
            except Exception as exc:  # close every one of them
                errors.append(exc)
        if errors:
            raise DirectoryError(f"closing directories failed: {errors[0]}") from errors[0]
