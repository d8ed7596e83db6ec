"""The message inside an envelope: a manifest (canonical CBOR) followed by the documents' bytes.

Everything a reader of the message sees — subject, body, file names, titles, the patient — is
in the manifest, inside the envelope; transports only ever see routing data (recipient mailbox,
envelope size, message id).

Plaintext layout (docs/format.md §10)::

    "MEDSECM" 0x01 ‖ uint32(len(manifest)) ‖ manifest ‖ document_0 ‖ … ‖ document_n

The manifest lists each document's size, so documents are byte ranges of the plaintext and
stream in and out with bounded memory.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from . import _cbor
from ._document import Document
from ._errors import EnvelopeError, StorageError
from .identifiers import parse

__all__ = ["Manifest", "MessageReader", "new_message_id", "parse_manifest"]

MESSAGE_MAGIC = b"MEDSECM\x01"
MAX_MANIFEST = 1 << 20
MAX_DOCUMENTS = 1000
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
MESSAGE_ID_RE = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")


def new_message_id(now: dt.datetime) -> str:
    """A unique, sortable message id: 48-bit milliseconds then 80 random bits (ULID layout)."""
    ms = int(now.timestamp() * 1000)
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


@dataclass(frozen=True)
class Manifest:
    """The authenticated description of a message."""

    message_id: str
    created: dt.datetime
    sender_idnps: str | None
    recipients: tuple[str, ...]
    subject: str | None
    body: str | None
    in_reply_to: str | None
    documents: tuple[dict[str, Any], ...]
    receipts: tuple[str, ...] = ()
    kind: str = "message"
    extra: dict[str, Any] | None = None

    def encode(self) -> bytes:
        fields: dict[int, Any] = {
            1: 1,
            2: self.message_id,
            3: int(self.created.timestamp() * 1000),
            5: list(self.recipients),
            9: [dict(d) for d in self.documents],
            10: list(self.receipts),
            11: self.kind,
        }
        for key, value in (
            (4, self.sender_idnps),
            (6, self.subject),
            (7, self.body),
            (8, self.in_reply_to),
            (12, self.extra),
        ):
            if value is not None:
                fields[key] = value
        return _cbor.encode(fields)

    @property
    def total_size(self) -> int:
        return sum(int(d["size"]) for d in self.documents)


def _check_doc(entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict) or not all(isinstance(k, str) for k in entry):
        raise EnvelopeError("malformed message: bad document entry")
    size = entry.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise EnvelopeError("malformed message: bad document size")
    for name in ("id", "media_type"):
        if not isinstance(entry.get(name), str):
            raise EnvelopeError("malformed message: bad document entry")
    for name in ("filename", "title", "author", "replaces", "created"):
        if name in entry and not isinstance(entry[name], str):
            raise EnvelopeError("malformed message: bad document entry")
    fname = entry.get("filename")
    if fname is not None and (
        "/" in fname or "\\" in fname or fname in (".", "..") or "\x00" in fname
    ):
        raise EnvelopeError("malformed message: unsafe file name")
    return entry


def parse_manifest(raw: bytes) -> Manifest:
    """Validate a decoded manifest (raises EnvelopeError with a structural message)."""
    f = _cbor.decode(raw, error=EnvelopeError, what="message manifest")
    if not isinstance(f, dict) or f.get(1) != 1:
        raise EnvelopeError("malformed message: unsupported manifest")
    allowed = set(range(1, 13))
    if not {1, 2, 3, 5, 9, 10, 11} <= set(f) <= allowed:
        raise EnvelopeError("malformed message: unexpected manifest fields")
    mid = f[2]
    if not isinstance(mid, str) or not MESSAGE_ID_RE.fullmatch(mid):
        raise EnvelopeError("malformed message: bad message id")
    if not isinstance(f[3], int) or isinstance(f[3], bool) or not 0 <= f[3] < 1 << 48:
        raise EnvelopeError("malformed message: bad creation time")
    for key in (4, 6, 7, 8):
        if key in f and not isinstance(f[key], str):
            raise EnvelopeError("malformed message: bad text field")
    if not isinstance(f[5], list) or not all(isinstance(x, str) for x in f[5]):
        raise EnvelopeError("malformed message: bad recipients")
    if 4 in f:
        try:
            if not parse(f[4]).is_professional:
                raise ValueError("not a professional")
        except ValueError as exc:
            raise EnvelopeError("malformed message: the sender's identifier is malformed") from exc
    docs = f[9]
    if not isinstance(docs, list) or len(docs) > MAX_DOCUMENTS:
        raise EnvelopeError("malformed message: bad documents")
    if not isinstance(f[10], list) or not all(r in ("delivered", "read") for r in f[10]):
        raise EnvelopeError("malformed message: bad receipt request")
    if f[11] not in ("message", "receipt"):
        raise EnvelopeError("malformed message: unknown kind")
    extra = f.get(12)
    if extra is not None and not isinstance(extra, dict):
        raise EnvelopeError("malformed message: bad extra")
    return Manifest(
        message_id=mid,
        created=dt.datetime.fromtimestamp(f[3] / 1000, dt.UTC),
        sender_idnps=f.get(4),
        recipients=tuple(f[5]),
        subject=f.get(6),
        body=f.get(7),
        in_reply_to=f.get(8),
        documents=tuple(_check_doc(d) for d in docs),
        receipts=tuple(f[10]),
        kind=f[11],
        extra=extra,
    )


class MessageReader(io.RawIOBase):
    """The plaintext of a message as one stream: header, manifest, then each document's bytes.

    A document read from a file must keep the size it had when the message was built;
    a file that shrank or grew meanwhile raises StorageError (the message is not sent).
    """

    def __init__(
        self,
        manifest: Manifest,
        documents: Sequence[Document],
        *,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()
        self._progress = progress
        raw = manifest.encode()
        if len(raw) > MAX_MANIFEST:
            raise ValueError(
                "message metadata too large (subject, body and document descriptions exceed 1 MiB)"
            )
        self._head = io.BytesIO(MESSAGE_MAGIC + struct.pack(">I", len(raw)) + raw)
        self._docs = list(zip(documents, (int(d["size"]) for d in manifest.documents), strict=True))
        self._current: BinaryIO | None = None
        self._left = 0
        self._index = -1
        self.total = len(self._head.getbuffer()) + manifest.total_size

    def readable(self) -> bool:
        return True

    def _next(self) -> bool:
        if self._current is not None:
            extra = self._current.read(1)
            self._current.close()
            self._current = None
            if extra:
                raise StorageError("a document changed while it was being sent (it grew)")
        self._index += 1
        if self._index >= len(self._docs):
            return False
        doc, size = self._docs[self._index]
        try:
            self._current = doc.open()
        except OSError as exc:
            raise StorageError(f"cannot read a document: {exc.strerror}") from exc
        self._left = size
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        n = self._head.readinto(view)
        if n:
            return n
        while True:
            if self._current is None or self._left == 0:
                if not self._next():
                    return 0
                if self._left == 0:
                    continue
            assert self._current is not None
            want = min(len(view), self._left)
            got = self._current.readinto(view[:want])  # type: ignore[attr-defined]
            if not got:
                raise StorageError("a document changed while it was being sent (it shrank)")
            self._left -= got
            if self._progress is not None:
                self._progress(got)
            return int(got)

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
        super().close()


def read_manifest(fh: BinaryIO, total: int) -> tuple[Manifest, int]:
    """Read the manifest at the start of a message plaintext; return it and the data offset."""
    head = fh.read(len(MESSAGE_MAGIC) + 4)
    if len(head) != len(MESSAGE_MAGIC) + 4 or head[: len(MESSAGE_MAGIC)] != MESSAGE_MAGIC:
        raise EnvelopeError("malformed message: not a medsecure message")
    (mlen,) = struct.unpack(">I", head[len(MESSAGE_MAGIC) :])
    if mlen > MAX_MANIFEST:
        raise EnvelopeError("malformed message: manifest too large")
    raw = fh.read(mlen)
    if len(raw) != mlen:
        raise EnvelopeError("malformed message: truncated manifest")
    manifest = parse_manifest(raw)
    offset = len(head) + mlen
    if manifest.total_size != total - offset:
        raise EnvelopeError("malformed message: document sizes do not add up")
    return manifest, offset
