"""Key discovery and trust: every acceptance and every rejection path."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest

from medsecure import (
    AuthorityPolicy,
    Identity,
    KeyChanged,
    KeyEntry,
    PinStore,
    Practitioner,
    RevokedKey,
    Statement,
    TrustError,
    UnsafeAcceptAll,
    UnsafeTrustOnFirstUse,
    UntrustedKey,
)
from medsecure.trust import sign_binding, sign_revocation, sign_rotation

IDNPS = "810000005479"
T0 = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def authority() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def rogue() -> Identity:
    return Identity.generate()


def entry(key: Identity, *statements: Statement, **kw: object) -> KeyEntry:
    return KeyEntry(public=key.public, statements=tuple(s.to_text() for s in statements), **kw)  # type: ignore[arg-type]


def prac(*entries: KeyEntry, idnps: str = IDNPS) -> Practitioner:
    return Practitioner(idnps=idnps, family_name="MARTIN", keys=entries)


def binding(
    authority: Identity,
    key: Identity,
    *,
    issued: dt.datetime = T0,
    days: int = 365,
    idnps: str = IDNPS,
) -> Statement:
    return sign_binding(
        authority,
        idnps=idnps,
        key=key.public,
        not_before=issued,
        not_after=issued + days * DAY,
        issued_at=issued,
    )


def test_statement_round_trip_and_forgery(authority: Identity, bob: Identity) -> None:
    st = binding(authority, bob)
    again = Statement.parse(st.to_text())
    assert again == st and again.issuer == authority.public and again.subject == IDNPS
    assert Statement.parse(st.to_bytes()).key == bob.fingerprint
    raw = bytearray(st.to_bytes())
    raw[len(raw) // 3] ^= 1
    with pytest.raises(TrustError):
        Statement.parse(bytes(raw))
    for junk in ("", "mst1!!", "nope", "mst1" + "A" * 50):
        with pytest.raises(TrustError):
            Statement.parse(junk)
    with pytest.raises(ValueError):
        sign_binding(authority, idnps=IDNPS, key=bob.public, not_before=T0, not_after=T0)
    with pytest.raises(ValueError):
        sign_binding(authority, idnps="nonsense", key=bob.public, not_before=T0, not_after=T0 + DAY)


def test_authority_binding_accepted(authority: Identity, bob: Identity) -> None:
    policy = AuthorityPolicy([authority.public])
    decision = policy.check(prac(entry(bob, binding(authority, bob))), bob.public, now=T0 + DAY)
    assert decision.reason == "authority" and decision.authority == authority.fingerprint
    assert policy.trusted_keys(prac(entry(bob, binding(authority, bob))), now=T0 + DAY) == [
        bob.public
    ]


def test_rejections(authority: Identity, rogue: Identity, bob: Identity) -> None:
    policy = AuthorityPolicy([authority.public])
    now = T0 + DAY
    with pytest.raises(UntrustedKey, match="not signed by any directory authority"):
        policy.check(prac(entry(bob)), bob.public, now=now)
    with pytest.raises(UntrustedKey, match="unknown authority"):
        policy.check(prac(entry(bob, binding(rogue, bob))), bob.public, now=now)
    with pytest.raises(UntrustedKey, match="expired"):
        policy.check(
            prac(entry(bob, binding(authority, bob, days=1))), bob.public, now=T0 + 10 * DAY
        )
    with pytest.raises(UntrustedKey, match="not yet valid"):
        policy.check(prac(entry(bob, binding(authority, bob))), bob.public, now=T0 - DAY)
    # a statement about someone else does not vouch for this practitioner
    with pytest.raises(UntrustedKey):
        policy.check(
            prac(entry(bob, binding(authority, bob, idnps="810000000001"))), bob.public, now=now
        )
    # a tampered statement is ignored (and logged)
    text = binding(authority, bob).to_text()
    forged = text[:40] + ("A" if text[40] != "A" else "B") + text[41:]
    with pytest.raises(UntrustedKey):
        policy.check(prac(KeyEntry(public=bob.public, statements=(forged,))), bob.public, now=now)
    # the directory's own validity window for the key
    with pytest.raises(UntrustedKey, match="validity period"):
        policy.check(prac(entry(bob, binding(authority, bob), not_after=T0)), bob.public, now=now)
    # a key the practitioner does not publish at all
    with pytest.raises(UntrustedKey):
        policy.check(prac(entry(bob, binding(authority, bob))), rogue.public, now=now)
    with pytest.raises(UntrustedKey, match="no end-to-end key"):
        policy.trusted_keys(prac(), now=now)
    with pytest.raises(ValueError):
        AuthorityPolicy([])


def test_revocation(authority: Identity, rogue: Identity, bob: Identity, carol: Identity) -> None:
    policy = AuthorityPolicy([authority.public])
    now = T0 + DAY
    by_authority = sign_revocation(
        authority, idnps=IDNPS, key=bob.public, reason="keyCompromise", issued_at=now
    )
    with pytest.raises(RevokedKey):
        policy.check(prac(entry(bob, binding(authority, bob), by_authority)), bob.public, now=now)
    self_revoked = sign_revocation(bob, idnps=IDNPS, key=bob.public, issued_at=now)
    with pytest.raises(RevokedKey):
        policy.check(prac(entry(bob, binding(authority, bob), self_revoked)), bob.public, now=now)
    # a revocation by an unrelated party is ignored (no denial of service by anyone)
    by_rogue = sign_revocation(rogue, idnps=IDNPS, key=bob.public, issued_at=now)
    assert (
        policy.check(
            prac(entry(bob, binding(authority, bob), by_rogue)), bob.public, now=now
        ).reason
        == "authority"
    )
    # learnt out of band
    policy.add_revocation(by_authority)
    p = prac(entry(bob, binding(authority, bob)), entry(carol, binding(authority, carol)))
    with pytest.raises(RevokedKey):
        policy.check(p, bob.public, now=now)
    assert policy.trusted_keys(p, now=now) == [carol.public]
    only_bob = prac(entry(bob, binding(authority, bob)))
    with pytest.raises(RevokedKey):
        policy.trusted_keys(only_bob, now=now)
    with pytest.raises(ValueError):
        policy.add_revocation(binding(authority, bob))


def test_pinning_and_rotation(
    tmp_path: Path, authority: Identity, bob: Identity, carol: Identity
) -> None:
    pins = PinStore(tmp_path / "pins.sqlite")
    policy = AuthorityPolicy([authority.public], pins=pins)
    t1 = T0 + DAY
    first = policy.check(prac(entry(bob, binding(authority, bob))), bob.public, now=t1)
    assert first.newly_pinned
    assert not policy.check(
        prac(entry(bob, binding(authority, bob))), bob.public, now=t1
    ).newly_pinned
    # a different key with an *old* authority statement (issued before the pin): KeyChanged
    old_binding = binding(authority, carol, issued=T0 - DAY)
    with pytest.raises(KeyChanged):
        policy.check(prac(entry(carol, old_binding)), carol.public, now=t1 + DAY)
    # a rotation statement signed by someone else than the old key: KeyChanged
    fake_rotation = sign_rotation(carol, idnps=IDNPS, new_key=carol.public, issued_at=t1)
    with pytest.raises(KeyChanged):
        policy.check(prac(entry(carol, old_binding, fake_rotation)), carol.public, now=t1 + DAY)
    # a rotation signed by the pinned key: accepted, and the pin moves
    rotation = sign_rotation(bob, idnps=IDNPS, new_key=carol.public, issued_at=t1 + DAY)
    d = policy.check(prac(entry(carol, old_binding, rotation)), carol.public, now=t1 + DAY)
    assert d.reason == "rotation" and d.newly_pinned
    reopened = PinStore(tmp_path / "pins.sqlite")  # durable
    assert set(reopened.pinned(IDNPS)) == {carol.fingerprint}


def test_new_authority_statement_after_pin(
    authority: Identity, bob: Identity, carol: Identity
) -> None:
    policy = AuthorityPolicy([authority.public], pins=PinStore())
    policy.check(prac(entry(bob, binding(authority, bob))), bob.public, now=T0 + DAY)
    fresh = binding(authority, carol, issued=T0 + 2 * DAY)
    d = policy.check(prac(entry(carol, fresh)), carol.public, now=T0 + 3 * DAY)
    assert d.reason == "new-authority-statement"
    # both keys are now pinned (several devices)
    assert policy.pins is not None and set(policy.pins.pinned(IDNPS)) == {
        bob.fingerprint,
        carol.fingerprint,
    }


def test_unsafe_policies_warn(
    caplog: pytest.LogCaptureFixture, bob: Identity, carol: Identity
) -> None:
    with caplog.at_level(logging.WARNING, logger="medsecure.trust"):
        tofu = UnsafeTrustOnFirstUse(PinStore())
    assert "Unsafe" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medsecure.trust"):
        assert tofu.check(prac(entry(bob)), bob.public, now=T0).reason == "first-use"
    assert "without authority" in caplog.text
    with pytest.raises(KeyChanged):
        tofu.check(prac(entry(carol)), carol.public, now=T0)
    rotation = sign_rotation(bob, idnps=IDNPS, new_key=carol.public, issued_at=T0)
    assert tofu.check(prac(entry(carol, rotation)), carol.public, now=T0).reason == "rotation"
    with pytest.raises(TypeError):
        UnsafeTrustOnFirstUse(None)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="medsecure.trust"):
        anything = UnsafeAcceptAll()
        assert anything.check(prac(entry(bob)), bob.public, now=T0).reason == "unsafe"
    assert "never use this in production" in caplog.text
    revoked = sign_revocation(bob, idnps=IDNPS, key=bob.public, issued_at=T0)
    with pytest.raises(RevokedKey):
        anything.check(prac(entry(bob, revoked)), bob.public, now=T0)


def test_naive_datetimes_are_refused(authority: Identity, bob: Identity) -> None:
    with pytest.raises(ValueError, match="timezone"):
        AuthorityPolicy([authority.public]).check(
            prac(entry(bob)), bob.public, now=dt.datetime(2026, 1, 1)
        )
