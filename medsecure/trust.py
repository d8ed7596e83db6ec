"""Binding keys to practitioners: signed statements, pinning, revocation and trust policies.

The Annuaire Santé publishes who a practitioner is and where to write to them, not which
end-to-end key is theirs. medsecure binds keys with three mechanisms (docs/trust.md):

* **authority statements** — a directory authority (the deployment's or the region's key,
  configured as a trust anchor) signs ``(IDNPS, key fingerprint, validity)``;
* **key continuity** — the first key accepted for a practitioner is pinned locally; a later
  different key raises :class:`KeyChanged` unless a *rotation statement signed by the old key* or
  an authority statement *issued after the pin* explains it;
* **revocation statements** — signed by an authority or by the key itself, they remove a key.

A :class:`Statement` is self-authenticating: parsing one verifies its issuer's signature.
Whether that issuer is trusted is decided by a :class:`TrustPolicy`, a required argument wherever
trust is decided. Escape hatches start with ``Unsafe`` and log a warning when used.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import datetime as dt
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _cbor
from . import _format as F
from ._errors import IdentityError, KeyChanged, RevokedKey, StorageError, TrustError, UntrustedKey
from ._identity import Identity, PublicIdentity, _fingerprint_text
from .identifiers import parse
from .models import Practitioner

__all__ = [
    "AuthorityPolicy",
    "PinStore",
    "Statement",
    "TrustDecision",
    "TrustPolicy",
    "UnsafeAcceptAll",
    "UnsafeTrustOnFirstUse",
    "sign_binding",
    "sign_revocation",
    "sign_rotation",
]

log = logging.getLogger("medsecure.trust")

LABEL_STATEMENT = b"medsecure/v1/statement"
STATEMENT_TEXT_PREFIX = "mst1"
BINDING, ROTATION, REVOCATION = "binding", "rotation", "revocation"
_TYPES = (BINDING, ROTATION, REVOCATION)
_MAX_STATEMENT = 16384


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        raise ValueError("datetimes must be timezone-aware")
    return value.astimezone(dt.UTC)


def _ts(value: dt.datetime) -> int:
    return int(_utc(value).timestamp())


def _from_ts(value: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, dt.UTC)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Statement:
    """A signed claim about a practitioner's key (binding, rotation or revocation).

    Instances only come from :func:`sign_binding` / :func:`sign_rotation` /
    :func:`sign_revocation` or :meth:`Statement.parse`, which verifies the issuer's signatures:
    a Statement is always authentically signed by ``issuer``.
    """

    type: str
    subject: str
    """The practitioner's IDNPS."""
    key: str
    """Fingerprint of the key the statement is about (the *old* key for a rotation)."""
    issued_at: dt.datetime
    issuer: PublicIdentity
    not_before: dt.datetime | None = None
    not_after: dt.datetime | None = None
    new_key: str | None = None
    reason: str | None = None
    raw: bytes = field(repr=False, default=b"")

    def to_text(self) -> str:
        """Base64url text form (``mst1…``), as stored in a directory's key entries."""
        return STATEMENT_TEXT_PREFIX + base64.urlsafe_b64encode(self.raw).decode().rstrip("=")

    def to_bytes(self) -> bytes:
        return self.raw

    def valid_at(self, when: dt.datetime) -> bool:
        """Whether ``when`` lies in the statement's validity window (bindings)."""
        if self.not_before is not None and when < self.not_before:
            return False
        return not (self.not_after is not None and when > self.not_after)

    @classmethod
    def parse(cls, data: str | bytes) -> Statement:
        """Parse and verify a statement; raise :class:`TrustError` if malformed or forged."""
        if isinstance(data, str):
            text = data.strip()
            if not text.startswith(STATEMENT_TEXT_PREFIX) or len(text) > 2 * _MAX_STATEMENT:
                raise TrustError("not a medsecure statement")
            try:
                body = text[len(STATEMENT_TEXT_PREFIX) :]
                raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            except ValueError as exc:
                raise TrustError("malformed statement: not base64url") from exc
        elif isinstance(data, (bytes, bytearray)):
            raw = bytes(data)
        else:
            raise TypeError("a statement is str or bytes")
        if len(raw) > _MAX_STATEMENT:
            raise TrustError("malformed statement: too long")
        outer = _cbor.decode(raw, error=TrustError, what="statement")
        if not isinstance(outer, dict) or set(outer) != {1, 2, 3}:
            raise TrustError("malformed statement")
        body, issuer_bytes, sigs = outer[1], outer[2], outer[3]
        if not (
            isinstance(body, bytes) and isinstance(issuer_bytes, bytes) and isinstance(sigs, list)
        ):
            raise TrustError("malformed statement")
        try:
            issuer = PublicIdentity._from_bytes_cached(issuer_bytes)
        except IdentityError as exc:
            raise TrustError("malformed statement: bad issuer key") from exc
        if not all(isinstance(s, bytes) for s in sigs) or not issuer._verify(
            LABEL_STATEMENT + body, sigs
        ):
            raise TrustError("statement signature verification failed")
        fields = _cbor.decode(body, error=TrustError, what="statement body")
        return cls._from_fields(fields, issuer, raw)

    @classmethod
    def _from_fields(cls, f: Any, issuer: PublicIdentity, raw: bytes) -> Statement:
        if not isinstance(f, dict) or f.get(1) != 1 or f.get(2) not in _TYPES:
            raise TrustError("malformed statement body")
        kind = f[2]
        required = {1, 2, 3, 4, 5} | ({8} if kind == ROTATION else set())
        allowed = required | {6, 7, 9}
        if not required <= set(f) <= allowed:
            raise TrustError("malformed statement body: unexpected fields")

        def fp(value: Any) -> str:
            if not isinstance(value, bytes) or len(value) != F.FINGERPRINT_BYTES:
                raise TrustError("malformed statement body: bad fingerprint")
            return _fingerprint_text(value)

        def ts(value: Any) -> dt.datetime:
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 40:
                raise TrustError("malformed statement body: bad time")
            return _from_ts(value)

        if not isinstance(f[3], str):
            raise TrustError("malformed statement body: bad subject")
        try:
            subject = parse(f[3]).idnps
        except ValueError as exc:
            raise TrustError("malformed statement body: bad subject") from exc
        reason = f.get(9)
        if reason is not None and (not isinstance(reason, str) or len(reason) > 200):
            raise TrustError("malformed statement body: bad reason")
        return cls(
            type=kind,
            subject=subject,
            key=fp(f[4]),
            issued_at=ts(f[5]),
            not_before=ts(f[6]) if 6 in f else None,
            not_after=ts(f[7]) if 7 in f else None,
            new_key=fp(f[8]) if 8 in f else None,
            reason=reason,
            issuer=issuer,
            raw=raw,
        )


def _sign(issuer: Identity, fields: dict[int, Any]) -> Statement:
    if not isinstance(issuer, Identity):
        raise TypeError("the issuer must be an Identity")
    body = _cbor.encode(fields)
    raw = _cbor.encode(
        {1: body, 2: issuer.public.to_bytes(), 3: issuer._sign(LABEL_STATEMENT + body)}
    )
    return Statement._from_fields(fields, issuer.public, raw)


def _fp_bytes(key: PublicIdentity | str) -> bytes:
    if isinstance(key, PublicIdentity):
        return key.fingerprint_bytes
    if isinstance(key, str) and key.startswith(F.FINGERPRINT_TEXT_PREFIX):
        from ._identity import _unb32

        raw = _unb32(key[len(F.FINGERPRINT_TEXT_PREFIX) :])
        if len(raw) == F.FINGERPRINT_BYTES:
            return raw
    raise ValueError("expected a PublicIdentity or an ms1… fingerprint")


def sign_binding(
    authority: Identity,
    *,
    idnps: str,
    key: PublicIdentity,
    not_before: dt.datetime,
    not_after: dt.datetime,
    issued_at: dt.datetime | None = None,
) -> Statement:
    """An authority vouches that ``key`` belongs to the practitioner ``idnps`` in a window."""
    if not_after <= not_before:
        raise ValueError("not_after must be after not_before")
    return _sign(
        authority,
        {
            1: 1,
            2: BINDING,
            3: parse(idnps).idnps,
            4: _fp_bytes(key),
            5: _ts(issued_at or _now()),
            6: _ts(not_before),
            7: _ts(not_after),
        },
    )


def sign_rotation(
    old: Identity, *, idnps: str, new_key: PublicIdentity, issued_at: dt.datetime | None = None
) -> Statement:
    """The old key hands over to ``new_key`` (signed by the old key itself)."""
    return _sign(
        old,
        {
            1: 1,
            2: ROTATION,
            3: parse(idnps).idnps,
            4: old.public.fingerprint_bytes,
            5: _ts(issued_at or _now()),
            8: _fp_bytes(new_key),
        },
    )


def sign_revocation(
    issuer: Identity,
    *,
    idnps: str,
    key: PublicIdentity | str,
    reason: str = "unspecified",
    issued_at: dt.datetime | None = None,
) -> Statement:
    """Revoke ``key`` for ``idnps``; signed by an authority or by the key itself."""
    return _sign(
        issuer,
        {
            1: 1,
            2: REVOCATION,
            3: parse(idnps).idnps,
            4: _fp_bytes(key),
            5: _ts(issued_at or _now()),
            9: reason,
        },
    )


# --------------------------------------------------------------------------------------------
# pin store
# --------------------------------------------------------------------------------------------


class PinStore:
    """Pinned keys per practitioner (key continuity), in SQLite (or in memory with ``path=None``)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self._lock = threading.Lock()
        target = ":memory:" if path is None else str(path)
        try:
            self._db = sqlite3.connect(
                target, check_same_thread=False, timeout=10, isolation_level=None
            )
            if path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS pins (idnps TEXT NOT NULL, fingerprint TEXT NOT NULL,"
                " pinned_at INTEGER NOT NULL, PRIMARY KEY (idnps, fingerprint))"
            )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the pin store {target!r}: {exc}") from exc

    def pinned(self, idnps: str) -> dict[str, dt.datetime]:
        """Fingerprints pinned for ``idnps`` with the time each was pinned."""
        with self._lock, self._guard():
            rows = self._db.execute(
                "SELECT fingerprint, pinned_at FROM pins WHERE idnps = ?", (idnps,)
            ).fetchall()
        return {fp: _from_ts(at) for fp, at in rows}

    def pin(
        self, idnps: str, fingerprint: str, at: dt.datetime, *, replace: str | None = None
    ) -> None:
        """Pin ``fingerprint`` for ``idnps``; with ``replace``, unpin that key in the same commit."""
        with self._lock, self._guard():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if replace is not None:
                    self._db.execute(
                        "DELETE FROM pins WHERE idnps = ? AND fingerprint = ?", (idnps, replace)
                    )
                self._db.execute(
                    "INSERT OR REPLACE INTO pins VALUES (?, ?, ?)", (idnps, fingerprint, _ts(at))
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def unpin(self, idnps: str, fingerprint: str | None = None) -> None:
        """Forget one pinned key (or all of a practitioner's), e.g. after checking a new key."""
        with self._lock, self._guard():
            if fingerprint is None:
                self._db.execute("DELETE FROM pins WHERE idnps = ?", (idnps,))
            else:
                self._db.execute(
                    "DELETE FROM pins WHERE idnps = ? AND fingerprint = ?", (idnps, fingerprint)
                )

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StorageError(f"pin store failure: {exc}") from exc


# --------------------------------------------------------------------------------------------
# policies
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustDecision:
    """Why a key was accepted for a practitioner."""

    idnps: str
    key: PublicIdentity
    reason: str
    """``authority``, ``pinned``, ``rotation``, ``new-authority-statement``, ``first-use`` or ``unsafe``."""
    authority: str | None = None
    """Fingerprint of the authority whose statement vouched for the key, if any."""
    newly_pinned: bool = False


def _statements(practitioner: Practitioner, extra: Iterable[Statement]) -> list[Statement]:
    out = list(extra)
    for entry in practitioner.keys:
        for text in entry.statements:
            try:
                st = Statement.parse(text)
            except TrustError as exc:
                log.warning(
                    "ignoring a malformed or forged statement for %s: %s", practitioner.idnps, exc
                )
                continue
            if st.subject == practitioner.idnps:
                out.append(st)
    return out


class TrustPolicy(abc.ABC):
    """Decides whether a key belongs to a practitioner."""

    def __init__(
        self,
        *,
        pins: PinStore | None = None,
        revocations: Sequence[Statement] = (),
        clock: Callable[[], dt.datetime] = _now,
    ) -> None:
        self.pins = pins
        self._revocations = list(revocations)
        self._clock = clock

    def add_revocation(self, statement: Statement) -> None:
        """Remember a revocation learnt out of band (it applies to every later check)."""
        if statement.type != REVOCATION:
            raise ValueError("not a revocation statement")
        self._revocations.append(statement)

    @abc.abstractmethod
    def _vouch(
        self,
        practitioner: Practitioner,
        key: PublicIdentity,
        statements: list[Statement],
        now: dt.datetime,
    ) -> TrustDecision:
        """Accept the key on this policy's grounds or raise a TrustError (pins are handled after)."""

    def _revokers(self, key: PublicIdentity) -> set[str]:
        return {key.fingerprint}

    def check(
        self, practitioner: Practitioner, key: PublicIdentity, *, now: dt.datetime | None = None
    ) -> TrustDecision:
        """Accept ``key`` for ``practitioner`` or raise :class:`RevokedKey`, :class:`UntrustedKey`
        or :class:`KeyChanged`."""
        when = _utc(now) if now is not None else self._clock()
        statements = _statements(practitioner, self._revocations)
        entry = next((e for e in practitioner.keys if e.public == key), None)
        revokers = self._revokers(key)
        for st in statements:
            if (
                st.type == REVOCATION
                and st.subject == practitioner.idnps
                and st.key == key.fingerprint
                and st.issuer.fingerprint in revokers
            ):
                log.warning(
                    "key %s of %s is revoked (%s)", key.fingerprint, practitioner.idnps, st.reason
                )
                raise RevokedKey(f"key {key.fingerprint} of {practitioner.idnps} has been revoked")
        if entry is not None and (
            (entry.not_before is not None and when < _utc(entry.not_before))
            or (entry.not_after is not None and when > _utc(entry.not_after))
        ):
            raise UntrustedKey(
                f"key {key.fingerprint} of {practitioner.idnps} is outside its validity period"
            )
        decision = self._vouch(practitioner, key, statements, when)
        if self.pins is None:
            return decision
        return self._continuity(practitioner, key, statements, when, decision)

    def _continuity(
        self,
        practitioner: Practitioner,
        key: PublicIdentity,
        statements: list[Statement],
        when: dt.datetime,
        decision: TrustDecision,
    ) -> TrustDecision:
        assert self.pins is not None
        pinned = self.pins.pinned(practitioner.idnps)
        fp = key.fingerprint
        if fp in pinned:
            return TrustDecision(
                practitioner.idnps,
                key,
                "pinned" if decision.reason != "authority" else "authority",
                decision.authority,
            )
        if not pinned:
            self.pins.pin(practitioner.idnps, fp, when)
            return TrustDecision(
                practitioner.idnps, key, decision.reason, decision.authority, newly_pinned=True
            )
        for st in statements:
            if (
                st.type == ROTATION
                and st.new_key == fp
                and st.key in pinned
                and st.issuer.fingerprint == st.key
            ):
                self.pins.pin(practitioner.idnps, fp, when, replace=st.key)
                log.info("key of %s rotated from %s to %s", practitioner.idnps, st.key, fp)
                return TrustDecision(
                    practitioner.idnps, key, "rotation", decision.authority, newly_pinned=True
                )
        newest_pin = max(pinned.values())
        for st in statements:
            if (
                st.type == BINDING
                and st.key == fp
                and self._is_authority(st.issuer)
                and st.valid_at(when)
                and st.issued_at > newest_pin
            ):
                self.pins.pin(practitioner.idnps, fp, when)
                return TrustDecision(
                    practitioner.idnps,
                    key,
                    "new-authority-statement",
                    st.issuer.fingerprint,
                    newly_pinned=True,
                )
        log.warning(
            "key of %s changed to %s without rotation or new authority statement",
            practitioner.idnps,
            fp,
        )
        raise KeyChanged(
            f"the key of {practitioner.idnps} changed ({fp} is not the pinned key) and no rotation "
            "signed by the old key or newer authority statement vouches for it"
        )

    def _is_authority(self, issuer: PublicIdentity) -> bool:
        return False

    def decisions(
        self, practitioner: Practitioner, *, now: dt.datetime | None = None
    ) -> list[TrustDecision]:
        """One decision per accepted key of the practitioner; raises the first refusal if no
        key is accepted."""
        accepted: list[TrustDecision] = []
        first_error: TrustError | None = None
        for entry in practitioner.keys:
            try:
                accepted.append(self.check(practitioner, entry.public, now=now))
            except TrustError as exc:
                first_error = first_error or exc
        if not accepted:
            if first_error is not None:
                raise first_error
            raise UntrustedKey(f"{practitioner.idnps} has no end-to-end key in the directory")
        return accepted

    def trusted_keys(
        self, practitioner: Practitioner, *, now: dt.datetime | None = None
    ) -> list[PublicIdentity]:
        """The practitioner's keys this policy accepts; raises the first refusal if none is."""
        return [d.key for d in self.decisions(practitioner, now=now)]


class AuthorityPolicy(TrustPolicy):
    """Accept keys vouched for by a binding statement of one of ``authorities`` (trust anchors),
    valid now and not revoked; with ``pins``, also enforce key continuity."""

    def __init__(
        self,
        authorities: Sequence[PublicIdentity],
        *,
        pins: PinStore | None = None,
        revocations: Sequence[Statement] = (),
        clock: Callable[[], dt.datetime] = _now,
    ) -> None:
        if isinstance(authorities, PublicIdentity) or not authorities:
            raise ValueError("authorities must be a non-empty sequence of PublicIdentity")
        if not all(isinstance(a, PublicIdentity) for a in authorities):
            raise TypeError("authorities must be PublicIdentity values")
        super().__init__(pins=pins, revocations=revocations, clock=clock)
        self._authorities = {a.fingerprint for a in authorities}

    def _is_authority(self, issuer: PublicIdentity) -> bool:
        return issuer.fingerprint in self._authorities

    def _revokers(self, key: PublicIdentity) -> set[str]:
        return {key.fingerprint} | self._authorities

    def _vouch(
        self,
        practitioner: Practitioner,
        key: PublicIdentity,
        statements: list[Statement],
        now: dt.datetime,
    ) -> TrustDecision:
        bindings = [s for s in statements if s.type == BINDING and s.key == key.fingerprint]
        if not bindings:
            raise UntrustedKey(
                f"key {key.fingerprint} of {practitioner.idnps} is not signed by any directory authority"
            )
        trusted = [s for s in bindings if self._is_authority(s.issuer)]
        if not trusted:
            raise UntrustedKey(
                f"key {key.fingerprint} of {practitioner.idnps} is signed by an unknown authority"
            )
        valid = [s for s in trusted if s.valid_at(now)]
        if not valid:
            raise UntrustedKey(
                f"the authority statement for key {key.fingerprint} of {practitioner.idnps} has expired or is not yet valid"
            )
        best = max(valid, key=lambda s: s.issued_at)
        return TrustDecision(practitioner.idnps, key, "authority", best.issuer.fingerprint)


class UnsafeTrustOnFirstUse(TrustPolicy):
    """**Unsafe**: accept unsigned keys on first use, then enforce continuity (pinning) only.

    Anyone who controls the directory the first time can substitute a key. Use it only where no
    authority exists yet, and compare fingerprints out of band. Logs a warning when used.
    """

    def __init__(
        self,
        pins: PinStore,
        *,
        revocations: Sequence[Statement] = (),
        clock: Callable[[], dt.datetime] = _now,
    ) -> None:
        if not isinstance(pins, PinStore):
            raise TypeError("UnsafeTrustOnFirstUse needs a PinStore")
        super().__init__(pins=pins, revocations=revocations, clock=clock)
        log.warning("UnsafeTrustOnFirstUse: keys are accepted without any authority statement")

    def _vouch(
        self,
        practitioner: Practitioner,
        key: PublicIdentity,
        statements: list[Statement],
        now: dt.datetime,
    ) -> TrustDecision:
        log.warning(
            "UnsafeTrustOnFirstUse: accepting key %s of %s without authority",
            key.fingerprint,
            practitioner.idnps,
        )
        return TrustDecision(practitioner.idnps, key, "first-use")


class UnsafeAcceptAll(TrustPolicy):
    """**Unsafe**: accept every key that is not revoked (tests, demos). Logs a warning when used."""

    def __init__(
        self, *, revocations: Sequence[Statement] = (), clock: Callable[[], dt.datetime] = _now
    ) -> None:
        super().__init__(pins=None, revocations=revocations, clock=clock)
        log.warning("UnsafeAcceptAll: every key is trusted; never use this in production")

    def _vouch(
        self,
        practitioner: Practitioner,
        key: PublicIdentity,
        statements: list[Statement],
        now: dt.datetime,
    ) -> TrustDecision:
        log.warning("UnsafeAcceptAll: accepting key %s of %s", key.fingerprint, practitioner.idnps)
        return TrustDecision(practitioner.idnps, key, "unsafe")
