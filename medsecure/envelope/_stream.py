"""STREAM framing of the payload (docs/format.md §4.4) and the payload digest (§4.6).

The plaintext is cut into chunks of exactly ``chunk_size`` bytes (the last one shorter, or empty
only for an empty plaintext); chunk ``i`` is AES-256-GCM under the payload key with the nonce
``uint88(i) ‖ last-flag``. Each ciphertext chunk is hashed; the payload digest hashes the list of
chunk digests. Chunk boundaries are implicit, so a reader finds the end of the payload by
keeping the trailer's fixed length in reserve.

The producers here yield ``(view, is_last)`` pairs from memory or from a stream, reusing a few
buffers so that memory stays bounded whatever the size. Hashing chunks is the dominant cost
(AES-GCM with AES-NI/VAES is several times faster than SHA-256); both release the GIL, so a
small shared pool hashes chunk ``i`` while the caller's thread reads, encrypts and writes chunk
``i+1``. Envelopes of a single chunk hash inline.

Sans-I/O: only the file objects given by the caller are read or written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .._errors import EnvelopeError
from . import _labels as F

__all__ = [
    "PayloadHash",
    "cipher_chunks_from_memory",
    "cipher_chunks_from_stream",
    "decrypt_chunks",
    "encrypt_chunks",
    "nonce",
    "plain_chunks_from_memory",
    "plain_chunks_from_stream",
    "readfull",
    "sha256",
]

_HASH_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _HASH_POOL
    if _HASH_POOL is None:
        _HASH_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="medsecure-hash")
    return _HASH_POOL


def _forget_pool_after_fork() -> None:
    # A forked child inherits the executor but not its threads: work submitted there would wait
    # forever. Start a fresh pool on first use in the child instead.
    global _HASH_POOL
    _HASH_POOL = None


if hasattr(os, "register_at_fork"):  # POSIX; there is no fork on Windows
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


# Fresh hash contexts are copied from these prototypes (the hashlib idiom for a shared
# prefix): copying is several times cheaper than building a context, which counts when a small
# envelope is opened. The prototypes are never updated after this point nor finalized.
_SHA256 = hashes.Hash(hashes.SHA256())
_PAYLOAD_HASH = hashes.Hash(hashes.SHA256())
_PAYLOAD_HASH.update(F.LABEL_PAYLOAD_HASH)


def sha256(*parts: Any) -> bytes:
    """SHA-256 of the concatenation of bytes-like ``parts``."""
    h = _SHA256.copy()
    for part in parts:
        h.update(part)
    return h.finalize()


def nonce(counter: int, last: bool) -> bytes:
    """docs/format.md §4.4: 11-byte big-endian counter, then 0x01 on the last chunk, else 0x00."""
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


class PayloadHash:
    """payload digest = SHA-256(label ‖ SHA-256(chunk_0) ‖ SHA-256(chunk_1) ‖ …)."""

    def __init__(self) -> None:
        self._outer = _PAYLOAD_HASH.copy()
        self._pending: list[Future[bytes]] = []

    def add_inline(self, chunk: Any) -> None:
        self.drain()
        self._outer.update(sha256(chunk))

    def add_async(self, chunk: Any) -> Future[bytes]:
        future = _pool().submit(sha256, chunk)
        self._pending.append(future)
        return future

    def drain(self, keep: int = 0) -> None:
        while len(self._pending) > keep:
            self._outer.update(self._pending.pop(0).result())

    def finalize(self) -> bytes:
        self.drain()
        return self._outer.finalize()


# ----------------------------------------------------------------------------------------------
# chunk producers: (plaintext or ciphertext view, is_last) pairs, from memory or from a stream
# ----------------------------------------------------------------------------------------------


def readfull(src: BinaryIO, view: memoryview) -> int:
    """Fill ``view`` from ``src`` (looping over short reads); return bytes read (< len at EOF)."""
    got = 0
    size = len(view)
    readinto = getattr(src, "readinto", None)
    while got < size:
        if readinto is not None:
            n = readinto(view[got:])
        else:
            block = src.read(size - got)
            n = len(block)
            view[got : got + n] = block
        if not n:
            break
        got += n
    return got


def plain_chunks_from_memory(
    data: memoryview, chunk_size: int
) -> Iterator[tuple[memoryview, bool]]:
    total = len(data)
    if total == 0:
        yield data, True
        return
    for start in range(0, total, chunk_size):
        yield data[start : start + chunk_size], start + chunk_size >= total


def plain_chunks_from_stream(src: BinaryIO, chunk_size: int) -> Iterator[tuple[memoryview, bool]]:
    # Two input buffers: chunk i is yielded only once chunk i+1 was read, which tells whether
    # i is the last one. Buffer i%2 is refilled only after the consumer finished with it.
    bufs = [memoryview(bytearray(chunk_size)), memoryview(bytearray(chunk_size))]
    cur = bufs[0]
    n = readfull(src, cur)
    i = 0
    while True:
        if n < chunk_size:
            yield cur[:n], True
            return
        nxt = bufs[(i + 1) % 2]
        m = readfull(src, nxt)
        yield cur, m == 0
        if m == 0:
            return
        cur, n = nxt, m
        i += 1


def _split_tail(
    tail: memoryview, chunk_len: int, tlen: int, first_index: int
) -> tuple[list[memoryview], memoryview]:
    """Split the last bytes of an envelope into its remaining chunks and the trailer."""
    if len(tail) < tlen + F.TAG_BYTES:
        raise EnvelopeError(F.AUTH_FAILED)
    region, trailer = tail[: len(tail) - tlen], tail[len(tail) - tlen :]
    pieces = [region[s : s + chunk_len] for s in range(0, len(region), chunk_len)]
    last = pieces[-1]
    if len(last) < F.TAG_BYTES or (len(last) == F.TAG_BYTES and first_index + len(pieces) > 1):
        # Only an empty payload may end with an empty chunk (docs/format.md §4.4).
        raise EnvelopeError(F.AUTH_FAILED)
    return pieces, trailer


def cipher_chunks_from_memory(
    view: memoryview, chunk_len: int, tlen: int, trailer_out: list[bytes]
) -> Iterator[tuple[memoryview, bool]]:
    """The ciphertext chunks of an envelope's payload held in memory; the trailer (the last
    ``tlen`` bytes) is appended to ``trailer_out`` before the first chunk is yielded."""
    pieces, trailer = _split_tail(view, chunk_len, tlen, 0)
    trailer_out.append(bytes(trailer))
    for i, piece in enumerate(pieces):
        yield piece, i == len(pieces) - 1


def cipher_chunks_from_stream(
    src: BinaryIO, chunk_len: int, tlen: int, trailer_out: list[bytes]
) -> Iterator[tuple[memoryview, bool]]:
    """The ciphertext chunks read from ``src``; the trailer is appended to ``trailer_out`` once
    the end is reached (before the last chunk is yielded)."""
    # A full chunk is known not to be the last one once more than a trailer's worth of bytes
    # follows it; three buffers let the consumer hash chunk i while i+1 and i+2 are read.
    bufs = [memoryview(bytearray(chunk_len)) for _ in range(3)]
    cur = bufs[0]
    n = readfull(src, cur)
    i = 0
    while True:
        if n == chunk_len:
            nxt = bufs[(i + 1) % 3]
            m = readfull(src, nxt)
            if m > tlen:
                yield cur, False
                cur, n = nxt, m
                i += 1
                continue
            tail = memoryview(bytes(cur) + bytes(nxt[:m]))
        else:
            tail = cur[:n]
        pieces, trailer = _split_tail(tail, chunk_len, tlen, i)
        trailer_out.append(bytes(trailer))
        for j, piece in enumerate(pieces):
            yield piece, j == len(pieces) - 1
        return


# ----------------------------------------------------------------------------------------------
# encrypting and decrypting the chunks
# ----------------------------------------------------------------------------------------------


def encrypt_chunks(
    chunks: Iterator[tuple[memoryview, bool]], dst: BinaryIO, aead: AESGCM, chunk_size: int
) -> bytes:
    """Encrypt and write the chunks; return the payload digest."""
    digest = PayloadHash()
    outbufs: list[memoryview] = []
    for counter, (plain, last) in enumerate(chunks):
        chunk_nonce = nonce(counter, last)
        if last and counter == 0:
            # A single-chunk envelope: no buffers to allocate, hash inline.
            chunk: Any = aead.encrypt(chunk_nonce, plain, None)
            digest.add_inline(chunk)
        else:
            if not outbufs:
                # Output buffers rotate; one is reused only after its hash was collected.
                outbufs = [memoryview(bytearray(chunk_size + F.TAG_BYTES)) for _ in range(3)]
            out = outbufs[counter % 3]
            size = aead.encrypt_into(chunk_nonce, plain, None, out[: len(plain) + F.TAG_BYTES])
            chunk = out[:size]
            digest.add_async(chunk)
        dst.write(chunk)
        digest.drain(keep=1)
    return digest.finalize()


def decrypt_chunks(
    chunks: Iterator[tuple[memoryview, bool]], dst: BinaryIO, aead: AESGCM, chunk_size: int
) -> tuple[bytes, int]:
    """Decrypt and write the chunks; return the payload digest and the plaintext size.

    A chunk that does not open raises the opaque :class:`EnvelopeError`. What was written is
    not authentic until the caller verified the signature over the digest.
    """
    digest = PayloadHash()
    outbufs: list[memoryview] = []
    size = 0
    for counter, (chunk, last) in enumerate(chunks):
        chunk_nonce = nonce(counter, last)
        try:
            if last and counter == 0:
                digest.add_inline(chunk)
                plain: Any = aead.decrypt(chunk_nonce, chunk, None)
            else:
                if not outbufs:
                    outbufs = [memoryview(bytearray(chunk_size)) for _ in range(3)]
                digest.add_async(chunk)
                out = outbufs[counter % 3]
                n = aead.decrypt_into(chunk_nonce, chunk, None, out[: len(chunk) - F.TAG_BYTES])
                plain = out[:n]
        except InvalidTag as exc:
            raise EnvelopeError(F.AUTH_FAILED) from exc
        dst.write(plain)
        size += len(plain)
        digest.drain(keep=1)
    return digest.finalize(), size
