"""Key discovery and trust: every acceptance and every rejection path."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from clientkit import party

import medsecure as m
from medsecure import Identity, KeyChanged, RevokedKey, TrustError, UntrustedKey
from medsecure.directory import MemoryDirectory
from medsecure.models import Endpoint, KeyEntry, Practitioner
from medsecure.transports import FileTransport
from medsecure.trust import (
    AuthorityPolicy,
    PinStore,
    Statement,
    TrustPolicy,
    UnsafeAcceptAll,
    UnsafeTrustOnFirstUse,
    sign_binding,
    sign_revocation,
    sign_rotation,
)

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


def test_unsafe_acceptance_warns_once_per_key(
    caplog: pytest.LogCaptureFixture, bob: Identity, carol: Identity
) -> None:
    """Sending three documents to one recipient checks the key three times: one warning, not
    three. A different key (or another client's policy) still gets its own."""
    for policy in (UnsafeTrustOnFirstUse(PinStore()), UnsafeAcceptAll()):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="medsecure.trust"):
            for _ in range(3):
                policy.check(prac(entry(bob)), bob.public, now=T0)
            policy.check(prac(entry(carol), idnps="810000000025"), carol.public, now=T0)
            policy.check(prac(entry(carol), idnps="810000000025"), carol.public, now=T0)
        accepting = [r.getMessage() for r in caplog.records if "accepting key" in r.getMessage()]
        assert [bob.fingerprint in a for a in accepting] == [True, False], accepting
        assert carol.fingerprint in accepting[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medsecure.trust"):
        UnsafeAcceptAll().check(prac(entry(bob)), bob.public, now=T0)
    assert bob.fingerprint in caplog.text  # a new policy (client) warns again


def test_naive_datetimes_are_refused(authority: Identity, bob: Identity) -> None:
    with pytest.raises(ValueError, match="timezone"):
        AuthorityPolicy([authority.public]).check(
            prac(entry(bob)), bob.public, now=dt.datetime(2026, 1, 1)
        )


# --------------------------------------------------------------------------------------------
# issue 8: only keys the directory lists; no rotation by a revoked key
# --------------------------------------------------------------------------------------------


def test_tofu_refuses_a_key_the_directory_does_not_list(
    rogue: Identity, bob: Identity, carol: Identity
) -> None:
    """A stranger presenting a fresh key under Bob's name is refused and pins nothing, so the
    real Bob (whose key the directory lists) is still accepted on first use afterwards."""
    pins = PinStore()
    tofu = UnsafeTrustOnFirstUse(pins)
    bob_prac = prac(entry(bob))
    with pytest.raises(UntrustedKey, match="not listed by the directory"):
        tofu.check(bob_prac, rogue.public, now=T0)
    assert pins.pinned(IDNPS) == {}
    decision = tofu.check(bob_prac, bob.public, now=T0)
    assert decision.reason == "first-use" and decision.newly_pinned
    assert set(pins.pinned(IDNPS)) == {bob.fingerprint}
    # a key listed for someone else is not listed for Bob
    with pytest.raises(UntrustedKey, match="not listed"):
        tofu.check(bob_prac, carol.public, now=T0)
    # and a rotation signed by the pinned key does not help a key the directory does not list
    rotation = sign_rotation(bob, idnps=IDNPS, new_key=rogue.public, issued_at=T0)
    with pytest.raises(UntrustedKey, match="not listed"):
        tofu.check(prac(entry(bob, rotation)), rogue.public, now=T0)
    assert set(pins.pinned(IDNPS)) == {bob.fingerprint}


def _policies(authority: Identity) -> list[TrustPolicy]:
    return [
        AuthorityPolicy([authority.public]),
        AuthorityPolicy([authority.public], pins=PinStore()),
        UnsafeTrustOnFirstUse(PinStore()),
        UnsafeAcceptAll(),
    ]


def test_no_policy_accepts_a_key_the_directory_does_not_list(
    authority: Identity, rogue: Identity, bob: Identity
) -> None:
    """ARCHITECTURE.md: "even an unsafe policy never accepts a key the directory does not list".
    Even an authority binding for the key, carried in one of the practitioner's entries, does not
    stand in for the directory listing it."""
    listed_bob = prac(entry(bob, binding(authority, bob), binding(authority, rogue)))
    for policy in _policies(authority):
        with pytest.raises(UntrustedKey, match="not listed by the directory"):
            policy.check(listed_bob, rogue.public, now=T0 + DAY)
        if policy.pins is not None:
            assert policy.pins.pinned(IDNPS) == {}
        assert policy.trusted_keys(listed_bob, now=T0 + DAY) == [bob.public]


def test_check_cannot_be_overridden_by_a_policy() -> None:
    """The shared rules live in a final check(); mypy refuses an override (typing.final)."""
    assert getattr(TrustPolicy.check, "__final__", False)
    assert getattr(TrustPolicy.decisions, "__final__", False)


def test_rotation_signed_by_a_revoked_key_is_ignored(bob: Identity, carol: Identity) -> None:
    """Whoever holds a revoked key (that is why it was revoked) cannot hand trust to a new key
    with a rotation statement, whether the revocation is in the directory or learnt out of
    band, and whatever issue time the rotation claims."""
    tofu = UnsafeTrustOnFirstUse(PinStore())
    tofu.check(prac(entry(bob)), bob.public, now=T0)
    revoked = sign_revocation(bob, idnps=IDNPS, key=bob.public, issued_at=T0 + DAY)
    backdated = sign_rotation(bob, idnps=IDNPS, new_key=carol.public, issued_at=T0)
    with pytest.raises(KeyChanged):
        tofu.check(
            prac(entry(bob, revoked), entry(carol, backdated)), carol.public, now=T0 + 2 * DAY
        )
    out_of_band = UnsafeTrustOnFirstUse(PinStore())
    out_of_band.check(prac(entry(bob)), bob.public, now=T0)
    out_of_band.add_revocation(revoked)
    with pytest.raises(KeyChanged):
        out_of_band.check(prac(entry(carol, backdated)), carol.public, now=T0 + 2 * DAY)
    assert out_of_band.pins is not None
    assert set(out_of_band.pins.pinned(IDNPS)) == {bob.fingerprint}
    # the same rotation while the old key is not revoked still moves the pin
    fresh = UnsafeTrustOnFirstUse(PinStore())
    fresh.check(prac(entry(bob)), bob.public, now=T0)
    assert fresh.check(prac(entry(carol, backdated)), carol.public, now=T0).reason == "rotation"


def test_rotation_by_a_key_the_authority_revoked_is_ignored(
    authority: Identity, bob: Identity, carol: Identity
) -> None:
    policy = AuthorityPolicy([authority.public], pins=PinStore())
    now = T0 + DAY
    policy.check(prac(entry(bob, binding(authority, bob))), bob.public, now=now)
    # carol's key has an authority binding older than the pin: only a rotation could move it
    old_binding = binding(authority, carol, issued=T0 - DAY)
    rotation = sign_rotation(bob, idnps=IDNPS, new_key=carol.public, issued_at=now)
    by_authority = sign_revocation(
        authority, idnps=IDNPS, key=bob.public, reason="keyCompromise", issued_at=now
    )
    with pytest.raises(KeyChanged):
        policy.check(prac(entry(carol, old_binding, rotation, by_authority)), carol.public, now=now)
    # a revocation of the old key by a stranger does not block the rotation
    stranger = sign_revocation(carol, idnps=IDNPS, key=bob.public, issued_at=now)
    d = policy.check(prac(entry(carol, old_binding, rotation, stranger)), carol.public, now=now)
    assert d.reason == "rotation"


def test_client_under_tofu_quarantines_an_impostor_and_still_reaches_the_real_sender(
    tmp_path: Path,
) -> None:
    """The receive path (client.py passes the envelope's key to ``trust.check``): a stranger
    signing as Bob with a key of his own is quarantined and pins nothing; Bob's genuine message,
    sent afterwards, is received and Bob's key pinned."""
    alice = party(tmp_path, "alice", "810000005479")
    bob = party(tmp_path, "bob", "810000000017")
    directory = MemoryDirectory(
        [
            Practitioner(
                idnps=p.idnps,
                family_name=p.name.upper(),
                keys=(KeyEntry(public=p.identity.public),),
                endpoints=(Endpoint(kind="drop", path=str(p.box)),),
            )
            for p in (alice, bob)
        ]
    )
    mallory = m.Client(
        Identity.generate(),
        directory,
        FileTransport(bob.box),
        tmp_path / "home-mallory",
        trust=UnsafeAcceptAll(),
        me=bob.idnps,
    )
    with mallory:
        mallory.send(m.Document(content=b"fake results"), to=alice.ref)
    pins = PinStore(tmp_path / "pins-alice.sqlite")
    with m.Client(
        alice.identity,
        directory,
        FileTransport(alice.box),
        alice.home,
        trust=UnsafeTrustOnFirstUse(pins),
        me=alice.idnps,
    ) as ca:
        assert ca.receive() == []
        (q,) = ca.quarantine()
        assert "not listed by the directory" in q.reason
        assert pins.pinned(bob.idnps) == {}
        with m.Client(
            bob.identity,
            directory,
            FileTransport(bob.box),
            bob.home,
            trust=UnsafeAcceptAll(),
            me=bob.idnps,
        ) as cb:
            cb.send(m.Document(content=b"real results"), to=alice.ref)
        (msg,) = ca.receive()
        assert msg.sender_key == bob.identity.public
        assert msg.documents[0].read() == b"real results"
        assert set(pins.pinned(bob.idnps)) == {bob.identity.fingerprint}
