"""Helpers that take envelopes apart and rebuild them, as an attacker (or a malicious party) would.

Used by the tests and by tests/vectors/generate.py to build known-failure cases.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from medsecure._identity import Identity, hpke_suite
from medsecure.envelope import _cbor
from medsecure.envelope import _labels as F
from medsecure.envelope._seal import _hpke_info, _Keys

MAGIC_LEN = len(F.ENVELOPE_MAGIC)


@dataclass
class Parts:
    header: dict[int, Any]
    header_bytes: bytes
    body: bytes  # chunks ‖ trailer

    def framed(self, header_bytes: bytes | None = None) -> bytes:
        hb = self.header_bytes if header_bytes is None else header_bytes
        return F.ENVELOPE_MAGIC + struct.pack(">I", len(hb)) + hb


def split(envelope: bytes) -> Parts:
    (hlen,) = struct.unpack(">I", envelope[MAGIC_LEN : MAGIC_LEN + 4])
    hb = envelope[MAGIC_LEN + 4 : MAGIC_LEN + 4 + hlen]
    return Parts(_cbor.decode(hb, error=ValueError, what="h"), hb, envelope[MAGIC_LEN + 4 + hlen :])


def join(header: dict[int, Any] | bytes, body: bytes) -> bytes:
    hb = header if isinstance(header, bytes) else _cbor.encode(header)
    return F.ENVELOPE_MAGIC + struct.pack(">I", len(hb)) + hb + body


def content_key(envelope: bytes, identity: Identity) -> bytes:
    """What a legitimate recipient learns: the content key."""
    p = split(envelope)
    h = p.header
    fp = identity.public.fingerprint_bytes
    stanza = next(s for s in h[5] if s[0] == fp)
    info = _hpke_info(h[2], h[3], h[4], h[6], h[7], fp)
    return bytes(hpke_suite(identity.suite).decrypt(stanza[2], identity._hpke_key(), info=info))


def trailer_length(sender_suite: str) -> int:
    from medsecure.envelope._seal import _trailer_plain_length

    return _trailer_plain_length(sender_suite) + F.TAG_BYTES


def replace_trailer(
    envelope: bytes, identity: Identity, signatures: list[bytes], sender_suite: str
) -> bytes:
    """A malicious recipient re-encrypts the trailer with other signatures."""
    ck = content_key(envelope, identity)
    keys = _Keys(ck, split(envelope).header[4])
    tl = trailer_length(sender_suite)
    new = keys.trailer.encrypt(bytes(12), _cbor.encode(signatures), None)
    return envelope[:-tl] + new


def read_signatures(envelope: bytes, identity: Identity, sender_suite: str) -> list[bytes]:
    ck = content_key(envelope, identity)
    keys = _Keys(ck, split(envelope).header[4])
    tl = trailer_length(sender_suite)
    return list(
        _cbor.decode(
            keys.trailer.decrypt(bytes(12), envelope[-tl:], None), error=ValueError, what="t"
        )
    )
