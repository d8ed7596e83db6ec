"""The sealed envelope, format v1 (docs/format.md): header, seal and unseal, in memory and streaming.

Theory of operation
-------------------
Sans-I/O: this module reads and writes only the file objects it is given; it never opens
sockets, reads clocks or environment variables, or picks paths of its own (the one exception is
:func:`unseal_stream` given a *path*, where it creates a temporary file beside that path so the
result appears only once authentic).

Sealing draws one random content key (CK) and a 32-byte salt, derives with HKDF-SHA256 the
payload key, the key commitment, the sender-block key and the trailer key, wraps CK once per
recipient with HPKE base mode (the ``info`` binds version, suite, chunk size, salt, commitment,
encrypted sender and the recipient's fingerprint), then encrypts the payload once as STREAM
chunks of AES-256-GCM (nonce = 88-bit counter ‖ last-chunk flag). Each chunk's ciphertext is
hashed; the sender signs ``label ‖ SHA-256(framed header) ‖ payload digest ‖ sender fingerprint``
and the signatures travel encrypted in a fixed-length trailer.

Opening finds the recipient's stanza by fingerprint, unwraps CK, checks the commitment *before*
any payload is decrypted (so every recipient reads the same document), decrypts and hashes the
chunks as they stream, and verifies the signatures at the end. Output written to a caller's
stream before the call returns is therefore not yet authentic; output to a path appears only
after everything verified.

Every failure while parsing untrusted bytes becomes an :class:`EnvelopeError`; authentication
failures share one opaque message. The STREAM framing of the payload (chunking, nonces, the
payload digest) is in :mod:`._stream`; every label and size is quoted from :mod:`._labels`.
"""

from __future__ import annotations

import hmac
import io
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from .._errors import EnvelopeError, MedsecureError, NotARecipient, SenderMismatch, StorageError
from .._fs import atomic_output
from .._identity import Identity, PublicIdentity, _fingerprint_text, hpke_suite
from . import _cbor
from . import _labels as F
from ._stream import (
    cipher_chunks_from_memory,
    cipher_chunks_from_stream,
    decrypt_chunks,
    encrypt_chunks,
    plain_chunks_from_memory,
    plain_chunks_from_stream,
    readfull,
    sha256,
)

__all__ = ["Unsealed", "envelope_id", "seal", "seal_stream", "unseal", "unseal_stream"]

_AUTH_FAILED = F.AUTH_FAILED
_ZERO_NONCE = bytes(F.NONCE_BYTES)
_FRAME = struct.Struct(">I")


_SHA256 = hashes.SHA256()


def _hkdf_expand(prk: bytes, label: bytes) -> bytes:
    return HKDFExpand(algorithm=_SHA256, length=32, info=label).derive(prk)


# docs/format.md §4.6: the trailer's length is fixed by the sender's suite.
_TRAILER_PLAIN_LENGTH = {
    F.SUITE_HYBRID: len(
        _cbor.encode([bytes(F.ED25519_SIGNATURE_BYTES), bytes(F.MLDSA65_SIGNATURE_BYTES)])
    ),
    F.SUITE_CLASSIC: len(_cbor.encode([bytes(F.ED25519_SIGNATURE_BYTES)])),
}


def _trailer_plain_length(sender_suite: str) -> int:
    return _TRAILER_PLAIN_LENGTH[sender_suite]


def _chunk_size_ok(value: object) -> bool:
    """docs/format.md §3: a power of two between 2^14 and 2^22."""
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and F.MIN_CHUNK_SIZE <= value <= F.MAX_CHUNK_SIZE
        and not value & (value - 1)
    )


def _header_budget(max_recipients: int) -> int:
    return F.HEADER_FIXED_BUDGET + max_recipients * F.HEADER_PER_RECIPIENT_BUDGET


def _hpke_info(
    suite: str, chunk_size: int, salt: bytes, commitment: bytes, sender_block: bytes, fp: bytes
) -> bytes:
    return F.LABEL_HPKE_INFO + _cbor.encode(
        [F.FORMAT_VERSION, suite, chunk_size, salt, commitment, sender_block, fp]
    )


class _Keys:
    """docs/format.md §4.1: the four keys derived from the content key.

    Each is HKDF(ikm=CK, salt=salt, info=label); the four share their extract step (RFC 5869
    §2.2, the same PRK for the same salt and key material), so it runs once.
    """

    __slots__ = ("commitment", "payload", "sender", "trailer")

    def __init__(self, ck: bytes, salt: bytes) -> None:
        prk = HKDF.extract(_SHA256, salt, ck)
        self.payload = AESGCM(_hkdf_expand(prk, F.LABEL_PAYLOAD_KEY))
        self.commitment = _hkdf_expand(prk, F.LABEL_COMMITMENT)
        self.sender = AESGCM(_hkdf_expand(prk, F.LABEL_SENDER_KEY))
        self.trailer = AESGCM(_hkdf_expand(prk, F.LABEL_TRAILER_KEY))


def _transcript(header_hash: bytes, payload_digest: bytes, sender: PublicIdentity) -> bytes:
    return F.LABEL_SIGNATURE + header_hash + payload_digest + sender.fingerprint_bytes


@dataclass(frozen=True)
class Unsealed:
    """The result of opening an envelope.

    ``data`` holds the plaintext for :func:`unseal`; it is ``None`` for :func:`unseal_stream`,
    which wrote the plaintext to its destination. ``sender`` is the verified signer.
    ``recipients`` lists the fingerprints of exactly the recipients the sender listed (the sender
    is not added implicitly).
    """

    data: bytes | None
    sender: PublicIdentity
    recipients: tuple[str, ...]
    suite: str
    size: int


# ----------------------------------------------------------------------------------------------
# sealing
# ----------------------------------------------------------------------------------------------


def _check_seal_args(
    sender: object,
    recipients: object,
    allow_classic: bool,
    chunk_size: int,
    max_recipients: int,
) -> tuple[list[PublicIdentity], str]:
    if not isinstance(sender, Identity):
        raise TypeError("sender must be an Identity")
    if isinstance(recipients, (PublicIdentity, str, bytes)) or not isinstance(recipients, Iterable):
        raise TypeError("recipients must be a sequence of PublicIdentity")
    unique: dict[bytes, PublicIdentity] = {}
    for r in recipients:
        if not isinstance(r, PublicIdentity):
            raise TypeError("every recipient must be a PublicIdentity")
        unique.setdefault(r.fingerprint_bytes, r)
    listed = list(unique.values())
    if not listed:
        raise ValueError("at least one recipient is required")
    if len(listed) > max_recipients:
        raise ValueError(f"too many recipients: {len(listed)} > max_recipients={max_recipients}")
    if not _chunk_size_ok(chunk_size):
        raise ValueError(
            f"chunk_size must be a power of two in [{F.MIN_CHUNK_SIZE}, {F.MAX_CHUNK_SIZE}]"
        )
    parties = [sender.public, *listed]
    if all(p.suite == F.SUITE_HYBRID for p in parties):
        suite = F.SUITE_HYBRID
    else:
        if not allow_classic and any(p.suite == F.SUITE_HYBRID for p in parties):
            raise ValueError(
                "a classic (non post-quantum) party would downgrade this envelope: "
                "pass allow_classic=True to accept a classic envelope"
            )
        suite = F.SUITE_CLASSIC
    return listed, suite


def _seal(
    chunks: Iterator[tuple[memoryview, bool]] | None,
    src: BinaryIO | None,
    dst: BinaryIO,
    sender: Identity,
    recipients: Sequence[PublicIdentity],
    allow_classic: bool,
    chunk_size: int,
    max_recipients: int,
    random: Callable[[int], bytes],
) -> None:
    listed, suite = _check_seal_args(sender, recipients, allow_classic, chunk_size, max_recipients)
    ck = random(F.CONTENT_KEY_BYTES)
    salt = random(F.SALT_BYTES)
    keys = _Keys(ck, salt)
    sender_block = keys.sender.encrypt(_ZERO_NONCE, sender.public.to_bytes(), None)
    stanzas = []
    for r in listed:
        fp = r.fingerprint_bytes
        info = _hpke_info(suite, chunk_size, salt, keys.commitment, sender_block, fp)
        wrapped = hpke_suite(r.suite).encrypt(ck, r._hpke_key(), info=info)
        stanzas.append([fp, F.KEM_FOR_SUITE[r.suite], wrapped])
    header = _cbor.encode(
        {
            1: F.FORMAT_VERSION,
            2: suite,
            3: chunk_size,
            4: salt,
            5: stanzas,
            6: keys.commitment,
            7: sender_block,
        }
    )
    framed = F.ENVELOPE_MAGIC + _FRAME.pack(len(header)) + header
    try:
        dst.write(framed)
        if chunks is None:
            assert src is not None
            chunks = plain_chunks_from_stream(src, chunk_size)
        payload_digest = encrypt_chunks(chunks, dst, keys.payload, chunk_size)
        transcript = _transcript(sha256(framed), payload_digest, sender.public)
        trailer = _cbor.encode(sender._sign(transcript))
        dst.write(keys.trailer.encrypt(_ZERO_NONCE, trailer, None))
    except OSError as exc:
        raise StorageError(f"I/O error while sealing: {exc.strerror or exc}") from exc


def seal_stream(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    sender: Identity,
    recipients: Sequence[PublicIdentity],
    allow_classic: bool = False,
    chunk_size: int = F.DEFAULT_CHUNK_SIZE,
    max_recipients: int = F.DEFAULT_MAX_RECIPIENTS,
    _random: Callable[[int], bytes] = os.urandom,
) -> None:
    """Seal everything read from ``src`` into ``dst`` for ``recipients``, signed by ``sender``.

    Memory stays bounded (a few chunks) whatever the size. If any party is ``"classic"`` while
    another is ``"hybrid"``, the envelope would be only classically secure: that is refused
    unless ``allow_classic=True``. ``_random`` is a test-only hook (deterministic vectors).
    """
    _seal(None, src, dst, sender, recipients, allow_classic, chunk_size, max_recipients, _random)


def seal(
    data: bytes,
    *,
    sender: Identity,
    recipients: Sequence[PublicIdentity],
    allow_classic: bool = False,
    chunk_size: int = F.DEFAULT_CHUNK_SIZE,
    max_recipients: int = F.DEFAULT_MAX_RECIPIENTS,
    _random: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """Seal ``data`` for ``recipients``, signed by ``sender``; return the envelope bytes."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("data must be bytes")
    out = io.BytesIO()
    view = memoryview(data).cast("B")
    chunks = plain_chunks_from_memory(view, chunk_size) if isinstance(chunk_size, int) else None
    _seal(chunks, None, out, sender, recipients, allow_classic, chunk_size, max_recipients, _random)
    return out.getvalue()


# ----------------------------------------------------------------------------------------------
# opening
# ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Opened:
    """What opening the header established (the sender is decrypted, not yet verified)."""

    keys: _Keys
    framed_hash: bytes
    chunk_size: int
    suite: str
    sender: PublicIdentity
    recipients: tuple[str, ...]


_PREFIX_BYTES = len(F.ENVELOPE_MAGIC) + _FRAME.size


def _read_exact(src: BinaryIO, n: int) -> bytes:
    buf = bytearray(n)
    got = readfull(src, memoryview(buf))
    if got != n:
        raise EnvelopeError("envelope is truncated")
    return bytes(buf)


def _take(view: memoryview, start: int, end: int) -> bytes:
    """``view[start:end]`` of an envelope held in memory, which must be that long."""
    if len(view) < end:
        raise EnvelopeError("envelope is truncated")
    return bytes(view[start:end])


def _header_length(prefix: bytes, max_recipients: int) -> int:
    """docs/format.md §2: the magic, then the header length, bounded before it is read."""
    if prefix[: len(F.ENVELOPE_MAGIC)] != F.ENVELOPE_MAGIC:
        if prefix[:6] == F.ENVELOPE_MAGIC[:6]:
            raise EnvelopeError("unsupported medsecure envelope version")
        raise EnvelopeError("not a medsecure envelope")
    (hlen,) = _FRAME.unpack(prefix[len(F.ENVELOPE_MAGIC) :])
    if hlen > _header_budget(max_recipients):
        raise EnvelopeError("envelope header too large")
    return int(hlen)


def _open_header(
    prefix: bytes,
    header_bytes: bytes,
    identity: Identity,
    expected_sender: PublicIdentity | None,
    max_recipients: int,
) -> _Opened:
    header = _cbor.decode(header_bytes, error=EnvelopeError, what="envelope header")
    if not isinstance(header, dict) or set(header) != {1, 2, 3, 4, 5, 6, 7}:
        raise EnvelopeError("malformed envelope header: unexpected fields")
    version, suite, chunk_size, salt = header[1], header[2], header[3], header[4]
    stanzas, commitment, sender_block = header[5], header[6], header[7]
    if version != F.FORMAT_VERSION:
        raise EnvelopeError("unsupported medsecure envelope version")
    if suite not in F.SUITES:
        raise EnvelopeError("malformed envelope header: unknown suite")
    if not _chunk_size_ok(chunk_size):
        raise EnvelopeError("malformed envelope header: bad chunk size")
    if not (isinstance(salt, bytes) and len(salt) == F.SALT_BYTES):
        raise EnvelopeError("malformed envelope header: bad salt")
    if not (isinstance(commitment, bytes) and len(commitment) == F.COMMITMENT_BYTES):
        raise EnvelopeError("malformed envelope header: bad commitment")
    if not isinstance(sender_block, bytes) or len(sender_block) > 8192:
        raise EnvelopeError("malformed envelope header: bad sender block")
    if not isinstance(stanzas, list) or not 1 <= len(stanzas) <= max_recipients:
        raise EnvelopeError("malformed envelope header: bad recipient count")
    fingerprints: list[bytes] = []
    mine: list[Any] | None = None
    for stanza in stanzas:
        if not (isinstance(stanza, list) and len(stanza) == 3):
            raise EnvelopeError("malformed envelope header: bad recipient entry")
        fp, kem, wrapped = stanza
        if not (isinstance(fp, bytes) and len(fp) == F.FINGERPRINT_BYTES):
            raise EnvelopeError("malformed envelope header: bad recipient fingerprint")
        if kem not in F.HPKE_WRAPPED_BYTES or isinstance(kem, bool):
            raise EnvelopeError("malformed envelope header: unknown KEM")
        if not (isinstance(wrapped, bytes) and len(wrapped) == F.HPKE_WRAPPED_BYTES[kem]):
            raise EnvelopeError("malformed envelope header: bad wrapped key length")
        if suite == F.SUITE_HYBRID and kem != F.KEM_MLKEM768_X25519:
            raise EnvelopeError("malformed envelope header: classic recipient in hybrid envelope")
        fingerprints.append(fp)
        if hmac.compare_digest(fp, identity.public.fingerprint_bytes):
            mine = stanza
    if len(set(fingerprints)) != len(fingerprints):
        raise EnvelopeError("malformed envelope header: duplicate recipient")
    if mine is None:
        raise NotARecipient("this envelope is not addressed to this identity")
    if mine[1] != F.KEM_FOR_SUITE[identity.suite]:
        raise EnvelopeError(_AUTH_FAILED)
    info = _hpke_info(suite, chunk_size, salt, commitment, sender_block, mine[0])
    try:
        ck = hpke_suite(identity.suite).decrypt(mine[2], identity._hpke_key(), info=info)
    except (InvalidTag, ValueError) as exc:
        raise EnvelopeError(_AUTH_FAILED) from exc
    keys = _Keys(ck, salt)
    # Key commitment (docs/format.md §4.3), checked before any payload byte is decrypted.
    if not hmac.compare_digest(keys.commitment, commitment):
        raise EnvelopeError(_AUTH_FAILED)
    try:
        sender_bytes = keys.sender.decrypt(_ZERO_NONCE, sender_block, None)
    except InvalidTag as exc:
        raise EnvelopeError(_AUTH_FAILED) from exc
    try:
        if expected_sender is not None and expected_sender.to_bytes() == sender_bytes:
            sender = expected_sender
        else:
            sender = PublicIdentity._from_bytes_cached(sender_bytes)
    except MedsecureError as exc:
        raise EnvelopeError(_AUTH_FAILED) from exc
    if suite == F.SUITE_HYBRID and sender.suite != F.SUITE_HYBRID:
        raise EnvelopeError(_AUTH_FAILED)
    if (
        suite == F.SUITE_CLASSIC
        and sender.suite == F.SUITE_HYBRID
        and all(s[1] == F.KEM_MLKEM768_X25519 for s in stanzas)
    ):
        raise EnvelopeError("malformed envelope header: hybrid envelope labelled classic")
    if expected_sender is not None and sender != expected_sender:
        raise SenderMismatch("the envelope was not sealed by the expected sender")
    return _Opened(
        keys=keys,
        framed_hash=sha256(prefix, header_bytes),
        chunk_size=chunk_size,
        suite=suite,
        sender=sender,
        recipients=tuple(_fingerprint_text(fp) for fp in fingerprints),
    )


def _decrypt_chunks(
    chunks: Iterator[tuple[memoryview, bool]], dst: BinaryIO, opened: _Opened, trailer: list[bytes]
) -> int:
    """Decrypt and write the STREAM chunks; verify the trailer. Return the plaintext size."""
    payload_digest, size = decrypt_chunks(chunks, dst, opened.keys.payload, opened.chunk_size)
    try:
        trailer_plain = opened.keys.trailer.decrypt(_ZERO_NONCE, trailer[0], None)
    except InvalidTag as exc:
        raise EnvelopeError(_AUTH_FAILED) from exc
    signatures = _cbor.decode(trailer_plain, error=EnvelopeError, what="envelope trailer")
    if not isinstance(signatures, list) or not all(isinstance(s, bytes) for s in signatures):
        raise EnvelopeError(_AUTH_FAILED)
    transcript = _transcript(opened.framed_hash, payload_digest, opened.sender)
    if not opened.sender._verify(transcript, signatures):
        raise EnvelopeError(_AUTH_FAILED)
    return size


def envelope_id(src: BinaryIO, *, max_recipients: int = F.DEFAULT_MAX_RECIPIENTS) -> str:
    """SHA-256 (hex) of an envelope's framed header: unique per envelope (the header holds a
    random salt) and read without going through the payload. Not an authentication: a
    tampered payload keeps the id, so only verified envelopes may be deduplicated on it."""
    prefix = _read_exact(src, _PREFIX_BYTES)
    return sha256(prefix, _read_exact(src, _header_length(prefix, max_recipients))).hex()


def _check_open_args(identity: object, expected_sender: object) -> None:
    if not isinstance(identity, Identity):
        raise TypeError("identity must be an Identity")
    if expected_sender is not None and not isinstance(expected_sender, PublicIdentity):
        raise TypeError("expected_sender must be a PublicIdentity or None")


def _unseal_into(
    src: BinaryIO | memoryview,
    dst: BinaryIO,
    identity: Identity,
    expected_sender: PublicIdentity | None,
    max_recipients: int,
) -> tuple[_Opened, int]:
    """Open the envelope read from ``src`` (a stream, or the whole envelope in memory) into
    ``dst``; return what the header established and the plaintext size."""
    try:
        if isinstance(src, memoryview):
            prefix = _take(src, 0, _PREFIX_BYTES)
            end = _PREFIX_BYTES + _header_length(prefix, max_recipients)
            header_bytes = _take(src, _PREFIX_BYTES, end)
        else:
            prefix = _read_exact(src, _PREFIX_BYTES)
            header_bytes = _read_exact(src, _header_length(prefix, max_recipients))
        opened = _open_header(prefix, header_bytes, identity, expected_sender, max_recipients)
        chunk_len = opened.chunk_size + F.TAG_BYTES
        tlen = _trailer_plain_length(opened.sender.suite) + F.TAG_BYTES
        trailer: list[bytes] = []
        if isinstance(src, memoryview):
            chunks = cipher_chunks_from_memory(src[end:], chunk_len, tlen, trailer)
        else:
            chunks = cipher_chunks_from_stream(src, chunk_len, tlen, trailer)
        size = _decrypt_chunks(chunks, dst, opened, trailer)
    except MedsecureError:
        raise
    except OSError as exc:
        raise StorageError(f"I/O error while opening an envelope: {exc.strerror or exc}") from exc
    except (MemoryError, RecursionError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise EnvelopeError("malformed envelope") from exc
    return opened, size


def _result(opened: _Opened, size: int, data: bytes | None) -> Unsealed:
    return Unsealed(
        data=data, sender=opened.sender, recipients=opened.recipients, suite=opened.suite, size=size
    )


def unseal_stream(
    src: BinaryIO,
    dst: str | os.PathLike[str] | BinaryIO,
    *,
    identity: Identity,
    expected_sender: PublicIdentity | None = None,
    max_recipients: int = F.DEFAULT_MAX_RECIPIENTS,
) -> Unsealed:
    """Open an envelope read from ``src``, writing the plaintext to ``dst``.

    Given a path, the file appears there only after the whole envelope verified (temporary file
    in the same folder, fsync, rename); on failure nothing new is left at the path and an
    existing file stays untouched.

    Given a binary stream, plaintext is written as it is decrypted: **what was written is not
    authentic until this call returns**; on an exception, discard it.
    """
    _check_open_args(identity, expected_sender)
    if isinstance(dst, (str, os.PathLike)):
        try:
            with atomic_output(Path(dst), mode=0o600) as fh:
                opened, size = _unseal_into(src, fh, identity, expected_sender, max_recipients)
        except OSError as exc:
            # the path is not repeated: a document's file name may name the patient
            raise StorageError(f"cannot write the output file: {exc.strerror or exc}") from exc
    else:
        opened, size = _unseal_into(src, dst, identity, expected_sender, max_recipients)
    return _result(opened, size, None)


def unseal(
    envelope: bytes,
    *,
    identity: Identity,
    expected_sender: PublicIdentity | None = None,
    max_recipients: int = F.DEFAULT_MAX_RECIPIENTS,
) -> Unsealed:
    """Open an envelope held in memory; return the verified plaintext and sender."""
    if not isinstance(envelope, (bytes, bytearray, memoryview)):
        raise TypeError("envelope must be bytes")
    _check_open_args(identity, expected_sender)
    view = memoryview(envelope).cast("B")
    out = io.BytesIO()
    opened, size = _unseal_into(view, out, identity, expected_sender, max_recipients)
    return _result(opened, size, out.getvalue())
