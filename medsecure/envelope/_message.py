"""The message inside an envelope: a manifest (canonical CBOR) followed by the documents' bytes.

Everything a reader of the message sees — subject, body, file names, titles, the patient — is
in the manifest, inside the envelope; transports only ever see routing data (recipient mailbox,
envelope size, message id).

Plaintext layout (docs/format.md §10)::

    "MEDSECM" 0x01 ‖ uint32(len(manifest)) ‖ manifest ‖ document_0 ‖ … ‖ document_n

The manifest lists each document's size, so documents are byte ranges of the plaintext and
stream in and out with bounded memory.

This module checks the manifest's *structure* completely: every field of its type and within
its bounds. It loads no model (the envelope core stays below the models layer); what needs the
models — the sender's identifier being a practitioner's, a document's patient and type — is
checked by the inbox right after :func:`read_manifest`, before anything uses the manifest.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from .._errors import EnvelopeError, StorageError
from . import _cbor
from . import _labels as F
from ._labels import MAX_DOCUMENTS, MAX_MANIFEST, MESSAGE_MAGIC

__all__ = [
    "MESSAGE_MAGIC",
    "DocumentSource",
    "Manifest",
    "MessageReader",
    "new_message_id",
    "parse_manifest",
    "read_manifest",
]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
MESSAGE_ID_RE = re.compile(rf"[0-9A-HJKMNP-TV-Z]{{{F.MESSAGE_ID_LENGTH}}}")


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
            1: F.MANIFEST_VERSION,
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


# Bounds on what a manifest may carry (docs/format.md §10). Anything outside them is a
# malformed message, refused before any field is used.
MAX_RECIPIENTS = 1000
MAX_SUBJECT = 1000
MAX_SHORT = 128  # identifiers, authors, ids of replaced documents, in-reply-to
MAX_FILENAME = 255
MAX_TITLE = 1000
MAX_SIZE = 1 << 53
MAX_TIME_MS = 253402300799999  # 9999-12-31T23:59:59.999Z, the last instant datetime can hold
MEDIA_TYPE_RE = re.compile(
    r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}(\s*;[\x20-\x7e]*)?"
)
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
RECEIPT_STATUSES = F.RECEIPT_STATUSES


def _bad(what: str) -> EnvelopeError:
    return EnvelopeError(f"malformed message: {what}")


def _text(value: Any, limit: int, what: str, *, single_line: bool = True) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise _bad(what)
    if "\x00" in value or (single_line and any(c in value for c in "\r\n")):
        raise _bad(what)
    return value


def _int(value: Any, low: int, high: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _bad(what)
    return value


def _check_doc(entry: Any) -> dict[str, Any]:
    """Validate one document entry's structure completely: every field a reader may use is of
    its type and within its bounds (a patient and a document type must be maps here; the inbox
    validates them as models)."""
    if not isinstance(entry, dict) or not all(isinstance(k, str) for k in entry):
        raise _bad("bad document entry")
    _int(entry.get("size"), 0, MAX_SIZE, "bad document size")
    _text(entry.get("id"), MAX_SHORT, "bad document entry")
    media_type = _text(entry.get("media_type"), 255, "bad media type")
    if not MEDIA_TYPE_RE.fullmatch(media_type.lower()):
        raise _bad("bad media type")
    if "title" in entry:
        _text(entry["title"], MAX_TITLE, "bad document title", single_line=False)
    for name in ("author", "replaces"):
        if name in entry:
            _text(entry[name], MAX_SHORT, "bad document entry")
    if "filename" in entry:
        fname = _text(entry["filename"], MAX_FILENAME, "unsafe file name")
        if (
            "/" in fname
            or "\\" in fname
            or fname in ("", ".", "..")
            or any(ord(c) < 32 or ord(c) == 127 for c in fname)
        ):
            raise _bad("unsafe file name")
    if entry.get("confidentiality", "N") not in ("N", "R", "V"):
        raise _bad("bad confidentiality")
    if "created" in entry:
        try:
            created = dt.datetime.fromisoformat(_text(entry["created"], 64, "bad document date"))
        except ValueError as exc:
            raise _bad("bad document date") from exc
        if created.tzinfo is None:
            raise _bad("bad document date")
    for name in ("patient", "document_type"):
        if name in entry and not isinstance(entry[name], dict):
            raise _bad("bad patient or document type")
    return entry


def _check_receipt(extra: Any) -> dict[str, Any]:
    if not isinstance(extra, dict):
        raise _bad("bad receipt")
    if extra.get("status") not in RECEIPT_STATUSES:
        raise _bad("bad receipt status")
    if not isinstance(extra.get("of"), str) or not MESSAGE_ID_RE.fullmatch(extra["of"]):
        raise _bad("bad receipt reference")
    if not isinstance(extra.get("envelope"), str) or not _HEX64_RE.fullmatch(extra["envelope"]):
        raise _bad("bad receipt reference")
    _int(extra.get("at"), 0, MAX_TIME_MS, "bad receipt time")
    if "reason" in extra:
        reason = _text(extra["reason"], 64, "bad rejection reason")
        if not re.fullmatch(r"[a-z0-9-]{1,64}", reason):
            raise _bad("bad rejection reason")
    return extra


def parse_manifest(raw: bytes) -> Manifest:
    """Validate a decoded manifest completely (raises EnvelopeError with a structural message):
    after this, every field is of its type and within its bounds."""
    f = _cbor.decode(raw, error=EnvelopeError, what="message manifest")
    if not isinstance(f, dict) or f.get(1) != F.MANIFEST_VERSION:
        raise _bad("unsupported manifest")
    allowed = set(range(1, 13))
    if not {1, 2, 3, 5, 9, 10, 11} <= set(f) <= allowed:
        raise _bad("unexpected manifest fields")
    mid = f[2]
    if not isinstance(mid, str) or not MESSAGE_ID_RE.fullmatch(mid):
        raise _bad("bad message id")
    created_ms = _int(f[3], 0, MAX_TIME_MS, "bad creation time")
    if 6 in f:
        _text(f[6], MAX_SUBJECT, "bad subject")
    if 7 in f:
        _text(f[7], MAX_MANIFEST, "bad body", single_line=False)
    if 8 in f:
        _text(f[8], MAX_SHORT, "bad in-reply-to")
    if (
        not isinstance(f[5], list)
        or len(f[5]) > MAX_RECIPIENTS
        or not all(isinstance(x, str) and len(x) <= MAX_SHORT for x in f[5])
    ):
        raise _bad("bad recipients")
    if 4 in f:
        # its syntax (a practitioner's IDNPS) is checked by the inbox, with the identifiers
        _text(f[4], MAX_SHORT, "the sender's identifier is malformed")
    docs = f[9]
    if not isinstance(docs, list) or len(docs) > MAX_DOCUMENTS:
        raise _bad("bad documents")
    if not isinstance(f[10], list) or not all(r in F.RECEIPT_REQUESTS for r in f[10]):
        raise _bad("bad receipt request")
    if f[11] not in F.MESSAGE_KINDS:
        raise _bad("unknown kind")
    extra = f.get(12)
    if f[11] == "receipt":
        extra = _check_receipt(extra)
        if docs:
            raise _bad("a receipt carries no documents")
    elif extra is not None and not isinstance(extra, dict):
        raise _bad("bad extra")
    return Manifest(
        message_id=mid,
        created=dt.datetime.fromtimestamp(created_ms / 1000, dt.UTC),
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


class DocumentSource(Protocol):
    """What :class:`MessageReader` needs of a document (``medsecure.Document`` is one)."""

    def open(self) -> BinaryIO:
        """A fresh binary reader over the document's bytes."""
        ...


class MessageReader(io.RawIOBase):
    """The plaintext of a message as one stream: header, manifest, then each document's bytes.

    A document read from a file must keep the size it had when the message was built;
    a file that shrank or grew meanwhile raises StorageError (the message is not sent).
    """

    def __init__(
        self,
        manifest: Manifest,
        documents: Sequence[DocumentSource],
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
