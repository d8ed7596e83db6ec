"""Regenerate the envelope test vectors in this folder (or in the folder given as argument).

    python tests/vectors/generate.py [OUT_DIR]

Each vector is a JSON file:

    {"name": ..., "description": ..., "expect": "success" | "EnvelopeError" | "NotARecipient"
     | "SenderMismatch", "recipient": {"suite": ..., "seeds": {...}}, "expected_sender": hex
     | null, "envelope": hex, "plaintext": hex (success only), "sender_fingerprint": ...}

Identities come from fixed seeds and the content key and salt from a seeded generator
(`_random` hook). HPKE encapsulation and ML-DSA's hedged signatures draw randomness inside
OpenSSL, which `cryptography` cannot be asked to replace, so a regeneration changes those bytes
and nothing else; the expected outcomes never change (docs/format.md §9).
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

import craft  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand  # noqa: E402

from medsecure import (  # noqa: E402
    Identity,
    seal,
)
from medsecure.envelope import _cbor  # noqa: E402
from medsecure.envelope import _labels as F  # noqa: E402


def seeded(label: str) -> Callable[[int], bytes]:
    """A deterministic byte source for the `_random` hook (HKDF-Expand over a counter)."""
    counter = [0]

    def draw(n: int) -> bytes:
        counter[0] += 1
        out = b""
        block = 0
        while len(out) < n:  # HKDF-Expand yields at most 8160 bytes per info
            info = f"{label}/{counter[0]}/{block}".encode()
            out += HKDFExpand(hashes.SHA256(), 8160, info).derive(b"medsecure test vectors")
            block += 1
        return out[:n]

    return draw


def identity(name: str, suite: str) -> tuple[Identity, dict[str, str]]:
    d = seeded("identity/" + name)
    seeds = {"x25519": d(32), "ed25519": d(32)}
    if suite == "hybrid":
        seeds.update(mlkem=d(64), mldsa=d(32))
    ident = Identity._from_seeds(
        suite,
        x25519_seed=seeds["x25519"],
        ed25519_seed=seeds["ed25519"],
        mlkem_seed=seeds.get("mlkem"),
        mldsa_seed=seeds.get("mldsa"),
    )
    return ident, {k: v.hex() for k, v in seeds.items()}


def build() -> list[dict[str, Any]]:
    alice, _ = identity("alice", "hybrid")
    bob, bob_seeds = identity("bob", "hybrid")
    carol, _ = identity("carol", "hybrid")
    dave, dave_seeds = identity("dave", "classic")
    erin, _ = identity("erin", "classic")
    cs = F.MIN_CHUNK_SIZE
    plain = seeded("plaintext")(2 * cs + 33)
    vectors: list[dict[str, Any]] = []

    def add(
        name: str,
        desc: str,
        env: bytes,
        expect: str,
        who: str = "bob",
        data: bytes | None = None,
        expected_sender: Identity | None = None,
    ) -> None:
        seeds, suite = (bob_seeds, "hybrid") if who == "bob" else (dave_seeds, "classic")
        v: dict[str, Any] = {
            "name": name,
            "description": desc,
            "expect": expect,
            "recipient": {"suite": suite, "seeds": seeds},
            "expected_sender": expected_sender.public.to_bytes().hex() if expected_sender else None,
            "envelope": env.hex(),
        }
        if expect == "success":
            assert data is not None
            v["plaintext"] = data.hex()
            v["sender_fingerprint"] = alice.fingerprint if who == "bob" else erin.fingerprint
        vectors.append(v)

    good = seal(
        plain,
        sender=alice,
        recipients=[bob.public, carol.public],
        chunk_size=cs,
        _random=seeded("good"),
    )
    add(
        "hybrid-3-chunks",
        "hybrid, two recipients, three 16 KiB chunks",
        good,
        "success",
        data=plain,
        expected_sender=alice,
    )
    empty = seal(b"", sender=alice, recipients=[bob.public], _random=seeded("empty"))
    add("hybrid-empty", "empty payload: one empty final chunk", empty, "success", data=b"")
    exact = seal(
        plain[: 2 * cs],
        sender=alice,
        recipients=[bob.public],
        chunk_size=cs,
        _random=seeded("exact"),
    )
    add(
        "hybrid-exact-multiple",
        "payload exactly two chunks: the last full chunk is final",
        exact,
        "success",
        data=plain[: 2 * cs],
    )
    classic = seal(plain[:100], sender=erin, recipients=[dave.public], _random=seeded("classic"))
    add(
        "classic",
        "classic suite (X25519, Ed25519)",
        classic,
        "success",
        who="dave",
        data=plain[:100],
    )

    add("not-a-recipient", "dave is not listed", good, "NotARecipient", who="dave")
    add(
        "sender-mismatch",
        "authentic, but the caller expects carol",
        good,
        "SenderMismatch",
        expected_sender=carol,
    )

    tl = craft.trailer_length("hybrid")
    parts = craft.split(good)
    body = parts.body
    flip = bytearray(good)
    flip[len(good) - tl - 100] ^= 0x01
    add("payload-bit-flip", "one bit flipped in the last chunk", bytes(flip), "EnvelopeError")
    flip = bytearray(good)
    flip[-1] ^= 0x80
    add("trailer-bit-flip", "one bit flipped in the trailer tag", bytes(flip), "EnvelopeError")
    add(
        "truncated-chunk",
        "last chunk and trailer cut",
        good[: len(good) - tl - 40],
        "EnvelopeError",
    )
    add(
        "truncated-at-chunk-boundary",
        "final chunk dropped",
        craft.join(parts.header_bytes, body[: cs + 16] + body[2 * (cs + 16) :]),
        "EnvelopeError",
    )
    add("trailing-byte", "one byte appended", good + b"\x00", "EnvelopeError")
    n = cs + 16
    chunks = [body[i * n : (i + 1) * n] for i in range(2)]
    rest = body[2 * n :]
    add(
        "reordered-chunks",
        "chunks 0 and 1 swapped",
        craft.join(parts.header_bytes, chunks[1] + chunks[0] + rest),
        "EnvelopeError",
    )
    add(
        "duplicated-chunk",
        "chunk 0 twice",
        craft.join(parts.header_bytes, chunks[0] + chunks[0] + chunks[1] + rest),
        "EnvelopeError",
    )
    other = craft.split(
        seal(
            plain,
            sender=alice,
            recipients=[bob.public, carol.public],
            chunk_size=cs,
            _random=seeded("other"),
        )
    )
    add(
        "spliced",
        "header of one envelope, body of another",
        craft.join(parts.header_bytes, other.body),
        "EnvelopeError",
    )
    sigs = craft.read_signatures(good, bob, "hybrid")
    add(
        "half-signed",
        "ML-DSA-65 signature stripped by a recipient",
        craft.replace_trailer(good, bob, sigs[:1], "hybrid"),
        "EnvelopeError",
    )
    add(
        "wrong-signature",
        "ML-DSA-65 signature zeroed",
        craft.replace_trailer(good, bob, [sigs[0], bytes(len(sigs[1]))], "hybrid"),
        "EnvelopeError",
    )
    h = dict(parts.header)
    h[6] = bytes(32)
    add("bad-commitment", "commitment replaced", craft.join(h, body), "EnvelopeError")
    hb = parts.header_bytes
    idx = hb.index(b"\x01\x01")  # key 1 -> version 1
    add(
        "non-canonical-header",
        "version encoded as 0x18 0x01",
        craft.join(hb[:idx] + b"\x01\x18\x01" + hb[idx + 2 :], body),
        "EnvelopeError",
    )
    add(
        "tagged-header",
        "header wrapped in a CBOR tag",
        craft.join(b"\xd8\x18" + hb, body),
        "EnvelopeError",
    )
    add(
        "deep-nesting",
        "10,000 nested arrays",
        craft.join(b"\x81" * 10_000 + b"\x00", b""),
        "EnvelopeError",
    )
    add(
        "huge-length",
        "byte string declaring 2^63-1 bytes",
        craft.join(b"\x5b\x7f\xff\xff\xff\xff\xff\xff\xff", b""),
        "EnvelopeError",
    )
    add("bad-magic", "wrong format version byte", b"MEDSEC\x00\x02" + good[8:], "EnvelopeError")
    add(
        "huge-header-length",
        "declared header length 2^32-1",
        F.ENVELOPE_MAGIC + struct.pack(">I", 0xFFFFFFFF),
        "EnvelopeError",
    )
    h = dict(parts.header)
    h[2] = "classic"
    add(
        "relabelled-classic",
        "all-hybrid envelope labelled classic",
        craft.join(h, body),
        "EnvelopeError",
    )
    assert _cbor.encode(parts.header) == parts.header_bytes
    return vectors


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for v in build():
        path = out / f"{v['name']}.json"
        path.write_text(json.dumps(v, indent=1, sort_keys=True) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    for p in write(target):
        print(p)
