"""``Content-Digest`` (RFC 9530) computed and checked over streamed bodies.

``http-message-signatures`` computes digests of whole in-memory bodies only; the relay streams
envelopes of any size, so the digest is computed here chunk by chunk. The relay protocol uses
``sha-256`` (RFC 9530 §5: "sha-256" and "sha-512" are the active algorithms); a request must
carry a ``sha-256`` member, other members are ignored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable
from typing import BinaryIO

import http_sf

__all__ = ["EMPTY_DIGEST", "StreamDigest", "digest_of_file", "format_digest", "parse_digest"]

_ALGORITHM = "sha-256"
_MAX_FIELD = 1024


class StreamDigest:
    """SHA-256 over a body fed in chunks; compares in constant time."""

    __slots__ = ("_h", "size")

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.size = 0

    def update(self, chunk: bytes | memoryview) -> None:
        self._h.update(chunk)
        self.size += len(chunk)

    def digest(self) -> bytes:
        return self._h.digest()

    def matches(self, expected: bytes) -> bool:
        return hmac.compare_digest(self._h.digest(), expected)

    @classmethod
    def of(cls, chunks: Iterable[bytes]) -> StreamDigest:
        d = cls()
        for chunk in chunks:
            d.update(chunk)
        return d


def format_digest(digest: bytes) -> str:
    """The ``Content-Digest`` field value for a SHA-256 digest."""
    return f"{_ALGORITHM}=:{base64.b64encode(digest).decode('ascii')}:"


def parse_digest(value: str) -> bytes:
    """The SHA-256 digest named by a ``Content-Digest`` field value; ``ValueError`` if absent or
    malformed."""
    if not value or len(value) > _MAX_FIELD:
        raise ValueError("malformed Content-Digest")
    try:
        parsed = http_sf.parse(value.encode("ascii"), tltype="dictionary")
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise ValueError("malformed Content-Digest") from exc
    if not isinstance(parsed, dict) or _ALGORITHM not in parsed:
        raise ValueError("Content-Digest has no sha-256 member")
    member = parsed[_ALGORITHM]
    raw = member[0] if isinstance(member, tuple) else None
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise ValueError("malformed sha-256 Content-Digest")
    return raw


def digest_of_file(fh: BinaryIO, chunk: int = 1 << 20) -> tuple[bytes, int]:
    """SHA-256 and length of what remains in ``fh`` (read in bounded chunks)."""
    d = StreamDigest()
    while True:
        block = fh.read(chunk)
        if not block:
            return d.digest(), d.size
        d.update(block)


EMPTY_DIGEST = hashlib.sha256(b"").digest()
