"""Trust policies: whether a key belongs to a practitioner (docs/trust.md).

Theory of operation
-------------------
:meth:`TrustPolicy.check` is the one entry point, and it is final: subclasses only say on which
grounds they vouch for a key (:meth:`TrustPolicy._vouch`). Every policy therefore applies the same
rules, in this order, whatever the caller does:

1. **the directory lists the key** for this practitioner — otherwise :class:`UntrustedKey`, and
   nothing is pinned. The key a sender presents comes from the envelope, i.e. from the sender;
   only the directory says which keys are the practitioner's. Without this rule a stranger could
   present a fresh key under a practitioner's name, have it pinned on first use, and lock the real
   practitioner out (:class:`KeyChanged`). It holds for the ``Unsafe`` policies too;
2. the key is not revoked (by itself or, for :class:`AuthorityPolicy`, by a trust anchor);
3. the directory's own validity window for the entry holds;
4. the policy's grounds (:meth:`_vouch`): an authority binding, or nothing (``Unsafe``);
5. key continuity, when the policy has a :class:`PinStore`: the first accepted key is pinned; a
   different key later needs a rotation signed by a pinned key *that is not revoked*, or an
   authority binding issued after the pin.
"""

from __future__ import annotations

import abc
import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, final

from .._errors import KeyChanged, RevokedKey, TrustError, UntrustedKey
from .._identity import PublicIdentity
from ..models import KeyEntry, Practitioner
from ._pins import PinStore
from ._statements import (
    BINDING,
    REVOCATION,
    Statement,
    _now,
    _utc,
    find_revocation,
    is_self_signed_rotation,
)

__all__ = [
    "AuthorityPolicy",
    "TrustDecision",
    "TrustPolicy",
    "UnsafeAcceptAll",
    "UnsafeTrustOnFirstUse",
]

log = logging.getLogger("medsecure.trust")


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


@dataclass(frozen=True)
class _Claim:
    """What a check decides on: a key presented for a practitioner, every authentic statement
    about the practitioner, and the time of the check."""

    practitioner: Practitioner
    key: PublicIdentity
    statements: list[Statement]
    now: dt.datetime


def _statements(practitioner: Practitioner, extra: Iterable[Statement]) -> list[Statement]:
    """Every authentic statement about ``practitioner``: ``extra`` (learnt out of band) and those
    the directory carries in any of the practitioner's key entries."""
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


def _listed(practitioner: Practitioner, key: PublicIdentity) -> KeyEntry | None:
    return next((e for e in practitioner.keys if e.public == key), None)


class TrustPolicy(abc.ABC):
    """Decides whether a key belongs to a practitioner.

    Subclasses implement :meth:`_vouch` only; :meth:`check` applies the rules every policy shares
    (the key must be listed by the directory, not revoked, within the entry's validity, and
    continuous with the pins) and cannot be overridden.
    """

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
    def _vouch(self, claim: _Claim) -> TrustDecision:
        """Accept the key on this policy's grounds or raise a TrustError (pins are handled after)."""

    def _revokers(self, fingerprint: str) -> frozenset[str]:
        """Who may revoke the key ``fingerprint``: the key itself (and, see subclasses, anchors)."""
        return frozenset({fingerprint})

    def _revocation(
        self, practitioner: Practitioner, statements: list[Statement], fingerprint: str
    ) -> Statement | None:
        return find_revocation(
            statements,
            idnps=practitioner.idnps,
            key=fingerprint,
            revokers=self._revokers(fingerprint),
        )

    @final
    def check(
        self, practitioner: Practitioner, key: PublicIdentity, *, now: dt.datetime | None = None
    ) -> TrustDecision:
        """Accept ``key`` for ``practitioner`` or raise :class:`UntrustedKey` (among others when
        the directory does not list the key for this practitioner), :class:`RevokedKey` or
        :class:`KeyChanged`."""
        if not isinstance(practitioner, Practitioner):
            raise TypeError("practitioner must be a Practitioner")
        if not isinstance(key, PublicIdentity):
            raise TypeError("key must be a PublicIdentity")
        when = _utc(now) if now is not None else self._clock()
        fp = key.fingerprint
        entry = _listed(practitioner, key)
        if entry is None:
            # Checked before anything else, so that nothing (no pin, no rotation) can follow
            # from a key only its presenter vouches for.
            log.warning("key %s is not listed by the directory for %s", fp, practitioner.idnps)
            raise UntrustedKey(f"key {fp} is not listed by the directory for {practitioner.idnps}")
        statements = _statements(practitioner, self._revocations)
        revocation = self._revocation(practitioner, statements, fp)
        if revocation is not None:
            log.warning("key %s of %s is revoked (%s)", fp, practitioner.idnps, revocation.reason)
            raise RevokedKey(f"key {fp} of {practitioner.idnps} has been revoked")
        if (entry.not_before is not None and when < _utc(entry.not_before)) or (
            entry.not_after is not None and when > _utc(entry.not_after)
        ):
            raise UntrustedKey(f"key {fp} of {practitioner.idnps} is outside its validity period")
        claim = _Claim(practitioner, key, statements, when)
        decision = self._vouch(claim)
        if self.pins is None:
            return decision
        return self._continuity(claim, decision)

    def _continuity(self, claim: _Claim, decision: TrustDecision) -> TrustDecision:
        assert self.pins is not None
        idnps, key, when = claim.practitioner.idnps, claim.key, claim.now
        pinned = self.pins.pinned(idnps)
        fp = key.fingerprint
        if fp in pinned:
            return TrustDecision(
                idnps,
                key,
                "pinned" if decision.reason != "authority" else "authority",
                decision.authority,
            )
        if not pinned:
            self.pins.pin(idnps, fp, when)
            return TrustDecision(idnps, key, decision.reason, decision.authority, newly_pinned=True)
        for st in claim.statements:
            if not (is_self_signed_rotation(st, idnps=idnps, new_key=fp) and st.key in pinned):
                continue
            # A revoked key may be in an attacker's hands (that is why it was revoked): a
            # rotation it signed, whenever it claims to have been issued, hands over nothing.
            if self._revocation(claim.practitioner, claim.statements, st.key) is not None:
                log.warning(
                    "ignoring a rotation of %s from %s to %s: the old key is revoked",
                    idnps,
                    st.key,
                    fp,
                )
                continue
            self.pins.pin(idnps, fp, when, replace=st.key)
            log.info("key of %s rotated from %s to %s", idnps, st.key, fp)
            return TrustDecision(idnps, key, "rotation", decision.authority, newly_pinned=True)
        newest_pin = max(pinned.values())
        for st in claim.statements:
            if (
                st.type == BINDING
                and st.key == fp
                and self._is_authority(st.issuer)
                and st.valid_at(when)
                and st.issued_at > newest_pin
            ):
                self.pins.pin(idnps, fp, when)
                return TrustDecision(
                    idnps, key, "new-authority-statement", st.issuer.fingerprint, newly_pinned=True
                )
        # Not "changed to": the pin stays, this key is refused (decisions() says whether a
        # pinned key is still listed and kept).
        log.warning(
            "refused key %s offered for %s: it is not the pinned key (%s) and no rotation signed "
            "by the old key or newer authority statement vouches for it",
            fp,
            idnps,
            ", ".join(sorted(pinned)),
        )
        raise KeyChanged(
            f"key {fp} offered for {idnps} is not the pinned key and no rotation signed by the "
            "old key or newer authority statement vouches for it: refused"
        )

    def _is_authority(self, issuer: PublicIdentity) -> bool:
        return False

    @final
    def decisions(
        self, practitioner: Practitioner, *, now: dt.datetime | None = None
    ) -> list[TrustDecision]:
        """One decision per accepted key of the practitioner; raises the first refusal if no
        key is accepted."""
        accepted: list[TrustDecision] = []
        first_error: TrustError | None = None
        refused: list[str] = []
        for entry in practitioner.keys:
            try:
                accepted.append(self.check(practitioner, entry.public, now=now))
            except TrustError as exc:
                first_error = first_error or exc
                refused.append(entry.fingerprint)
        if accepted and refused:
            log.warning(
                "%s: refused key(s) %s, kept %s; endpoints listed with a refused key are not used",
                practitioner.idnps,
                ", ".join(refused),
                ", ".join(f"{d.key.fingerprint} ({d.reason})" for d in accepted),
            )
        if not accepted:
            if first_error is not None:
                raise first_error
            raise UntrustedKey(f"{practitioner.idnps} has no end-to-end key in the directory")
        return accepted

    @final
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
        self._authorities = frozenset(a.fingerprint for a in authorities)

    def _is_authority(self, issuer: PublicIdentity) -> bool:
        return issuer.fingerprint in self._authorities

    def _revokers(self, fingerprint: str) -> frozenset[str]:
        return self._authorities | {fingerprint}

    def _vouch(self, claim: _Claim) -> TrustDecision:
        practitioner, key, now = claim.practitioner, claim.key, claim.now
        bindings = [s for s in claim.statements if s.type == BINDING and s.key == key.fingerprint]
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


class _Unsafe(TrustPolicy):
    """A policy that vouches for every key the directory lists, on no grounds at all (which
    its name says), logging each acceptance."""

    #: The decision's reason.
    _reason: ClassVar[str]
    #: What the warning adds after "accepting key … of …".
    _caveat: ClassVar[str] = ""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        # Which (practitioner, key) acceptances were already logged by this policy, i.e. by the
        # client it belongs to: every document, message and receipt checks the key again, and
        # a warning per check (three documents, three identical lines) buries the one line
        # that differs. Another key, or another practitioner, is still logged.
        self._warned: set[tuple[str, str]] = set()
        self._warned_lock = threading.Lock()

    def _vouch(self, claim: _Claim) -> TrustDecision:
        seen = (claim.practitioner.idnps, claim.key.fingerprint)
        with self._warned_lock:
            first = seen not in self._warned
            self._warned.add(seen)
        if first:
            log.warning(
                "%s: accepting key %s of %s%s",
                type(self).__name__,
                claim.key.fingerprint,
                claim.practitioner.idnps,
                self._caveat,
            )
        return TrustDecision(claim.practitioner.idnps, claim.key, self._reason)


class UnsafeTrustOnFirstUse(_Unsafe):
    """**Unsafe**: accept a key the directory lists without any authority statement on first use,
    then enforce continuity (pinning) only.

    Anyone who controls the directory the first time can substitute a key. A key the directory
    does not list for the practitioner is never accepted (nor pinned), whoever presents it. Use
    it only where no authority exists yet, and compare fingerprints out of band. Logs a warning
    when used.
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

    _reason = "first-use"
    _caveat = " without authority"


class UnsafeAcceptAll(_Unsafe):
    """**Unsafe**: accept every key the directory lists for the practitioner that is not revoked
    (tests, demos). Logs a warning when used."""

    def __init__(
        self, *, revocations: Sequence[Statement] = (), clock: Callable[[], dt.datetime] = _now
    ) -> None:
        super().__init__(pins=None, revocations=revocations, clock=clock)
        log.warning("UnsafeAcceptAll: every key is trusted; never use this in production")

    _reason = "unsafe"
