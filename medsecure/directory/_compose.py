"""Directories built from others: an on-disk cache for offline work, and a merging chain."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .._errors import (
    AmbiguousPractitioner,
    DirectoryError,
    DirectoryUnavailable,
    PractitionerNotFound,
)
from ..identifiers import MSSanteAddress
from ..models import Practitioner
from ._base import Directory, Ref, merge_practitioners, normalize_ref, search_matches
from ._cachestore import CacheStore

__all__ = ["CachedDirectory", "ChainDirectory"]

log = logging.getLogger("medsecure.directory")


class CachedDirectory(Directory):
    """Cache ``inner``'s answers in memory and in SQLite at ``path`` for ``ttl`` seconds.

    Fresh answers are given without asking ``inner`` (a memory hit costs microseconds). When
    ``inner`` is unavailable, expired answers are still given, marked ``stale=True``, so a
    practice keeps working offline; a practitioner the directory no longer knows is dropped.

    An answer is kept under the IDNPS of the practitioner and under the reference that was
    asked, nothing else: looking up Sophie by RPPS does not make her the answer for her
    mailbox address, because an entry can list any address, including someone else's (the
    directory, asked for that address, would have said who holds it or that it is ambiguous).
    An address is answered from the cache only when the directory named that practitioner for
    it, the entry still lists it, and no other kept entry claims it; an address the directory
    calls ambiguous is forgotten. So an address claimed by two practitioners never resolves
    from the cache to one of them: it is asked again, and offline it is unavailable.
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
        self._store = CacheStore(path)

    def _fresh(self, fetched_at: float) -> bool:
        return self._clock() - fetched_at < self.ttl

    def _cached(self, key: str) -> tuple[Practitioner, float] | None:
        """What the cache may answer for the canonical ``key``, fresh or not, and its age."""
        kind, value = key.split(":", 1)
        if kind == "idnps":
            return self._store.entry(value)
        named = self._store.address(value)
        if named is None:
            return None
        idnps, asked_at = named
        hit = self._store.entry(idnps)
        if hit is None or key not in hit[0].refs():
            return None  # the entry was refreshed since and no longer lists the address
        if self._store.claimants(value) - {idnps}:
            return None  # another kept entry claims it: only the directory can tell
        return hit[0], asked_at

    def _keep(self, key: str, p: Practitioner) -> None:
        p = p.model_copy(update={"stale": False}) if p.stale else p
        kind, value = key.split(":", 1)
        address = value if kind == "mss" and key in p.refs() else None
        self._store.put(p, self._clock(), address=address)

    def _drop(self, key: str) -> None:
        kind, value = key.split(":", 1)
        if kind == "idnps":
            self._store.forget(value)
        else:
            self._store.forget_address(value)

    # -- Directory --------------------------------------------------------------------------
    def lookup(self, ref: Ref) -> Practitioner:
        key, _ = normalize_ref(ref)
        hit = self._cached(key)
        if hit is not None and self._fresh(hit[1]):
            return hit[0]
        try:
            p = self.inner.lookup(ref)
        except DirectoryUnavailable:
            if hit is None:
                raise
            log.warning("directory unavailable: serving a stale entry for %s", hit[0].idnps)
            return hit[0].model_copy(update={"stale": True})
        except (PractitionerNotFound, AmbiguousPractitioner):
            self._drop(key)
            raise
        self._keep(key, p)
        return p

    def lookup_many(self, refs: Sequence[Ref]) -> dict[str, Practitioner]:
        out: dict[str, Practitioner] = {}
        missing: dict[str, Ref] = {}
        stale: dict[str, Practitioner] = {}
        for ref in refs:
            key, _ = normalize_ref(ref)
            hit = self._cached(key)
            if hit is not None and self._fresh(hit[1]):
                out[key] = hit[0]
            else:
                if hit is not None:
                    stale[key] = hit[0]
                missing.setdefault(key, ref)
        if not missing:
            return out
        try:
            fetched = self.inner.lookup_many(list(missing.values()))
        except DirectoryUnavailable:
            for key in missing:
                if key not in stale:
                    raise
                out[key] = stale[key].model_copy(update={"stale": True})
            return out
        except AmbiguousPractitioner:
            # which address was ambiguous is not said: none of them is answered from here
            for key in missing:
                if key.startswith("mss:"):
                    self._drop(key)
            raise
        for key, p in fetched.items():
            self._keep(key, p)
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
            cached = self._store.everyone()
            if not cached:
                raise
            matches = [
                p.model_copy(update={"stale": True})
                for p in cached
                if search_matches(p, name=name, given=given, profession=profession, city=city)
            ]
            return matches[:limit]
        now = self._clock()
        for p in found:  # by IDNPS only: a search answers no address
            self._store.put(p.model_copy(update={"stale": False}) if p.stale else p, now)
        return found

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self._store.close()


class ChainDirectory(Directory):
    """Ask several directories and merge what they say about each practitioner (by IDNPS).

    Typical use: ``ChainDirectory([key_directory, annuaire])`` — end-to-end keys and endpoints
    from a medsecure key directory, names and mailboxes from the Annuaire Santé. For scalar
    fields the first directory that has a value wins; lists (mailboxes, keys, endpoints,
    organizations) are merged.

    Every directory is asked the reference itself, so an address two of them give to different
    practitioners is :class:`AmbiguousPractitioner`, never one of the two. For the same reason,
    an address is resolved only when every directory could answer: if one is unavailable, the
    practitioner it might have named for the address is unknown, and the lookup is
    :class:`DirectoryUnavailable` (a lookup by identifier merges what the available ones say).
    """

    def __init__(self, directories: Sequence[Directory]) -> None:
        if isinstance(directories, Directory) or not directories:
            raise ValueError("ChainDirectory needs a non-empty list of directories")
        self.directories = list(directories)

    def _each(
        self, call: Callable[[Directory], list[Practitioner]], *, every: bool = False
    ) -> list[list[Practitioner]]:
        """Each directory's answer ([] when it knows nothing); unavailable directories raise
        when none answered, or at all when ``every`` one must answer."""
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
        if unavailable is not None and (every or not any(answers)):
            raise unavailable
        return answers

    def lookup(self, ref: Ref) -> Practitioner:
        _key, parsed = normalize_ref(ref)
        answers = self._each(lambda d: [d.lookup(ref)], every=isinstance(parsed, MSSanteAddress))
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
