"""Key bundles: what an identity publishes on a relay so that others find its keys.

A bundle is self-signed: the identity's public keys, the national identifiers it claims (IDNPS)
and, optionally, statements (docs/trust.md) that authorities signed about it, all signed by the
identity itself with the label ``medsecure/v1/relay-bundle``. Self-signed only proves that the
holder of the keys published it: a relay is never a trust anchor, and a bundle found on a relay is
as untrusted as a directory entry — the reader's trust policy decides, from the statements.

Encoding (canonical CBOR): ``{1: body, 2: [signatures]}`` with
``body = {1: 1, 2: public identity, 3: [IDNPS…], 4: [statement…], 5: published (Unix s)}``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Final

from .._errors import IdentityError
from .._identity import Identity, PublicIdentity
from ..envelope import _cbor
from ..envelope._labels import LABEL_RELAY_BUNDLE as LABEL_BUNDLE
from ..identifiers import parse

__all__ = ["LABEL_BUNDLE", "MAX_BUNDLE_BYTES", "KeyBundle", "sign_bundle"]

MAX_BUNDLE_BYTES: Final = 64 * 1024
_MAX_IDENTIFIERS: Final = 16
_MAX_STATEMENTS: Final = 8
_MAX_STATEMENT: Final = 16384


@dataclass(frozen=True)
class KeyBundle:
    """A parsed, self-signature-verified key bundle (see the module docstring)."""

    public: PublicIdentity
    identifiers: tuple[str, ...]
    statements: tuple[bytes, ...]
    published: dt.datetime
    raw: bytes = field(repr=False)

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint

    @classmethod
    def parse(cls, data: bytes) -> KeyBundle:
        """Parse a bundle and verify its self-signature; :class:`IdentityError` otherwise."""
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("a key bundle is bytes")
        data = bytes(data)
        if len(data) > MAX_BUNDLE_BYTES:
            raise IdentityError("malformed key bundle: too long")
        outer = _cbor.decode(data, error=IdentityError, what="key bundle")
        if not isinstance(outer, dict) or set(outer) != {1, 2}:
            raise IdentityError("malformed key bundle")
        body, sigs = outer[1], outer[2]
        if not isinstance(body, bytes) or not isinstance(sigs, list):
            raise IdentityError("malformed key bundle")
        fields = _cbor.decode(body, error=IdentityError, what="key bundle body")
        if not isinstance(fields, dict) or set(fields) != {1, 2, 3, 4, 5} or fields[1] != 1:
            raise IdentityError("malformed key bundle body")
        if not isinstance(fields[2], bytes):
            raise IdentityError("malformed key bundle body")
        public = PublicIdentity._from_bytes_cached(fields[2])
        if not all(isinstance(s, bytes) for s in sigs) or not public._verify(
            LABEL_BUNDLE + body, sigs
        ):
            raise IdentityError("key bundle signature verification failed")
        idents, statements, published = fields[3], fields[4], fields[5]
        if (
            not isinstance(idents, list)
            or len(idents) > _MAX_IDENTIFIERS
            or not all(isinstance(i, str) and len(i) <= 64 for i in idents)
        ):
            raise IdentityError("malformed key bundle: bad identifiers")
        if (
            not isinstance(statements, list)
            or len(statements) > _MAX_STATEMENTS
            or not all(isinstance(s, bytes) and len(s) <= _MAX_STATEMENT for s in statements)
        ):
            raise IdentityError("malformed key bundle: bad statements")
        if not isinstance(published, int) or isinstance(published, bool) or published < 0:
            raise IdentityError("malformed key bundle: bad time")
        try:
            normal = tuple(_idnps(i) for i in idents)
        except ValueError as exc:
            raise IdentityError("malformed key bundle: bad identifiers") from exc
        if normal != tuple(idents):
            raise IdentityError("malformed key bundle: identifiers not in normal form")
        return cls(
            public=public,
            identifiers=normal,
            statements=tuple(statements),
            published=dt.datetime.fromtimestamp(min(published, 1 << 40), dt.UTC),
            raw=data,
        )


def _idnps(ref: str) -> str:
    return parse(ref).idnps


def sign_bundle(
    identity: Identity,
    *,
    identifiers: tuple[str, ...] | list[str] = (),
    statements: tuple[Any, ...] | list[Any] = (),
    published: dt.datetime | None = None,
) -> KeyBundle:
    """Build and self-sign the key bundle of ``identity``.

    ``identifiers`` are the professional identifiers it claims (``rpps:…``, ``idnps:…``),
    ``statements`` the :class:`~medsecure.trust.Statement` values (or their bytes) vouching for
    it.
    """
    if not isinstance(identity, Identity):
        raise TypeError("identity must be an Identity")
    idents = [_idnps(i) for i in identifiers]
    raw_statements = [s if isinstance(s, bytes) else s.to_bytes() for s in statements]
    if len(idents) > _MAX_IDENTIFIERS or len(raw_statements) > _MAX_STATEMENTS:
        raise ValueError("too many identifiers or statements in a key bundle")
    when = published or dt.datetime.now(dt.UTC)
    body = _cbor.encode(
        {
            1: 1,
            2: identity.public.to_bytes(),
            3: idents,
            4: raw_statements,
            5: int(when.timestamp()),
        }
    )
    raw = _cbor.encode({1: body, 2: identity._sign(LABEL_BUNDLE + body)})
    return KeyBundle.parse(raw)
