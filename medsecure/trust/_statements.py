"""Signed statements about practitioners' keys: encoding, signing, parsing, and the pure rules
that read them (docs/trust.md, docs/format.md §8).

Nothing here touches a file, a database, a logger or the network: a :class:`Statement` is a value
that parsing has authenticated, and the rules below are functions of statements and fingerprints.
The only clock read is the ``issued_at`` default of the ``sign_*`` helpers, for callers that do not
give one.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .._errors import IdentityError, TrustError
from .._identity import Identity, PublicIdentity, _fingerprint_text, _unb32
from ..envelope import _cbor
from ..envelope import _labels as F
from ..identifiers import parse

__all__ = [
    "BINDING",
    "REVOCATION",
    "ROTATION",
    "Statement",
    "find_revocation",
    "is_self_signed_rotation",
    "sign_binding",
    "sign_revocation",
    "sign_rotation",
]

LABEL_STATEMENT = F.LABEL_STATEMENT
STATEMENT_TEXT_PREFIX = F.STATEMENT_TEXT_PREFIX
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
        """The signed binary form (canonical CBOR), as :meth:`parse` reads it."""
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
        raw = _unb32(key[len(F.FINGERPRINT_TEXT_PREFIX) :])
        if len(raw) == F.FINGERPRINT_BYTES:
            return raw
    raise ValueError("expected a PublicIdentity or an ms1… fingerprint")


def _sign_about(
    issuer: Identity,
    kind: str,
    idnps: str,
    key: PublicIdentity | str,
    issued_at: dt.datetime | None,
    extra: dict[int, Any],
) -> Statement:
    """Sign a statement of ``kind`` about ``key`` for the practitioner ``idnps``: the fields
    every statement has (docs/trust.md: version, type, IDNPS, key, issue time), then ``extra``."""
    fields = {1: 1, 2: kind, 3: parse(idnps).idnps, 4: _fp_bytes(key), 5: _ts(issued_at or _now())}
    return _sign(issuer, {**fields, **extra})


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
    return _sign_about(
        authority, BINDING, idnps, key, issued_at, {6: _ts(not_before), 7: _ts(not_after)}
    )


def sign_rotation(
    old: Identity, *, idnps: str, new_key: PublicIdentity, issued_at: dt.datetime | None = None
) -> Statement:
    """The old key hands over to ``new_key`` (signed by the old key itself)."""
    return _sign_about(old, ROTATION, idnps, old.public, issued_at, {8: _fp_bytes(new_key)})


def sign_revocation(
    issuer: Identity,
    *,
    idnps: str,
    key: PublicIdentity | str,
    reason: str = "unspecified",
    issued_at: dt.datetime | None = None,
) -> Statement:
    """Revoke ``key`` for ``idnps``; signed by an authority or by the key itself."""
    return _sign_about(issuer, REVOCATION, idnps, key, issued_at, {9: reason})


# --------------------------------------------------------------------------------------------
# pure rules over authenticated statements
# --------------------------------------------------------------------------------------------


def find_revocation(
    statements: Iterable[Statement], *, idnps: str, key: str, revokers: frozenset[str]
) -> Statement | None:
    """The first revocation of the key fingerprinted ``key`` for ``idnps`` issued by one of
    ``revokers`` (fingerprints), or None.

    Who may revoke is the caller's rule (the key itself and the trusted authorities): a
    revocation by anyone else is ignored, otherwise anyone could cut anyone off.
    """
    for st in statements:
        if (
            st.type == REVOCATION
            and st.subject == idnps
            and st.key == key
            and st.issuer.fingerprint in revokers
        ):
            return st
    return None


def is_self_signed_rotation(st: Statement, *, idnps: str, new_key: str) -> bool:
    """Whether ``st`` is a rotation for ``idnps`` to ``new_key`` signed by the old key itself."""
    return (
        st.type == ROTATION
        and st.subject == idnps
        and st.new_key == new_key
        and st.issuer.fingerprint == st.key
    )
