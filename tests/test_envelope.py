from __future__ import annotations

import io
import os
import time
from pathlib import Path

import craft
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import medsecure
from medsecure import (
    EnvelopeError,
    Identity,
    NotARecipient,
    SenderMismatch,
    seal,
    seal_stream,
    unseal,
    unseal_stream,
)
from medsecure.envelope import _cbor
from medsecure.envelope import _labels as F
from medsecure.envelope._seal import _Keys

CS = F.MIN_CHUNK_SIZE  # 16 KiB chunks keep boundary tests small
SIZES = sorted(
    {0, 1, 15, 16, 17, CS - 1, CS, CS + 1, 2 * CS - 1, 2 * CS, 2 * CS + 1, 3 * CS, 5 * CS + 7}
)


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_around_chunk_boundaries(alice: Identity, bob: Identity, size: int) -> None:
    data = os.urandom(size)
    env = seal(data, sender=alice, recipients=[bob.public], chunk_size=CS)
    res = unseal(env, identity=bob, expected_sender=alice.public)
    assert res.data == data and res.size == size
    assert res.sender == alice.public
    assert res.recipients == (bob.public.fingerprint,)
    assert res.suite == "hybrid"
    # streaming in both directions gives the same results and compatible bytes
    out = io.BytesIO()
    seal_stream(io.BytesIO(data), out, sender=alice, recipients=[bob.public], chunk_size=CS)
    assert unseal(out.getvalue(), identity=bob).data == data
    plain = io.BytesIO()
    res2 = unseal_stream(io.BytesIO(env), plain, identity=bob)
    assert plain.getvalue() == data and res2.data is None and res2.size == size


class _Trickle(io.RawIOBase):
    """A source that returns at most 7 bytes per read (like a slow pipe)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        chunk = self._data.read(min(7, len(b)))
        b[: len(chunk)] = chunk
        return len(chunk)


def test_short_reads(alice: Identity, bob: Identity) -> None:
    data = os.urandom(2 * CS + 3)
    out = io.BytesIO()
    seal_stream(_Trickle(data), out, sender=alice, recipients=[bob.public], chunk_size=CS)  # type: ignore[arg-type]
    plain = io.BytesIO()
    unseal_stream(_Trickle(out.getvalue()), plain, identity=bob)  # type: ignore[arg-type]
    assert plain.getvalue() == data


def test_every_recipient_opens_a_stranger_cannot(
    alice: Identity, bob: Identity, carol: Identity
) -> None:
    data = b"compte rendu operatoire"
    env = seal(data, sender=alice, recipients=[bob.public, carol.public])
    for who in (bob, carol):
        res = unseal(env, identity=who)
        assert res.data == data
        assert res.recipients == (bob.public.fingerprint, carol.public.fingerprint)
    with pytest.raises(NotARecipient):
        unseal(env, identity=alice)  # the sender is not added implicitly
    with pytest.raises(NotARecipient):
        unseal(env, identity=Identity.generate())
    env2 = seal(data, sender=alice, recipients=[bob.public, alice.public, bob.public])
    assert unseal(env2, identity=alice).recipients == (
        bob.public.fingerprint,
        alice.public.fingerprint,
    )


def test_sender_mismatch(alice: Identity, bob: Identity, carol: Identity) -> None:
    env = seal(b"x", sender=alice, recipients=[bob.public])
    with pytest.raises(SenderMismatch):
        unseal(env, identity=bob, expected_sender=carol.public)
    assert issubclass(SenderMismatch, EnvelopeError)
    assert issubclass(NotARecipient, EnvelopeError)


def test_classic_suite_and_downgrade(
    alice: Identity, bob: Identity, dave_classic: Identity, erin_classic: Identity
) -> None:
    env = seal(b"x", sender=dave_classic, recipients=[erin_classic.public])
    assert unseal(env, identity=erin_classic).suite == "classic"
    with pytest.raises(ValueError, match="allow_classic"):
        seal(b"x", sender=alice, recipients=[bob.public, dave_classic.public])
    with pytest.raises(ValueError, match="allow_classic"):
        seal(b"x", sender=dave_classic, recipients=[bob.public])
    env = seal(b"x", sender=alice, recipients=[bob.public, dave_classic.public], allow_classic=True)
    assert unseal(env, identity=bob).suite == "classic"
    assert unseal(env, identity=dave_classic).data == b"x"
    env = seal(b"x", sender=dave_classic, recipients=[bob.public], allow_classic=True)
    assert unseal(env, identity=bob).sender == dave_classic.public


def test_hybrid_header_with_classic_stanza_is_rejected(
    alice: Identity, bob: Identity, dave_classic: Identity
) -> None:
    env = seal(b"x", sender=alice, recipients=[bob.public, dave_classic.public], allow_classic=True)
    parts = craft.split(env)
    parts.header[2] = "hybrid"
    with pytest.raises(EnvelopeError, match="classic recipient in hybrid"):
        unseal(craft.join(parts.header, parts.body), identity=bob)
    # and an all-hybrid envelope relabelled classic
    env = seal(b"x", sender=alice, recipients=[bob.public])
    parts = craft.split(env)
    parts.header[2] = "classic"
    with pytest.raises(EnvelopeError):
        unseal(craft.join(parts.header, parts.body), identity=bob)


def test_programmer_errors(alice: Identity, bob: Identity) -> None:
    with pytest.raises(ValueError, match="at least one recipient"):
        seal(b"x", sender=alice, recipients=[])
    with pytest.raises(TypeError):
        seal(b"x", sender=alice, recipients=bob.public)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        seal(b"x", sender=alice.public, recipients=[bob.public])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        seal("text", sender=alice, recipients=[bob.public])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        seal(b"x", sender=alice, recipients=["bob"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="chunk_size"):
        seal(b"x", sender=alice, recipients=[bob.public], chunk_size=1000)
    with pytest.raises(ValueError, match="too many recipients"):
        seal(b"x", sender=alice, recipients=[bob.public, alice.public], max_recipients=1)
    with pytest.raises(TypeError):
        unseal(b"x", identity=bob.public)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        unseal(b"x", identity=bob, expected_sender="alice")  # type: ignore[arg-type]


def test_recipient_cap_on_reading(alice: Identity, bob: Identity, carol: Identity) -> None:
    env = seal(b"x", sender=alice, recipients=[bob.public, carol.public])
    with pytest.raises(EnvelopeError):
        unseal(env, identity=bob, max_recipients=1)
    assert unseal(env, identity=bob, max_recipients=2).data == b"x"


@pytest.fixture(scope="module")
def classic_env(dave_classic: Identity, erin_classic: Identity) -> bytes:
    # Classic envelopes are small, so whole-envelope sweeps stay fast. Two chunks + trailer.
    return seal(
        os.urandom(CS + 100), sender=dave_classic, recipients=[erin_classic.public], chunk_size=CS
    )


def test_bit_flip_sweep_classic(classic_env: bytes, erin_classic: Identity) -> None:
    # one flipped bit at every byte position, cycling through the 8 bit positions
    for pos in range(len(classic_env)):
        bad = bytearray(classic_env)
        bad[pos] ^= 1 << (pos % 8)
        with pytest.raises(EnvelopeError):
            unseal(bytes(bad), identity=erin_classic)


def test_bit_flip_sweep_hybrid(alice: Identity, bob: Identity) -> None:
    env = seal(os.urandom(100), sender=alice, recipients=[bob.public])
    step = 7  # every 7th byte across the ~8 KiB hybrid envelope, all bit positions over the sweep
    for pos in range(0, len(env), step):
        bad = bytearray(env)
        bad[pos] ^= 1 << (pos % 8)
        with pytest.raises(EnvelopeError):
            unseal(bytes(bad), identity=bob)


def test_truncation_sweep(classic_env: bytes, erin_classic: Identity) -> None:
    for cut in range(len(classic_env)):
        with pytest.raises(EnvelopeError):
            unseal(classic_env[:cut], identity=erin_classic)
        if cut % 97 == 0:
            with pytest.raises(EnvelopeError):
                unseal_stream(io.BytesIO(classic_env[:cut]), io.BytesIO(), identity=erin_classic)


@pytest.mark.parametrize("extra", [b"\x00", b"x" * 16, os.urandom(83), os.urandom(CS + 16)])
def test_trailing_bytes(classic_env: bytes, erin_classic: Identity, extra: bytes) -> None:
    with pytest.raises(EnvelopeError):
        unseal(classic_env + extra, identity=erin_classic)
    with pytest.raises(EnvelopeError):
        unseal_stream(io.BytesIO(classic_env + extra), io.BytesIO(), identity=erin_classic)


def test_chunk_reorder_duplicate_drop(dave_classic: Identity, erin_classic: Identity) -> None:
    env = seal(
        os.urandom(3 * CS + 5), sender=dave_classic, recipients=[erin_classic.public], chunk_size=CS
    )
    parts = craft.split(env)
    tl = craft.trailer_length("classic")
    body, trailer = parts.body[:-tl], parts.body[-tl:]
    n = CS + 16
    chunks = [body[i : i + n] for i in range(0, len(body), n)]
    assert len(chunks) == 4
    variants = [
        [chunks[1], chunks[0], chunks[2], chunks[3]],  # reorder
        [chunks[0], chunks[0], chunks[1], chunks[2], chunks[3]],  # duplicate
        [chunks[0], chunks[2], chunks[3]],  # drop a middle chunk
        [chunks[0], chunks[1], chunks[2]],  # drop the final chunk
        [*chunks, chunks[3]],  # doubled final chunk
    ]
    for v in variants:
        with pytest.raises(EnvelopeError):
            unseal(craft.join(parts.header_bytes, b"".join(v) + trailer), identity=erin_classic)


def test_splicing_two_envelopes(dave_classic: Identity, erin_classic: Identity) -> None:
    a = craft.split(seal(os.urandom(50), sender=dave_classic, recipients=[erin_classic.public]))
    b = craft.split(seal(os.urandom(50), sender=dave_classic, recipients=[erin_classic.public]))
    with pytest.raises(EnvelopeError):
        unseal(craft.join(a.header_bytes, b.body), identity=erin_classic)
    # swap only the stanza
    h = dict(a.header)
    h[5] = b.header[5]
    with pytest.raises(EnvelopeError):
        unseal(craft.join(h, a.body), identity=erin_classic)


def test_half_signed_envelope_is_rejected(alice: Identity, bob: Identity) -> None:
    env = seal(b"ordonnance", sender=alice, recipients=[bob.public])
    sigs = craft.read_signatures(env, bob, "hybrid")
    assert len(sigs) == 2
    # a malicious recipient strips the ML-DSA signature (re-encrypting the trailer is possible
    # for any recipient): the trailer length changes and/or the structure is refused
    for forged in (
        [sigs[0]],
        [sigs[1]],
        [sigs[0], b""],
        [sigs[0], bytes(len(sigs[1]))],
        [sigs[0], sigs[1], sigs[0]],
    ):
        bad = craft.replace_trailer(env, bob, forged, "hybrid")
        with pytest.raises(EnvelopeError):
            unseal(bad, identity=bob)
    # the untouched re-encryption still verifies (the helper itself is sound)
    assert (
        unseal(craft.replace_trailer(env, bob, sigs, "hybrid"), identity=bob).data == b"ordonnance"
    )


def test_recipient_cannot_forge_content(alice: Identity, bob: Identity, carol: Identity) -> None:
    """Bob knows the content key; he re-encrypts other content under Alice's name for Carol."""
    env = seal(b"original", sender=alice, recipients=[bob.public, carol.public])
    parts = craft.split(env)
    ck = craft.content_key(env, bob)
    keys = _Keys(ck, parts.header[4])
    forged_chunk = keys.payload.encrypt(bytes(11) + b"\x01", b"tampered", None)
    tl = craft.trailer_length("hybrid")
    forged = craft.join(parts.header_bytes, forged_chunk + parts.body[-tl:])
    with pytest.raises(EnvelopeError):
        unseal(forged, identity=carol)


def test_key_commitment(alice: Identity, bob: Identity, carol: Identity) -> None:
    """A malicious sender gives Bob and Carol different content keys: Carol must refuse."""
    from medsecure._identity import hpke_suite
    from medsecure.envelope._seal import _hpke_info

    env = seal(b"for bob", sender=alice, recipients=[bob.public, carol.public])
    parts = craft.split(env)
    h = dict(parts.header)
    other_ck = os.urandom(32)
    fp = carol.public.fingerprint_bytes
    info = _hpke_info(h[2], h[3], h[4], h[6], h[7], fp)
    h[5] = [
        s
        if s[0] != fp
        else [fp, s[1], hpke_suite("hybrid").encrypt(other_ck, carol.public._hpke_key(), info=info)]
        for s in h[5]
    ]
    bad = craft.join(h, parts.body)
    with pytest.raises(EnvelopeError, match="authentication failed"):
        unseal(bad, identity=carol)


def test_authentication_errors_are_opaque(classic_env: bytes, erin_classic: Identity) -> None:
    messages = set()
    parts = craft.split(classic_env)
    for pos in (len(classic_env) - 5, len(classic_env) - 200, len(classic_env) // 2):
        bad = bytearray(classic_env)
        bad[pos] ^= 1
        with pytest.raises(EnvelopeError) as info:
            unseal(bytes(bad), identity=erin_classic)
        messages.add(str(info.value))
    h = dict(parts.header)
    h[6] = bytes(32)
    with pytest.raises(EnvelopeError) as info:
        unseal(craft.join(h, parts.body), identity=erin_classic)
    messages.add(str(info.value))
    assert messages == {"envelope authentication failed"}


def _deep(n: int) -> bytes:
    return b"\x81" * n + b"\x00"


@pytest.mark.parametrize(
    "header",
    [
        _deep(10_000),
        _deep(100),
        b"\x5b\x7f\xff\xff\xff\xff\xff\xff\xff",  # bstr declaring 2^63 - 1 bytes
        b"\x9b\x7f\xff\xff\xff\xff\xff\xff\xff",  # array declaring 2^63 - 1 items
        b"\xbb\x7f\xff\xff\xff\xff\xff\xff\xff",  # map declaring 2^63 - 1 pairs
        b"\x9f" * 1000,  # indefinite arrays
        b"\xa2\x01\x01\x01\x02",  # duplicate key
        b"\xc1\x1a\x00\x00\x00\x00",  # tag
        b"\xf9\x3c\x00",  # float
        b"\xf7",  # undefined
        b"\xa1\x18\x01\x01",  # non-minimal integer key
        b"\xa2\x02\x01\x01\x01",  # unsorted keys
        b"\x7f\x61a\xff",  # indefinite text
        b"",
    ],
)
def test_hostile_cbor_headers(bob: Identity, header: bytes) -> None:
    start = time.monotonic()
    with pytest.raises(EnvelopeError):
        unseal(craft.join(header, b""), identity=bob)
    with pytest.raises(EnvelopeError):
        unseal(craft.join(header, os.urandom(4000)), identity=bob)
    assert time.monotonic() - start < 5


def test_declared_header_length_is_bounded(bob: Identity) -> None:
    import struct

    env = F.ENVELOPE_MAGIC + struct.pack(">I", 0xFFFFFFFF) + b"\x00" * 100
    with pytest.raises(EnvelopeError, match="too large"):
        unseal(env, identity=bob)
    with pytest.raises(EnvelopeError, match="truncated"):
        unseal(F.ENVELOPE_MAGIC + struct.pack(">I", 5000) + b"\xa0", identity=bob)


def test_garbage(bob: Identity) -> None:
    for junk in (b"", b"MEDSEC", b"MEDSEC\x00\x02" + bytes(20), os.urandom(10_000), b"%PDF-1.7\n"):
        with pytest.raises(EnvelopeError):
            unseal(junk, identity=bob)


def test_header_field_mutations(alice: Identity, bob: Identity) -> None:
    env = seal(b"x", sender=alice, recipients=[bob.public])
    parts = craft.split(env)
    mutations = {
        "version": (1, 2),
        "suite": (2, "quantum"),
        "chunk": (3, 12345),
        "chunk_big": (3, 1 << 30),
        "salt": (4, b"short"),
        "stanzas": (5, []),
        "stanza_shape": (5, [[b"x"]]),
        "commit": (6, b"\x00"),
        "sender": (7, 5),
        "extra": (8, 1),
    }
    for name, (key, value) in mutations.items():
        h = dict(parts.header)
        h[key] = value
        with pytest.raises(EnvelopeError):
            unseal(craft.join(h, parts.body), identity=bob)
        del name
    h = dict(parts.header)
    del h[7]
    with pytest.raises(EnvelopeError):
        unseal(craft.join(h, parts.body), identity=bob)
    h = dict(parts.header)
    h[5] = [h[5][0], h[5][0]]
    with pytest.raises(EnvelopeError, match="duplicate"):
        unseal(craft.join(h, parts.body), identity=bob)
    h = dict(parts.header)
    h[5] = [[h[5][0][0], 0x0021, h[5][0][2]]]
    with pytest.raises(EnvelopeError, match="unknown KEM"):
        unseal(craft.join(h, parts.body), identity=bob)


def test_unseal_stream_to_path(tmp_path: Path, alice: Identity, bob: Identity) -> None:
    data = os.urandom(3 * CS)
    env = seal(data, sender=alice, recipients=[bob.public], chunk_size=CS)
    target = tmp_path / "out.pdf"
    res = unseal_stream(io.BytesIO(env), target, identity=bob)
    assert target.read_bytes() == data and res.size == len(data)
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    # failure: nothing new appears, no temp file stays
    bad = bytearray(env)
    bad[-10] ^= 1
    fresh = tmp_path / "fresh.pdf"
    with pytest.raises(EnvelopeError):
        unseal_stream(io.BytesIO(bytes(bad)), fresh, identity=bob)
    assert not fresh.exists()
    # failure over an existing file: it stays untouched
    target.write_bytes(b"previous")
    with pytest.raises(EnvelopeError):
        unseal_stream(io.BytesIO(bytes(bad)), target, identity=bob)
    with pytest.raises(NotARecipient):
        unseal_stream(io.BytesIO(env), target, identity=alice)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pdf"]
    # a str path works too
    unseal_stream(io.BytesIO(env), str(tmp_path / "s.bin"), identity=bob)
    assert (tmp_path / "s.bin").read_bytes() == data


def test_unseal_stream_path_in_missing_folder(
    tmp_path: Path, alice: Identity, bob: Identity
) -> None:
    env = seal(b"x", sender=alice, recipients=[bob.public])
    with pytest.raises(medsecure.StorageError):
        unseal_stream(io.BytesIO(env), tmp_path / "missing" / "x", identity=bob)


def test_io_errors_are_translated(alice: Identity, bob: Identity) -> None:
    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            raise OSError(5, "Input/output error")

        def writable(self) -> bool:
            return True

        def write(self, b: object) -> int:
            raise OSError(28, "No space left on device")

    with pytest.raises(medsecure.StorageError, match="No space"):
        seal_stream(io.BytesIO(b"x"), Broken(), sender=alice, recipients=[bob.public])  # type: ignore[arg-type]
    with pytest.raises(medsecure.StorageError, match="Input/output"):
        seal_stream(Broken(), io.BytesIO(), sender=alice, recipients=[bob.public])  # type: ignore[arg-type]
    with pytest.raises(medsecure.StorageError):
        unseal_stream(Broken(), io.BytesIO(), identity=bob)  # type: ignore[arg-type]


def test_overhead_is_small(alice: Identity, bob: Identity) -> None:
    data = os.urandom(10 * CS)
    env = seal(data, sender=alice, recipients=[bob.public], chunk_size=CS)
    overhead = len(env) - len(data)
    # header (~1.3 KiB stanza + 3.4 KiB sender) + 16 B per chunk + 3.4 KiB trailer
    assert overhead < 9000
    assert _cbor.decode(craft.split(env).header_bytes, error=ValueError, what="h")[3] == CS


def test_cbor_canonical_reencode_rejects() -> None:
    with pytest.raises(EnvelopeError, match="canonical"):
        _cbor.decode(b"\x18\x01", error=EnvelopeError, what="x")
    assert _cbor.decode(b"\x01", error=EnvelopeError, what="x") == 1


@pytest.mark.parametrize(
    "encoded",
    [
        "c249010000000000000000",  # tag 2: 2**64
        "c349010000000000000000",  # tag 3: -(2**64) - 1
        "a101c249010000000000000000",  # as a map value
        "a1c24901000000000000000001",  # as a map key
        "81c24a01" + "00" * 9,  # inside an array (a 73-bit number)
    ],
)
def test_cbor_bignum_tags_are_refused(encoded: str) -> None:
    """docs/format.md §8 refuses every tag; cbor2 decodes the bignum tags 2 and 3 into plain
    ints even without semantic decoders, and the decoder used to let them through."""
    with pytest.raises(EnvelopeError, match="malformed x"):
        _cbor.decode(bytes.fromhex(encoded), error=EnvelopeError, what="x")
    assert (
        _cbor.decode(bytes.fromhex("1bffffffffffffffff"), error=ValueError, what="x") == 2**64 - 1
    )
    assert _cbor.decode(bytes.fromhex("3bffffffffffffffff"), error=ValueError, what="x") == -(2**64)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=3 * CS + 50), n_extra=st.integers(min_value=0, max_value=2))
def test_property_round_trip(
    alice: Identity, bob: Identity, carol: Identity, data: bytes, n_extra: int
) -> None:
    recipients = [bob.public, carol.public, alice.public][: 1 + n_extra]
    env = seal(data, sender=alice, recipients=recipients, chunk_size=CS)
    assert unseal(env, identity=bob, expected_sender=alice.public).data == data


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pos=st.integers(min_value=0),
    bit=st.integers(min_value=0, max_value=7),
    data=st.binary(max_size=CS + 20),
)
def test_property_tampering_detected(
    dave_classic: Identity, erin_classic: Identity, pos: int, bit: int, data: bytes
) -> None:
    env = bytearray(
        seal(data, sender=dave_classic, recipients=[erin_classic.public], chunk_size=CS)
    )
    env[pos % len(env)] ^= 1 << bit
    with pytest.raises(EnvelopeError):
        unseal(bytes(env), identity=erin_classic)


@settings(max_examples=200, deadline=None)
@given(junk=st.binary(max_size=600))
def test_property_garbage_after_magic(junk: bytes) -> None:
    ident = _IDENT
    for candidate in (junk, F.ENVELOPE_MAGIC + junk, craft.join(junk, b"")):
        with pytest.raises(EnvelopeError):
            unseal(candidate, identity=ident)


_IDENT = Identity.generate("classic")


def test_streaming_works_in_a_forked_child(alice: Identity, bob: Identity) -> None:
    """The hashing and sync thread pools are recreated after fork (no deadlock in children)."""
    data = os.urandom(4 * CS + 5)
    seal(data, sender=alice, recipients=[bob.public], chunk_size=CS)  # parent's pool is running
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            env = seal(data, sender=alice, recipients=[bob.public], chunk_size=CS)
            ok = unseal(env, identity=bob).data == data
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child hung")
