"""Binding keys to practitioners: signed statements, pinning, revocation and trust policies.

The Annuaire Santé publishes who a practitioner is and where to write to them, not which
end-to-end key is theirs. medsecure binds keys with three mechanisms (docs/trust.md):

* **authority statements** — a directory authority (the deployment's or the region's key,
  configured as a trust anchor) signs ``(IDNPS, key fingerprint, validity)``;
* **key continuity** — the first key accepted for a practitioner is pinned locally; a later
  different key raises :class:`~medsecure.KeyChanged` unless a *rotation statement signed by the
  old key* (which must not be revoked) or an authority statement *issued after the pin* explains it;
* **revocation statements** — signed by an authority or by the key itself, they remove a key.

A :class:`Statement` is self-authenticating: parsing one verifies its issuer's signature.
Whether that issuer is trusted is decided by a :class:`TrustPolicy`, a required argument wherever
trust is decided. Every policy, the ``Unsafe`` ones included, accepts only keys the directory
lists for the practitioner. Escape hatches start with ``Unsafe`` and log a warning when used.

The package has three parts: ``_statements`` (pure: encoding, signing, parsing, rules over
statements), ``_pins`` (the pin store, the only I/O) and ``_policies`` (the decisions).
"""

from __future__ import annotations

from ._pins import PinStore
from ._policies import (
    AuthorityPolicy,
    TrustDecision,
    TrustPolicy,
    UnsafeAcceptAll,
    UnsafeTrustOnFirstUse,
)
from ._statements import Statement, sign_binding, sign_revocation, sign_rotation

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
