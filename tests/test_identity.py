from __future__ import annotations

import json
import os
import stat
import struct
import time
from pathlib import Path

import pytest
from conftest import FAST_KDF
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import medsecure
from medsecure import EnvelopeError, Identity, IdentityError, PublicIdentity, _keyfile
from medsecure.envelope import _cbor
from medsecure.envelope import _labels as F

# Low-order X25519 u-coordinates (canonical and non-canonical encodings), as listed by
# libsodium and Bernstein's "Curve25519: new Diffie-Hellman speed records" follow-ups.
LOW_ORDER = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]


def _fields(pub: PublicIdentity) -> dict[int, object]:
    return dict(_cbor.decode(pub.to_bytes(), error=ValueError, what="pub"))


def test_generate_suites() -> None:
    hybrid = Identity.generate()
    assert hybrid.suite == "hybrid" == hybrid.public.suite
    assert Identity.generate(suite="hybrid").suite == "hybrid"
    classic = Identity.generate(suite="classic")
    assert classic.suite == "classic"
    assert len(classic.public.to_bytes()) < 100 < len(hybrid.public.to_bytes())
    with pytest.raises(ValueError, match="unknown suite"):
        Identity.generate(suite="rsa")
    with pytest.raises(TypeError):
        Identity.generate(suite=1)  # type: ignore[arg-type]


def test_public_identity_round_trips(alice: Identity, dave_classic: Identity) -> None:
    for ident in (alice, dave_classic):
        pub = ident.public
        again = PublicIdentity.from_bytes(pub.to_bytes())
        assert again == pub and hash(again) == hash(pub)
        text = str(pub)
        assert text.startswith("msp1") and text.isalnum()
        assert PublicIdentity.from_text(text) == pub
        assert PublicIdentity.from_text("  " + text[:50] + "\n" + text[50:] + "\n") == pub
        assert pub.fingerprint == again.fingerprint
        assert pub.fingerprint.startswith("ms1") and len(pub.fingerprint) == 3 + 52
        assert pub.fingerprint in repr(pub)


def test_fingerprint_is_stable_hash_of_encoding(alice: Identity) -> None:
    from cryptography.hazmat.primitives import hashes

    h = hashes.Hash(hashes.SHA256())
    h.update(F.LABEL_FINGERPRINT + alice.public.to_bytes())
    assert alice.public.fingerprint_bytes == h.finalize()
    assert alice.public != Identity.generate().public


def test_repr_does_not_leak_secrets(alice: Identity) -> None:
    assert "Identity" in repr(alice)
    seeds = alice._seeds()
    for value in seeds.values():
        if isinstance(value, bytes):
            assert value.hex() not in repr(alice)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(alice)


def test_text_form_errors(alice: Identity) -> None:
    text = str(alice.public)
    with pytest.raises(IdentityError, match="must start with"):
        PublicIdentity.from_text("age1xyz")
    with pytest.raises(IdentityError, match="checksum"):
        flipped = text[:-3] + ("a" if text[-3] != "a" else "b") + text[-2:]
        PublicIdentity.from_text(flipped)
    with pytest.raises(IdentityError):
        PublicIdentity.from_text("msp1!!!!")
    with pytest.raises(IdentityError):
        PublicIdentity.from_text(text[:100])


@pytest.mark.parametrize("point", LOW_ORDER)
def test_low_order_x25519_rejected(dave_classic: Identity, point: str) -> None:
    fields = _fields(dave_classic.public)
    fields[3] = bytes.fromhex(point)
    with pytest.raises(IdentityError, match="low-order"):
        PublicIdentity.from_bytes(_cbor.encode(fields))


def test_mlkem_modulus_check(alice: Identity) -> None:
    fields = _fields(alice.public)
    bad = bytearray(fields[5])  # type: ignore[arg-type]
    bad[0] = 0xFF
    bad[1] |= 0x0F  # first 12-bit coefficient = 4095 >= q = 3329
    fields[5] = bytes(bad)
    with pytest.raises(IdentityError, match="ML-KEM"):
        PublicIdentity.from_bytes(_cbor.encode(fields))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: f.update({3: f[3][:-1]}),
        lambda f: f.update({4: f[4] + b"\0"}),
        lambda f: f.update({6: f[6][:100]}),
        lambda f: f.update({9: 1}),
        lambda f: f.pop(6),
        lambda f: f.update({1: 2}),
        lambda f: f.update({2: "classic"}),
        lambda f: f.update({2: "quantum"}),
        lambda f: f.update({3: "text"}),
    ],
)
def test_malformed_public_identity(alice: Identity, mutate: object) -> None:
    fields = _fields(alice.public)
    mutate(fields)  # type: ignore[operator]
    with pytest.raises(IdentityError):
        PublicIdentity.from_bytes(_cbor.encode(fields))


def test_non_canonical_public_identity(alice: Identity) -> None:
    raw = alice.public.to_bytes()
    with pytest.raises(IdentityError):
        PublicIdentity.from_bytes(raw + b"\x00")
    # Version encoded non-minimally: 0x18 0x01 instead of 0x01.
    idx = raw.index(b"\x01\x01")
    with pytest.raises(IdentityError, match="canonical"):
        PublicIdentity.from_bytes(raw[:idx] + b"\x01\x18\x01" + raw[idx + 2 :])
    for junk in (b"", b"\xff", b"\xa0", b"\x9f\xff", os.urandom(64)):
        with pytest.raises(IdentityError):
            PublicIdentity.from_bytes(junk)


def test_save_and_load(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "alice.key"
    alice.save(path, passphrase="correct horse")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Identity.load(path, passphrase="correct horse")
    assert loaded.public == alice.public
    assert loaded._seeds() == alice._seeds()
    assert [p.name for p in tmp_path.iterdir()] == ["alice.key"]
    # bytes passphrase, and NFC normalisation of text passphrases
    alice.save(path, passphrase=b"caf\xc3\xa9", **FAST_KDF)
    assert Identity.load(path, passphrase="cafe\u0301").public == alice.public
    secret_hex = alice._seeds()[3].hex()
    assert secret_hex not in path.read_bytes().hex()


def test_classic_save_and_load(tmp_path: Path, dave_classic: Identity) -> None:
    path = tmp_path / "dave.key"
    dave_classic.save(path, passphrase="pw", **FAST_KDF)
    assert Identity.load(path, passphrase="pw").public == dave_classic.public


def test_load_failures(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "a.key"
    alice.save(path, passphrase="pw", **FAST_KDF)
    with pytest.raises(IdentityError, match="wrong passphrase"):
        Identity.load(path, passphrase="wrong")
    with pytest.raises(IdentityError, match="does not exist"):
        Identity.load(tmp_path / "missing.key", passphrase="pw")
    blob = path.read_bytes()
    for cut in (0, 5, 9, 12, len(blob) // 2, len(blob) - 1):
        path.write_bytes(blob[:cut])
        with pytest.raises(IdentityError):
            Identity.load(path, passphrase="pw")
    for pos in (10, 30, len(blob) - 20):
        damaged = bytearray(blob)
        damaged[pos] ^= 0x40
        path.write_bytes(bytes(damaged))
        with pytest.raises(IdentityError):
            Identity.load(path, passphrase="pw")
    path.write_bytes(b"not a key file at all")
    with pytest.raises(IdentityError, match="not a medsecure key file"):
        Identity.load(path, passphrase="pw")
    path.write_bytes(F.KEYFILE_MAGIC + os.urandom(F.KEYFILE_MAX_BYTES + 10))
    with pytest.raises(IdentityError, match="too large"):
        Identity.load(path, passphrase="pw")
    with pytest.raises(IdentityError):
        Identity.load(tmp_path, passphrase="pw")  # a folder


@pytest.mark.parametrize(
    ("iterations", "memory", "lanes"),
    [(1, 1 << 30, 1), (1 << 20, 8192, 1), (1, 8192, 1 << 16), (0, 8192, 1), (1, 1, 1)],
)
def test_hostile_kdf_parameters_are_refused_quickly(
    tmp_path: Path, iterations: int, memory: int, lanes: int
) -> None:
    params = _cbor.encode(
        {1: "argon2id", 2: os.urandom(16), 3: iterations, 4: memory, 5: lanes, 6: os.urandom(12)}
    )
    path = tmp_path / "hostile.key"
    path.write_bytes(F.KEYFILE_MAGIC + struct.pack(">H", len(params)) + params + os.urandom(200))
    start = time.monotonic()
    with pytest.raises(IdentityError, match="out of bounds"):
        Identity.load(path, passphrase="pw")
    assert time.monotonic() - start < 5  # generous: a real 1 GiB Argon2id would take far longer


def test_save_refuses_bad_arguments(tmp_path: Path, alice: Identity) -> None:
    with pytest.raises(ValueError, match="empty"):
        alice.save(tmp_path / "k", passphrase="")
    with pytest.raises(TypeError):
        alice.save(tmp_path / "k", passphrase=123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of bounds"):
        alice.save(tmp_path / "k", passphrase="pw", kdf_memory_kib=1 << 30)
    with pytest.raises(IdentityError, match="cannot write"):
        alice.save(tmp_path / "no" / "such" / "dir" / "k", passphrase="pw", **FAST_KDF)
    assert not (tmp_path / "k").exists()


def test_save_is_atomic_over_existing_file(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    path = tmp_path / "k"
    alice.save(path, passphrase="pw", **FAST_KDF)
    bob.save(path, passphrase="pw", **FAST_KDF)
    assert Identity.load(path, passphrase="pw").public == bob.public
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


# --------------------------------------------------------------------------------------------
# issue 8: small-order and non-canonical Ed25519 keys are refused at import
# --------------------------------------------------------------------------------------------

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493  # order of the Ed25519 base point


def _enc(y: int, sign: int = 0) -> bytes:
    return (y | (sign << 255)).to_bytes(32, "little")


# The 8 points of small order (canonical encodings; "Taming the many EdDSAs", libsodium).
SMALL_ORDER = {
    "identity (order 1)": "0100000000000000000000000000000000000000000000000000000000000000",
    "order 2": "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "order 4, sign 1": "0000000000000000000000000000000000000000000000000000000000000080",
    "order 4, sign 0": "0000000000000000000000000000000000000000000000000000000000000000",
    "order 8 (a)": "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "order 8 (b)": "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    "order 8 (c)": "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "order 8 (d)": "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
}
# Encodings RFC 8032 §5.1.3 refuses to decode but OpenSSL reads (reducing y modulo p).
NON_CANONICAL = {
    "identity with x = -0": _enc(1, 1).hex(),
    "order 2 with x = -0": _enc(_P - 1, 1).hex(),
    "y = p (order 4)": _enc(_P).hex(),
    "y = p + 1 (the identity again)": _enc(_P + 1).hex(),
    "y = p + 1, sign 1": _enc(_P + 1, 1).hex(),
    "y = 2^255 - 1": _enc(2**255 - 1).hex(),
    "y = 2^255 - 1, sign 1": _enc(2**255 - 1, 1).hex(),
}
BAD_ED25519 = {**SMALL_ORDER, **NON_CANONICAL}


def _universal_signature(point: bytes, message: bytes) -> bytes:
    """A forged Ed25519 signature of ``message`` for the public key ``point``, made without any
    secret: R = [S]B for a chosen S, so [S]B = R + [k]A holds whenever [k]A is the identity —
    always for A = identity, with probability >= 1/8 per try for the other small-order points.
    ``cryptography`` (OpenSSL) is the judge of whether it verifies."""
    key = ed25519.Ed25519PublicKey.from_public_bytes(point)
    for i in range(2000):
        seed = i.to_bytes(32, "little")
        h = hashes.Hash(hashes.SHA512())
        h.update(seed)
        a = bytearray(h.finalize()[:32])
        a[0] &= 248
        a[31] = (a[31] & 127) | 64
        s = int.from_bytes(a, "little") % _L
        r = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
        signature = r + s.to_bytes(32, "little")
        try:
            key.verify(signature, message)
        except InvalidSignature:
            continue
        return signature
    raise AssertionError("no forgery found")  # probability (7/8)^2000


class _Forger(Identity):
    """A classic 'identity' whose Ed25519 key is a crafted point and which signs by forgery."""

    __slots__ = ()

    @classmethod
    def with_point(cls, point: bytes) -> _Forger:
        self = object.__new__(cls)
        self._suite = "classic"
        self._x25519 = x25519.X25519PrivateKey.generate()
        self._ed25519 = ed25519.Ed25519PrivateKey.generate()  # never used
        self._mlkem = self._mldsa = None
        self._public = PublicIdentity._build(
            "classic",
            self._x25519.public_key(),
            ed25519.Ed25519PublicKey.from_public_bytes(point),
            None,
            None,
        )
        return self

    def _sign(self, message: bytes) -> list[bytes]:
        return [_universal_signature(self._ed25519_point(), message)]

    def _ed25519_point(self) -> bytes:
        return self._public._ed25519.public_bytes_raw()


@pytest.mark.parametrize("point", list(BAD_ED25519.values()), ids=list(BAD_ED25519))
def test_bad_ed25519_keys_are_refused_at_import(dave_classic: Identity, point: str) -> None:
    fields = _fields(dave_classic.public)
    fields[4] = bytes.fromhex(point)
    raw = _cbor.encode(fields)
    with pytest.raises(IdentityError, match="Ed25519 key"):
        PublicIdentity.from_bytes(raw)
    text = str(_Forger.with_point(bytes.fromhex(point)).public)
    with pytest.raises(IdentityError, match="Ed25519 key"):
        PublicIdentity.from_text(text)


def test_the_identity_point_signs_every_message() -> None:
    """Why the check matters: with the identity point as key, one forged signature verifies
    for any message at all (OpenSSL does not refuse the key)."""
    point = bytes.fromhex(SMALL_ORDER["identity (order 1)"])
    signature = _universal_signature(point, b"first message")
    key = ed25519.Ed25519PublicKey.from_public_bytes(point)
    for message in (b"second message", b"\x00" * 1000, b"anything at all"):
        key.verify(signature, message)


@pytest.mark.parametrize(
    "name",
    [
        "identity (order 1)",
        "order 2",
        "order 8 (c)",
        "y = p (order 4)",
        "y = p + 1 (the identity again)",
    ],
)
def test_envelope_forged_with_a_small_order_key_is_refused(bob: Identity, name: str) -> None:
    """A real envelope from a crafted classic identity, every signature forged without a secret
    key: the envelope format is otherwise valid, so only the refusal at import stops it."""
    point = bytes.fromhex(BAD_ED25519[name])
    forger = _Forger.with_point(point)
    envelope = medsecure.seal(
        b"prescription: forged", sender=forger, recipients=[bob.public], allow_classic=True
    )
    with pytest.raises(EnvelopeError, match="authentication failed"):
        medsecure.unseal(envelope, identity=bob)
    # nor can a caller name it as the expected sender: no public path builds that identity
    with pytest.raises(IdentityError):
        PublicIdentity.from_bytes(forger.public.to_bytes())


def test_real_ed25519_keys_are_not_refused() -> None:
    for _ in range(50):
        pub = Identity.generate("classic").public
        assert PublicIdentity.from_bytes(pub.to_bytes()) == pub


# --------------------------------------------------------------------------------------------
# issue 8: key files — empty passphrase, version 2 with the public identity in clear
# --------------------------------------------------------------------------------------------


def test_empty_passphrase_at_load_is_an_identity_error(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "a.key"
    alice.save(path, passphrase="pw", **FAST_KDF)
    for empty in ("", b""):
        with pytest.raises(IdentityError, match="empty"):
            Identity.load(path, passphrase=empty)
    with pytest.raises(TypeError):
        Identity.load(path, passphrase=None)  # type: ignore[arg-type]


def test_key_file_holds_its_public_identity(
    tmp_path: Path, alice: Identity, dave_classic: Identity
) -> None:
    for ident in (alice, dave_classic):
        path = tmp_path / f"{ident.suite}.key"
        ident.save(path, passphrase="pw", **FAST_KDF)
        blob = path.read_bytes()
        assert blob.startswith(F.KEYFILE_MAGIC_V2)
        assert _keyfile.read_public(path) == ident.public  # no passphrase
        assert _keyfile.public_of(blob) == ident.public
        assert Identity.load(path, passphrase="pw").public == ident.public


def test_version_1_key_files_still_load(tmp_path: Path) -> None:
    folder = Path(__file__).parent / "vectors" / "keyfiles"
    meta = json.loads((folder / "v1.json").read_text())
    assert {f["suite"] for f in meta["files"]} == {"hybrid", "classic"}
    for f in meta["files"]:
        path = folder / f["file"]
        assert path.read_bytes().startswith(F.KEYFILE_MAGIC)
        loaded = Identity.load(path, passphrase=f["passphrase"])
        assert loaded.public == PublicIdentity.from_text(f["public"])
        assert loaded.fingerprint == f["fingerprint"] and loaded.suite == f["suite"]
        with pytest.raises(IdentityError, match="version 1"):
            _keyfile.read_public(path)
        with pytest.raises(IdentityError, match="wrong passphrase"):
            Identity.load(path, passphrase="wrong")
        # saving it again writes the current format, which holds the public key
        again = tmp_path / f["file"]
        loaded.save(again, passphrase="pw", **FAST_KDF)
        assert _keyfile.read_public(again) == loaded.public


def test_a_tampered_public_key_fails_to_load(
    tmp_path: Path, alice: Identity, dave_classic: Identity
) -> None:
    path = tmp_path / "a.key"
    dave_classic.save(path, passphrase="pw", **FAST_KDF)
    blob = path.read_bytes()
    x_pub = dave_classic.public._x25519.public_bytes_raw()
    at = blob.index(x_pub)
    other = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
    path.write_bytes(blob[:at] + other + blob[at + 32 :])
    # without the passphrase the clear public key is only a hint: it reads, and is wrong
    hint = _keyfile.read_public(path)
    assert hint != dave_classic.public
    # unlocking refuses the file (the header is authenticated)
    with pytest.raises(IdentityError, match="wrong passphrase or damaged"):
        Identity.load(path, passphrase="pw")


def test_a_key_file_whose_public_key_is_not_its_own_fails_to_load(
    tmp_path: Path, alice: Identity, bob: Identity
) -> None:
    """A writer holding the passphrase seals Alice's secret key under Bob's public identity: the
    authentication passes, the check of the derived public key does not."""
    salt, nonce = os.urandom(16), os.urandom(12)
    params = _cbor.encode(
        {1: "argon2id", 2: salt, 3: 1, 4: 8192, 5: 1, 6: nonce, 7: bob.public.to_bytes()}
    )
    head = F.KEYFILE_MAGIC_V2 + struct.pack(">H", len(params)) + params
    key = _keyfile.KdfParams(1, 8192, 1).derive(b"pw", salt)
    sealed = AESGCM(key).encrypt(nonce, _cbor.encode(alice._seeds()), F.LABEL_KEYFILE_AAD + head)
    path = tmp_path / "mismatch.key"
    path.write_bytes(head + sealed)
    assert _keyfile.read_public(path) == bob.public
    with pytest.raises(IdentityError, match="not the one of its secret key"):
        Identity.load(path, passphrase="pw")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: f.pop(7),  # version 2 without its public key
        lambda f: f.update({7: "text"}),
        lambda f: f.update({8: b""}),
    ],
)
def test_malformed_version_2_headers(tmp_path: Path, alice: Identity, mutate: object) -> None:
    blob = _keyfile.encode(alice, "pw", _keyfile.KdfParams(1, 8192, 1))
    (plen,) = struct.unpack(">H", blob[8:10])
    params = _cbor.decode(blob[10 : 10 + plen], error=ValueError, what="p")
    mutate(params)  # type: ignore[operator]
    new = _cbor.encode(params)
    path = tmp_path / "k"
    path.write_bytes(F.KEYFILE_MAGIC_V2 + struct.pack(">H", len(new)) + new + blob[10 + plen :])
    with pytest.raises(IdentityError, match="damaged"):
        _keyfile.read_public(path)
    with pytest.raises(IdentityError, match="damaged"):
        Identity.load(path, passphrase="pw")


def test_a_small_order_public_key_in_a_key_file_is_refused(
    tmp_path: Path, dave_classic: Identity
) -> None:
    blob = _keyfile.encode(dave_classic, "pw", _keyfile.KdfParams(1, 8192, 1))
    ed = dave_classic.public._ed25519.public_bytes_raw()
    path = tmp_path / "k"
    path.write_bytes(blob.replace(ed, bytes.fromhex(SMALL_ORDER["identity (order 1)"])))
    with pytest.raises(IdentityError, match="small order"):
        _keyfile.read_public(path)


def test_read_public_refuses_what_is_not_a_key_file(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="does not exist"):
        _keyfile.read_public(tmp_path / "missing.key")
    with pytest.raises(IdentityError, match="not a regular file"):
        _keyfile.read_public(tmp_path)
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo)
    # opened without blocking and refused: a FIFO in the key file's place cannot stall loading
    with pytest.raises(IdentityError, match="not a regular file"):
        _keyfile.read_public(fifo)
    with pytest.raises(IdentityError, match="not a regular file"):
        Identity.load(fifo, passphrase="pw")
    (tmp_path / "junk").write_bytes(b"MEDSECK\x07" + bytes(40))
    with pytest.raises(IdentityError, match="not a medsecure key file"):
        _keyfile.read_public(tmp_path / "junk")
