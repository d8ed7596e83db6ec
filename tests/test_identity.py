from __future__ import annotations

import os
import stat
import struct
import time
from pathlib import Path

import pytest
from conftest import FAST_KDF

from medsecure import Identity, IdentityError, PublicIdentity, _cbor
from medsecure import _format as F

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
