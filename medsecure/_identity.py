"""Identities: a practitioner's (or a software's) key pairs, their public half and key files.

Theory of operation
-------------------
An :class:`Identity` holds two kinds of key pairs, all generated and used through ``cryptography``:

* a KEM pair to receive envelopes: MLKEM768-X25519 (hybrid post-quantum, the default ``"hybrid"``
  suite) or X25519 alone (``"classic"``, for constrained peers);
* a signing pair to sign envelopes: Ed25519 + ML-DSA-65, both required to verify (``"hybrid"``),
  or Ed25519 alone (``"classic"``).

Its :class:`PublicIdentity` has one canonical byte encoding (canonical CBOR, docs/format.md §6).
The fingerprint is a SHA-256 of that encoding, so two people comparing fingerprints compare every
public key at once. Public identities read from outside are validated on import: exact field set,
exact lengths, canonical encoding, X25519 points that are not of low order, Ed25519 keys that are
canonically encoded and not of small order, ML-KEM keys that pass the FIPS 203 modulus check
(``cryptography`` performs it on import; a test pins that).

This module does no I/O. Key files (docs/format.md §7) are read and written by
:mod:`medsecure._keyfile`; :meth:`Identity.save` and :meth:`Identity.load` delegate to it.
"""

from __future__ import annotations

import base64
import functools
import hmac
import os
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa, mlkem, x25519

from ._errors import IdentityError
from .envelope import _cbor
from .envelope import _labels as F

__all__ = ["Identity", "PublicIdentity"]

# A fixed, valid scalar used only to detect low-order X25519 points: for such a point every
# scalar gives the all-zero shared secret, which ``cryptography`` refuses with ValueError.
_LOW_ORDER_PROBE = x25519.X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))

# Ed25519 public keys a verifier must refuse, checked on the encoding's bytes (no curve
# arithmetic: ``cryptography`` exposes none, and none is needed).
#
# * Non-canonical encodings (RFC 8032 §5.1.3, decoding step 1: "If the resulting value is >= p,
#   decoding fails"): the 255-bit y coordinate must be below p = 2^255 - 19. OpenSSL reduces
#   such a y modulo p instead, so 2^255 - 18 is accepted as another spelling of the identity.
# * The 8 points of small order (the torsion subgroup of edwards25519), listed as canonical
#   encodings in Chalkias, Garillot and Nikolaenko, "Taming the many EdDSAs" (SSR 2020,
#   IACR ePrint 2020/1244), and in libsodium's blocklist. With such a key A, [k]A is often the
#   identity, and then the verification equation [S]B = R + [k]A holds for R = [S]B, which anyone
#   can compute: a forgery for any message succeeds with probability 1 (A the identity) down to
#   1/8 (order 8) per attempt. Anyone can "sign" as that key. The check compares y only (the
#   sign bit is masked) because the two points sharing a y coordinate have the same order; that
#   also catches the encodings of x = 0 with the sign bit set, which RFC 8032 §5.1.3 step 4
#   refuses ("If x = 0, and x_0 = 1, decoding fails").
_ED25519_P = 2**255 - 19
_Y_MASK = (1 << 255) - 1
_ED25519_SMALL_ORDER = (
    "0100000000000000000000000000000000000000000000000000000000000000",  # order 1 (identity)
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
    "0000000000000000000000000000000000000000000000000000000000000080",  # order 4
    "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",  # order 8
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",  # order 8
)
_ED25519_SMALL_ORDER_Y = frozenset(
    int.from_bytes(bytes.fromhex(h), "little") & _Y_MASK for h in _ED25519_SMALL_ORDER
)


def _ed25519_refusal(raw: bytes) -> str | None:
    """Why the 32-byte Ed25519 public key ``raw`` is refused, or None if it is acceptable."""
    y = int.from_bytes(raw, "little") & _Y_MASK
    if y >= _ED25519_P:
        return "non-canonical Ed25519 key"
    if y in _ED25519_SMALL_ORDER_Y:
        return "Ed25519 key of small order"
    return None


_HPKE_SUITES = {
    F.SUITE_HYBRID: hpke.Suite(
        hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM
    ),
    F.SUITE_CLASSIC: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
}


def _check_suite(suite: object) -> str:
    if not isinstance(suite, str):
        raise TypeError("suite must be a str")
    if suite not in F.SUITES:
        raise ValueError(f"unknown suite {suite!r}: expected 'hybrid' or 'classic'")
    return suite


def _sha256(*parts: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    for part in parts:
        h.update(part)
    return h.finalize()


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _unb32(text: str) -> bytes:
    padded = text.upper() + "=" * (-len(text) % 8)
    return base64.b32decode(padded, casefold=False)


@functools.lru_cache(maxsize=1024)
def _fingerprint_text(digest: bytes) -> str:
    # cached: opening an envelope names every recipient, and the same ones come back
    return F.FINGERPRINT_TEXT_PREFIX + _b32(digest)


class PublicIdentity:
    """The public half of an :class:`Identity`: what others need to seal to you and verify you.

    Values are immutable and compare equal when their canonical encodings are equal.
    """

    __slots__ = (
        "_ed25519",
        "_encoded",
        "_fp",
        "_fp_text",
        "_hpke",
        "_mldsa",
        "_mlkem",
        "_suite",
        "_x25519",
    )
    _suite: str
    _x25519: x25519.X25519PublicKey
    _ed25519: ed25519.Ed25519PublicKey
    _mlkem: mlkem.MLKEM768PublicKey | None
    _mldsa: mldsa.MLDSA65PublicKey | None
    _encoded: bytes
    _fp: bytes
    _fp_text: str
    _hpke: Any  # the HPKE recipient key, built once (sealing uses it for every envelope)

    def __init__(self) -> None:  # pragma: no cover - construction goes through the factories
        raise TypeError("use Identity.public, PublicIdentity.from_bytes or from_text")

    @classmethod
    def _build(
        cls,
        suite: str,
        x25519_pub: x25519.X25519PublicKey,
        ed25519_pub: ed25519.Ed25519PublicKey,
        mlkem_pub: mlkem.MLKEM768PublicKey | None,
        mldsa_pub: mldsa.MLDSA65PublicKey | None,
    ) -> PublicIdentity:
        self = object.__new__(cls)
        self._suite = suite
        self._x25519 = x25519_pub
        self._ed25519 = ed25519_pub
        self._mlkem = mlkem_pub
        self._mldsa = mldsa_pub
        self._hpke = (
            hpke.MLKEM768X25519PublicKey(mlkem_pub, x25519_pub)
            if mlkem_pub is not None
            else x25519_pub
        )
        fields: dict[int, Any] = {
            1: F.FORMAT_VERSION,
            2: suite,
            3: x25519_pub.public_bytes_raw(),
            4: ed25519_pub.public_bytes_raw(),
        }
        if suite == F.SUITE_HYBRID:
            assert mlkem_pub is not None and mldsa_pub is not None
            fields[5] = mlkem_pub.public_bytes_raw()
            fields[6] = mldsa_pub.public_bytes_raw()
        self._encoded = _cbor.encode(fields)
        self._fp = _sha256(F.LABEL_FINGERPRINT, self._encoded)
        self._fp_text = _fingerprint_text(self._fp)
        return self

    # -- properties -------------------------------------------------------------------------
    @property
    def suite(self) -> str:
        """``"hybrid"`` (post-quantum hybrid) or ``"classic"``."""
        return self._suite

    @property
    def fingerprint(self) -> str:
        """A stable text fingerprint (``ms1…``) of every public key, for people to compare."""
        return self._fp_text

    @property
    def fingerprint_bytes(self) -> bytes:
        """The 32-byte SHA-256 fingerprint (docs/format.md §6)."""
        return self._fp

    # -- encodings --------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The canonical binary encoding (canonical CBOR)."""
        return self._encoded

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicIdentity:
        """Parse and validate a canonical encoding; raise :class:`IdentityError` if invalid."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("data must be bytes")
        data = bytes(data)
        if len(data) > 8192:
            raise IdentityError("malformed public identity: too long")
        fields = _cbor.decode(data, error=IdentityError, what="public identity")
        if not isinstance(fields, dict):
            raise IdentityError("malformed public identity: not a map")
        suite = fields.get(2)
        if fields.get(1) != F.FORMAT_VERSION or suite not in F.SUITES:
            raise IdentityError("unsupported public identity version or suite")
        expected = {1, 2, 3, 4} | ({5, 6} if suite == F.SUITE_HYBRID else set())
        if set(fields) != expected:
            raise IdentityError("malformed public identity: unexpected fields")
        lengths = {
            3: F.X25519_PUBLIC_BYTES,
            4: F.ED25519_PUBLIC_BYTES,
            5: F.MLKEM768_PUBLIC_BYTES,
            6: F.MLDSA65_PUBLIC_BYTES,
        }
        for key in expected - {1, 2}:
            value = fields[key]
            if not isinstance(value, bytes) or len(value) != lengths[key]:
                raise IdentityError("malformed public identity: wrong key length")
        try:
            x_pub = x25519.X25519PublicKey.from_public_bytes(fields[3])
            _LOW_ORDER_PROBE.exchange(x_pub)
        except ValueError as exc:
            raise IdentityError("invalid public identity: X25519 key is a low-order point") from exc
        refusal = _ed25519_refusal(fields[4])
        if refusal is not None:
            raise IdentityError(f"invalid public identity: {refusal}")
        try:
            ed_pub = ed25519.Ed25519PublicKey.from_public_bytes(fields[4])
        except ValueError as exc:
            raise IdentityError("invalid public identity: bad Ed25519 key") from exc
        kem_pub = dsa_pub = None
        if suite == F.SUITE_HYBRID:
            try:
                kem_pub = mlkem.MLKEM768PublicKey.from_public_bytes(fields[5])
            except ValueError as exc:
                # FIPS 203 §7.2 modulus check: cryptography rejects coefficients >= q on import.
                raise IdentityError("invalid public identity: bad ML-KEM-768 key") from exc
            try:
                dsa_pub = mldsa.MLDSA65PublicKey.from_public_bytes(fields[6])
            except ValueError as exc:
                raise IdentityError("invalid public identity: bad ML-DSA-65 key") from exc
        pub = cls._build(suite, x_pub, ed_pub, kem_pub, dsa_pub)
        if pub._encoded != data:  # pragma: no cover - canonical decode guarantees equality
            raise IdentityError("malformed public identity: not canonical")
        return pub

    @classmethod
    def _from_bytes_cached(cls, data: bytes) -> PublicIdentity:
        """``from_bytes`` through a small cache: the same senders come back again and again."""
        return _parse_cached(bytes(data))

    def __str__(self) -> str:
        """The compact copy-pasteable text form: ``msp1`` + base32(encoding ‖ 4-byte check)."""
        check = _sha256(self._encoded)[:4]
        return F.PUBLIC_TEXT_PREFIX + _b32(self._encoded + check)

    @classmethod
    def from_key_file(cls, path: str | os.PathLike[str]) -> PublicIdentity:
        """The public identity a key file carries in clear (format 2), read without its
        passphrase. A hint until the key is unlocked (``Identity.load`` checks it against the
        secret key); raises :class:`IdentityError` for a version 1 file, which does not hold
        it."""
        from ._keyfile import read_public  # key-file I/O lives outside the core

        return read_public(path)

    @classmethod
    def from_text(cls, text: str) -> PublicIdentity:
        """Parse the text form produced by ``str(pub)`` (surrounding whitespace is ignored)."""
        if not isinstance(text, str):
            raise TypeError("text must be a str")
        text = "".join(text.split())
        if not text.startswith(F.PUBLIC_TEXT_PREFIX):
            raise IdentityError(
                f"not a medsecure public key: it must start with {F.PUBLIC_TEXT_PREFIX!r}"
            )
        if len(text) > 16384:
            raise IdentityError("malformed public key text: too long")
        try:
            raw = _unb32(text[len(F.PUBLIC_TEXT_PREFIX) :])
        except ValueError as exc:
            raise IdentityError("malformed public key text: not base32") from exc
        if len(raw) < 5 or not hmac.compare_digest(_sha256(raw[:-4])[:4], raw[-4:]):
            raise IdentityError("malformed public key text: checksum mismatch (copy error?)")
        return cls.from_bytes(raw[:-4])

    # -- value semantics --------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PublicIdentity):
            return NotImplemented
        return hmac.compare_digest(self._fp, other._fp)

    def __hash__(self) -> int:
        return hash(self._fp)

    def __repr__(self) -> str:
        return f"<PublicIdentity {self._suite} {self.fingerprint}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (PublicIdentity.from_bytes, (self._encoded,))

    # -- used by the envelope ---------------------------------------------------------------
    def _hpke_key(self) -> Any:
        return self._hpke

    def _signature_lengths(self) -> tuple[int, ...]:
        if self._suite == F.SUITE_HYBRID:
            return (F.ED25519_SIGNATURE_BYTES, F.MLDSA65_SIGNATURE_BYTES)
        return (F.ED25519_SIGNATURE_BYTES,)

    def _verify(self, message: bytes, signatures: list[bytes]) -> bool:
        """True only if *every* signature of this identity's suite verifies over ``message``."""
        lengths = self._signature_lengths()
        if len(signatures) != len(lengths):
            return False
        if any(len(s) != n for s, n in zip(signatures, lengths, strict=True)):
            return False
        try:
            self._ed25519.verify(signatures[0], message)
            if self._suite == F.SUITE_HYBRID:
                assert self._mldsa is not None
                self._mldsa.verify(signatures[1], message, F.LABEL_SIGNATURE)
        except InvalidSignature:
            return False
        return True


class Identity:
    """A private identity: KEM and signing key pairs. Never printed, never logged."""

    __slots__ = ("_ed25519", "_hpke", "_mldsa", "_mlkem", "_public", "_suite", "_x25519")
    _suite: str
    _x25519: x25519.X25519PrivateKey
    _ed25519: ed25519.Ed25519PrivateKey
    _mlkem: mlkem.MLKEM768PrivateKey | None
    _mldsa: mldsa.MLDSA65PrivateKey | None
    _hpke: Any  # the HPKE private key, built once (opening uses it for every envelope)
    _public: PublicIdentity

    def __init__(self) -> None:  # pragma: no cover - construction goes through the factories
        raise TypeError("use Identity.generate() or Identity.load()")

    @classmethod
    def generate(cls, suite: str = F.SUITE_HYBRID) -> Identity:
        """Create a new identity. ``suite`` is ``"hybrid"`` (default) or ``"classic"``."""
        suite = _check_suite(suite)
        hybrid = suite == F.SUITE_HYBRID
        return cls._from_seeds(
            suite,
            x25519_seed=os.urandom(32),
            ed25519_seed=os.urandom(32),
            mlkem_seed=os.urandom(64) if hybrid else None,
            mldsa_seed=os.urandom(32) if hybrid else None,
        )

    @classmethod
    def _from_seeds(
        cls,
        suite: str,
        *,
        x25519_seed: bytes,
        ed25519_seed: bytes,
        mlkem_seed: bytes | None = None,
        mldsa_seed: bytes | None = None,
    ) -> Identity:
        """Rebuild an identity from its seeds (key files; deterministic test vectors)."""
        self = object.__new__(cls)
        self._suite = suite
        self._x25519 = x25519.X25519PrivateKey.from_private_bytes(x25519_seed)
        self._ed25519 = ed25519.Ed25519PrivateKey.from_private_bytes(ed25519_seed)
        self._mlkem = None
        self._mldsa = None
        if suite == F.SUITE_HYBRID:
            if mlkem_seed is None or mldsa_seed is None:
                raise ValueError("a hybrid identity needs ML-KEM and ML-DSA seeds")
            self._mlkem = mlkem.MLKEM768PrivateKey.from_seed_bytes(mlkem_seed)
            self._mldsa = mldsa.MLDSA65PrivateKey.from_seed_bytes(mldsa_seed)
        self._hpke = (
            hpke.MLKEM768X25519PrivateKey(self._mlkem, self._x25519)
            if self._mlkem is not None
            else self._x25519
        )
        self._public = PublicIdentity._build(
            suite,
            self._x25519.public_key(),
            self._ed25519.public_key(),
            self._mlkem.public_key() if self._mlkem is not None else None,
            self._mldsa.public_key() if self._mldsa is not None else None,
        )
        return self

    @property
    def public(self) -> PublicIdentity:
        """The :class:`PublicIdentity` to publish."""
        return self._public

    @property
    def suite(self) -> str:
        """``"hybrid"`` or ``"classic"``."""
        return self._suite

    @property
    def fingerprint(self) -> str:
        """Shortcut for ``identity.public.fingerprint``."""
        return self._public.fingerprint

    def __repr__(self) -> str:
        return f"<Identity {self._suite} {self._public.fingerprint}>"

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("an Identity is not picklable; save it with identity.save()")

    # -- used by the envelope ---------------------------------------------------------------
    def _hpke_key(self) -> Any:
        return self._hpke

    def _sign(self, message: bytes) -> list[bytes]:
        signatures = [self._ed25519.sign(message)]
        if self._mldsa is not None:
            signatures.append(self._mldsa.sign(message, F.LABEL_SIGNATURE))
        return signatures

    def _seeds(self) -> dict[int, Any]:
        fields: dict[int, Any] = {
            1: F.FORMAT_VERSION,
            2: self._suite,
            3: self._x25519.private_bytes_raw(),
            4: self._ed25519.private_bytes_raw(),
        }
        if self._mlkem is not None and self._mldsa is not None:
            fields[5] = self._mlkem.private_bytes_raw()
            fields[6] = self._mldsa.private_bytes_raw()
        return fields

    # -- key files (docs/format.md §7; the file format and its I/O are in _keyfile) ------
    def save(
        self,
        path: str | os.PathLike[str],
        *,
        passphrase: str | bytes,
        kdf_iterations: int = F.KDF_DEFAULT_ITERATIONS,
        kdf_memory_kib: int = F.KDF_DEFAULT_MEMORY_KIB,
        kdf_lanes: int = F.KDF_DEFAULT_LANES,
    ) -> None:
        """Write this identity to ``path``, encrypted under ``passphrase`` (mode 0600, atomic).

        The KDF is Argon2id; the defaults follow RFC 9106 §4. Parameters outside the bounds
        that :meth:`load` accepts are refused here too. The file also holds the public identity
        in clear (authenticated), so that ``medsecure._keyfile.read_public`` can read it without
        the passphrase.
        """
        from . import _keyfile  # the core imports no I/O module at import time

        kdf = _keyfile.KdfParams(kdf_iterations, kdf_memory_kib, kdf_lanes)
        _keyfile.write(self, path, passphrase=passphrase, kdf=kdf)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, passphrase: str | bytes) -> Identity:
        """Read and decrypt a key file written by :meth:`save` (either format version).

        Raises :class:`IdentityError` for a missing, unreadable, truncated, damaged or foreign
        file, for an empty or wrong passphrase, and for a file whose clear public key is not the
        one its secret key gives.
        """
        from . import _keyfile

        return _keyfile.read(path, passphrase=passphrase)

    @classmethod
    def _from_seed_map(cls, seeds: Any) -> Identity:
        """Rebuild an identity from the secret map of a key file (the inverse of ``_seeds``)."""
        if not isinstance(seeds, dict) or seeds.get(1) != F.FORMAT_VERSION:
            raise IdentityError("unsupported secret key version")
        suite = seeds.get(2)
        want = {1, 2, 3, 4} | ({5, 6} if suite == F.SUITE_HYBRID else set())
        if suite not in F.SUITES or set(seeds) != want:
            raise IdentityError("bad secret key contents")
        sizes = {3: 32, 4: 32, 5: 64, 6: 32}
        if any(not isinstance(seeds[k], bytes) or len(seeds[k]) != sizes[k] for k in want - {1, 2}):
            raise IdentityError("bad secret key sizes")
        return cls._from_seeds(
            suite,
            x25519_seed=seeds[3],
            ed25519_seed=seeds[4],
            mlkem_seed=seeds.get(5),
            mldsa_seed=seeds.get(6),
        )


@functools.lru_cache(maxsize=512)
def _parse_cached(data: bytes) -> PublicIdentity:
    return PublicIdentity.from_bytes(data)


def hpke_suite(suite: str) -> Any:
    """The HPKE suite object for a medsecure suite name (internal)."""
    return _HPKE_SUITES[suite]
