"""Key files (docs/format.md §7): an :class:`~medsecure.Identity` encrypted under a passphrase.

Theory of operation
-------------------
A key file is a header in clear followed by the identity's secret seeds under AES-256-GCM. The key
comes from the passphrase through Argon2id, whose parameters are in the header; the whole header
is the AEAD's associated data, so nothing in it can be changed without the file failing to open.

* **version 2** (written today) also holds the identity's public encoding in the header, so the
  public key can be read *without the passphrase* (:func:`read_public`). Until the file is
  unlocked that public key is only a hint: anyone who can write the file can put another one
  there. On unlock the public key derived from the secret seeds must equal the stored one,
  otherwise the file is refused.
* **version 1** (no public key) is still read by :func:`read`; :func:`read_public` refuses it.

The file is hostile until it has opened: its size is capped before reading, the KDF parameters
are bounded before deriving (a crafted file cannot make loading take minutes or gigabytes), and
only a regular file is read (a FIFO in its place cannot make loading block). Files are written
atomically with mode 0600.

The format rules are the pure functions :func:`encode`, :func:`decode` and :func:`public_of` over
bytes; :func:`write`, :func:`read` and :func:`read_public` are the thin drivers that do the I/O.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import stat
import struct
import unicodedata
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from ._errors import IdentityError
from ._fs import atomic_write
from ._identity import Identity, PublicIdentity
from .envelope import _cbor
from .envelope import _labels as F

__all__ = ["KdfParams", "decode", "encode", "public_of", "read", "read_public", "write"]

_MAGICS = {F.KEYFILE_MAGIC: 1, F.KEYFILE_MAGIC_V2: 2}
_PARAM_KEYS = {1: {1, 2, 3, 4, 5, 6}, 2: {1, 2, 3, 4, 5, 6, 7}}
_LENGTH = struct.Struct(">H")


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost parameters; the defaults follow RFC 9106 §4 (second recommended option)."""

    iterations: int = F.KDF_DEFAULT_ITERATIONS
    memory_kib: int = F.KDF_DEFAULT_MEMORY_KIB
    lanes: int = F.KDF_DEFAULT_LANES

    def check(self, *, error: type[Exception]) -> None:
        """Raise ``error`` unless every parameter is within what a reader accepts."""
        values = (self.iterations, self.memory_kib, self.lanes)
        if (
            not all(isinstance(v, int) and not isinstance(v, bool) for v in values)
            or not 1 <= self.iterations <= F.KDF_MAX_ITERATIONS
            or not 1 <= self.lanes <= F.KDF_MAX_LANES
            or not F.KDF_MIN_MEMORY_KIB <= self.memory_kib <= F.KDF_MAX_MEMORY_KIB
        ):
            raise error(
                "KDF parameters out of bounds: iterations 1.."
                f"{F.KDF_MAX_ITERATIONS}, lanes 1..{F.KDF_MAX_LANES}, memory "
                f"{F.KDF_MIN_MEMORY_KIB}..{F.KDF_MAX_MEMORY_KIB} KiB"
            )

    def derive(self, secret: bytes, salt: bytes) -> bytes:
        """The 32-byte file key (call :meth:`check` first: the costs may come from the file)."""
        kdf = Argon2id(
            salt=salt,
            length=32,
            iterations=self.iterations,
            lanes=self.lanes,
            memory_cost=self.memory_kib,
        )
        return kdf.derive(secret)


@dataclass(frozen=True)
class _Header:
    version: int
    aad: bytes
    """Everything before the ciphertext (magic, length, parameters): authenticated, not secret."""
    kdf: KdfParams
    salt: bytes
    nonce: bytes
    public: bytes | None
    """The public identity's encoding (version 2), unverified until the file is unlocked."""


def passphrase_bytes(passphrase: str | bytes, *, empty: type[Exception]) -> bytes:
    """The passphrase as bytes; an empty one raises ``empty`` (misuse when saving, a refused
    key file when loading)."""
    if isinstance(passphrase, str):
        # NFC so that the same typed passphrase gives the same bytes on every platform.
        secret = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    elif isinstance(passphrase, (bytes, bytearray)):
        secret = bytes(passphrase)
    else:
        raise TypeError("passphrase must be str or bytes")
    if not secret:
        raise empty("the passphrase must not be empty")
    return secret


# --------------------------------------------------------------------------------------------
# the format, on bytes
# --------------------------------------------------------------------------------------------


def encode(identity: Identity, passphrase: str | bytes, kdf: KdfParams | None = None) -> bytes:
    """A version 2 key file holding ``identity`` under ``passphrase``."""
    if not isinstance(identity, Identity):
        raise TypeError("identity must be an Identity")
    secret = passphrase_bytes(passphrase, empty=ValueError)
    kdf = kdf or KdfParams()
    kdf.check(error=ValueError)
    salt = os.urandom(16)
    nonce = os.urandom(F.NONCE_BYTES)
    params = _cbor.encode(
        {
            1: F.KDF_ARGON2ID,
            2: salt,
            3: kdf.iterations,
            4: kdf.memory_kib,
            5: kdf.lanes,
            6: nonce,
            7: identity.public.to_bytes(),
        }
    )
    head = F.KEYFILE_MAGIC_V2 + _LENGTH.pack(len(params)) + params
    key = kdf.derive(secret, salt)
    sealed = AESGCM(key).encrypt(nonce, _cbor.encode(identity._seeds()), F.LABEL_KEYFILE_AAD + head)
    return head + sealed


def _parse_header(blob: bytes, name: str) -> tuple[_Header, bytes]:
    """Split a key file into its checked header and its ciphertext (nothing is decrypted)."""
    if len(blob) > F.KEYFILE_MAX_BYTES:
        raise IdentityError(f"{name!r} is not a medsecure key file (too large)")
    magic = blob[: len(F.KEYFILE_MAGIC)]
    version = _MAGICS.get(magic)
    if version is None:
        raise IdentityError(f"{name!r} is not a medsecure key file")
    start = len(magic) + _LENGTH.size
    if len(blob) < start:
        raise IdentityError(f"key file {name!r} is truncated")
    (plen,) = _LENGTH.unpack_from(blob, len(magic))
    if len(blob) < start + plen + F.TAG_BYTES:
        raise IdentityError(f"key file {name!r} is truncated")
    params = _cbor.decode(blob[start : start + plen], error=IdentityError, what="key file")
    if not isinstance(params, dict) or set(params) != _PARAM_KEYS[version]:
        raise IdentityError(f"key file {name!r} is damaged (bad parameters)")
    alg, salt, iterations, memory, lanes, nonce = (params[k] for k in range(1, 7))
    if alg != F.KDF_ARGON2ID or not isinstance(salt, bytes) or not isinstance(nonce, bytes):
        raise IdentityError(f"key file {name!r} uses an unsupported KDF")
    if not (16 <= len(salt) <= 64) or len(nonce) != F.NONCE_BYTES:
        raise IdentityError(f"key file {name!r} is damaged (bad parameters)")
    public = params.get(7)
    if public is not None and not isinstance(public, bytes):
        raise IdentityError(f"key file {name!r} is damaged (bad public key)")
    kdf = KdfParams(iterations, memory, lanes)
    kdf.check(error=IdentityError)
    header = _Header(version, blob[: start + plen], kdf, salt, nonce, public)
    return header, blob[start + plen :]


def decode(blob: bytes, passphrase: str | bytes, *, name: str = "<bytes>") -> Identity:
    """Open a key file (version 1 or 2) with ``passphrase``; ``name`` only labels errors.

    Raises :class:`IdentityError` for an empty or wrong passphrase and for a truncated, damaged
    or foreign file, including a version 2 file whose clear public key is not the one its secret
    seeds give.
    """
    secret = passphrase_bytes(passphrase, empty=IdentityError)
    header, sealed = _parse_header(blob, name)
    key = header.kdf.derive(secret, header.salt)
    try:
        plain = AESGCM(key).decrypt(header.nonce, sealed, F.LABEL_KEYFILE_AAD + header.aad)
    except InvalidTag as exc:
        raise IdentityError(
            f"cannot decrypt key file {name!r}: wrong passphrase or damaged file"
        ) from exc
    seeds = _cbor.decode(plain, error=IdentityError, what="key file contents")
    try:
        identity = Identity._from_seed_map(seeds)
    except IdentityError as exc:
        raise IdentityError(f"key file {name!r} is damaged ({exc})") from exc
    # The AEAD already authenticates the clear public key together with the seeds; this check
    # catches a file sealed by a writer (holding the passphrase) that put the wrong one there.
    if header.public is not None and not hmac.compare_digest(
        header.public, identity.public.to_bytes()
    ):
        raise IdentityError(
            f"key file {name!r} is damaged (its public key is not the one of its secret key)"
        )
    return identity


def public_of(blob: bytes, *, name: str = "<bytes>") -> PublicIdentity:
    """The public identity a version 2 key file declares, read without the passphrase.

    Only a hint until the file is unlocked (see the module docstring). Raises
    :class:`IdentityError` for a version 1 file, which does not hold it, and for a damaged one.
    """
    header, _ = _parse_header(blob, name)
    if header.public is None:
        raise IdentityError(
            f"key file {name!r} is in the version 1 format, which does not hold the public key: "
            "unlock it with its passphrase (saving it again writes the current format)"
        )
    try:
        return PublicIdentity.from_bytes(header.public)
    except IdentityError as exc:
        raise IdentityError(f"key file {name!r} is damaged (bad public key: {exc})") from exc


# --------------------------------------------------------------------------------------------
# the drivers
# --------------------------------------------------------------------------------------------


def write(
    identity: Identity,
    path: str | os.PathLike[str],
    *,
    passphrase: str | bytes,
    kdf: KdfParams | None = None,
) -> None:
    """Write ``identity`` to ``path`` encrypted under ``passphrase`` (mode 0600, atomic)."""
    blob = encode(identity, passphrase, kdf)
    try:
        atomic_write(path, blob, mode=0o600)
    except OSError as exc:
        raise IdentityError(f"cannot write key file {os.fspath(path)!r}: {exc.strerror}") from exc


def _read_bytes(path: str | os.PathLike[str]) -> tuple[bytes, str]:
    """At most ``KEYFILE_MAX_BYTES + 1`` bytes of the regular file at ``path``."""
    name = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        raise IdentityError(f"key file {name!r} does not exist") from exc
    except OSError as exc:
        raise IdentityError(f"cannot read key file {name!r}: {exc.strerror}") from exc
    try:
        # Non-blocking open then fstat: a FIFO or a device put in the key file's place is
        # refused instead of blocking or streaming forever.
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IdentityError(f"{name!r} is not a medsecure key file (not a regular file)")
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            return fh.read(F.KEYFILE_MAX_BYTES + 1), name
    except OSError as exc:
        raise IdentityError(f"cannot read key file {name!r}: {exc.strerror}") from exc
    finally:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def read(path: str | os.PathLike[str], *, passphrase: str | bytes) -> Identity:
    """Read and open the key file at ``path`` (see :func:`decode`)."""
    passphrase_bytes(passphrase, empty=IdentityError)  # misuse and emptiness before any I/O
    blob, name = _read_bytes(path)
    return decode(blob, passphrase, name=name)


def read_public(path: str | os.PathLike[str]) -> PublicIdentity:
    """The public identity stored in clear in the key file at ``path``, without its passphrase.

    A hint until the key is unlocked: :meth:`Identity.load` checks it against the secret key.
    Raises :class:`IdentityError` for a missing, foreign or damaged file and for a version 1
    file (which does not hold its public key: load it with its passphrase instead).
    """
    blob, name = _read_bytes(path)
    return public_of(blob, name=name)
