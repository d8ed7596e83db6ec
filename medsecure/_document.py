"""Documents: health content with the metadata a receiving medical software needs.

Content stays on disk for documents made with :meth:`Document.from_path`, so imaging studies
of hundreds of MiB stream to the envelope with bounded memory. The media type is sniffed from
the content's first bytes (PDF, JPEG, PNG, DICOM, CDA R2, HL7 v2, FHIR JSON, plain text) and
checked against the filename; what cannot be recognised travels as
``application/octet-stream`` — never refused.
"""

from __future__ import annotations

import datetime as dt
import json
import mimetypes
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from .models import Code, Patient

__all__ = ["Document", "sniff_media_type"]


OCTET_STREAM = "application/octet-stream"
PDF, JPEG, PNG, DICOM = "application/pdf", "image/jpeg", "image/png", "application/dicom"
CDA, XML, HL7V2, FHIR_JSON, JSON, TEXT = (
    "text/xml",
    "application/xml",
    "application/hl7-v2",
    "application/fhir+json",
    "application/json",
    "text/plain",
)
SNIFF_BYTES = 4096

# Extensions whose media type we know better than the platform's mimetypes table.
_EXTENSIONS = {
    ".pdf": PDF,
    ".jpg": JPEG,
    ".jpeg": JPEG,
    ".png": PNG,
    ".dcm": DICOM,
    ".dicom": DICOM,
    ".hl7": HL7V2,
    ".txt": TEXT,
    ".json": JSON,
    ".xml": XML,
    ".csv": "text/csv",
    ".rtf": "application/rtf",
    ".zip": "application/zip",
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ".odt": "application/vnd.oasis.opendocument.text",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}
# Types that an extension may claim for content sniffed as the key (compatible refinements).
_COMPATIBLE = {
    CDA: {XML, CDA, "text/xml"},
    FHIR_JSON: {JSON, FHIR_JSON},
    TEXT: {TEXT, HL7V2, XML, JSON, "text/csv", "text/markdown", "text/html"},
    XML: {XML, "text/xml"},
    JSON: {JSON},
}

Confidentiality = Literal["N", "R", "V"]
"""HL7 confidentiality: Normal, Restricted, Very restricted."""


def sniff_media_type(head: bytes) -> str:
    """Recognise the media type from the first bytes of the content."""
    if head.startswith(b"%PDF-"):
        return PDF
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if len(head) >= 132 and head[128:132] == b"DICM":
        return DICOM
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped.startswith(b"MSH|") or stripped.startswith(b"MSH^"):
        return HL7V2
    if stripped.startswith(b"<"):
        if b"ClinicalDocument" in head and b"urn:hl7-org:v3" in head:
            return CDA
        if stripped.startswith(b"<?xml") or stripped[1:2].isalpha():
            return XML
    if stripped.startswith(b"{"):
        text = stripped.decode("utf-8", "ignore")
        if '"resourceType"' in text:
            return FHIR_JSON
        return JSON
    if head and b"\x00" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            # a multi-byte character cut at the end of the sniffed window is still text
            if exc.start < len(head) - 4:
                return OCTET_STREAM
        return TEXT
    return OCTET_STREAM


def _extension_type(filename: str | None) -> str | None:
    if not filename:
        return None
    ext = Path(filename).suffix.lower()
    return _EXTENSIONS.get(ext) or mimetypes.guess_type("x" + ext, strict=False)[0]


_SNIFFABLE = {PDF, JPEG, PNG, DICOM}
_GENERIC = {TEXT, XML, JSON}


def _reconcile(sniffed: str, claimed: str | None) -> tuple[str, str | None]:
    """Choose between the sniffed type and the one the file name claims."""
    if claimed is None or claimed == sniffed:
        return sniffed, None
    if claimed in _COMPATIBLE.get(sniffed, set()):
        return (claimed if sniffed in _GENERIC else sniffed), None
    if sniffed == OCTET_STREAM and claimed not in _SNIFFABLE:
        return claimed, None  # a format we do not sniff (docx, zip, …): trust the extension
    return sniffed, _disagreement(claimed, sniffed)


def _disagreement(claimed: str | None, sniffed: str | None) -> str:
    return f"the file name suggests {claimed} but the content is {sniffed}"


def media_type_disagreement(doc: Document) -> str | None:
    """What ``doc.warnings`` says if its file name and content disagreed on the media type
    (the two media types, never the file name, which may name the patient), else None.

    :class:`Client.send` logs it naming the document by its position in the message: only
    there is the position known, and a document made but never sent need not be logged.
    """
    note = _disagreement(_extension_type(doc.filename), doc.media_type)
    return note if note in doc.warnings else None


def new_document_id() -> str:
    """A random document identifier (128 bits, URL-safe)."""
    return "doc-" + secrets.token_hex(16)


@dataclass(frozen=True)
class Document:
    """A document to send: ``Document(content=b"…", filename="cr.pdf", title="Compte rendu")``.

    ``content`` (bytes) or ``path`` (a file, streamed) holds the data. ``media_type`` is sniffed
    when not given; an explicit one that contradicts the content is a ValueError. A filename
    whose extension disagrees with the content keeps the sniffed type and is noted in
    ``warnings`` (and logged by ``Client.send``, naming the document by its position). ``document_type`` is a LOINC code (e.g. ``Code(code="11488-4", label="Consult
    note", system="http://loinc.org")``); ``replaces`` names the id of a document this one
    supersedes.
    """

    content: bytes | None = None
    media_type: str | None = None
    filename: str | None = None
    title: str | None = None
    path: Path | None = None
    document_type: Code | None = None
    created: dt.datetime | None = None
    author: str | None = None
    patient: Patient | None = None
    confidentiality: Confidentiality = "N"
    replaces: str | None = None
    id: str = field(default_factory=new_document_id)
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.content is None) == (self.path is None):
            raise ValueError("a Document needs exactly one of content= or path=")
        if self.content is not None and not isinstance(
            self.content, (bytes, bytearray, memoryview)
        ):
            raise TypeError("content must be bytes")
        if self.content is not None:
            object.__setattr__(self, "content", bytes(self.content))
        if self.path is not None:
            object.__setattr__(self, "path", Path(self.path))
        if self.filename is not None and (
            "/" in self.filename or "\\" in self.filename or self.filename in (".", "..")
        ):
            raise ValueError("filename must be a bare file name, without folders")
        if self.confidentiality not in ("N", "R", "V"):
            raise ValueError("confidentiality must be 'N', 'R' or 'V'")
        if self.document_type is not None and not isinstance(self.document_type, Code):
            raise TypeError("document_type must be a Code")
        if self.patient is not None and not isinstance(self.patient, Patient):
            raise TypeError("patient must be a Patient")
        if self.created is not None and self.created.tzinfo is None:
            raise ValueError("created must be timezone-aware")
        sniffed = sniff_media_type(self._head())
        warnings = list(self.warnings)
        media_type = self.media_type
        if media_type is None:
            media_type, warning = _reconcile(sniffed, _extension_type(self.filename))
            if warning:
                warnings.append(warning)  # logged by Client.send, with the document's position
        elif sniffed in (PDF, JPEG, PNG, DICOM) and media_type != sniffed:
            raise ValueError(
                f"media_type {media_type!r} contradicts the content, which is {sniffed}"
            )
        object.__setattr__(self, "media_type", media_type)
        object.__setattr__(self, "warnings", tuple(warnings))

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], **meta: Any) -> Document:
        """A document streamed from ``path``; ``filename`` defaults to the file's name."""
        p = Path(path)
        if not p.is_file():
            # the path is not repeated: a document's file name may name the patient
            raise ValueError("the document is not a readable file (missing, or a folder)")
        meta.setdefault("filename", p.name)
        return cls(path=p, **meta)

    def _head(self) -> bytes:
        if self.content is not None:
            return self.content[:SNIFF_BYTES]
        assert self.path is not None
        with self.path.open("rb") as fh:
            return fh.read(SNIFF_BYTES)

    @property
    def size(self) -> int:
        if self.content is not None:
            return len(self.content)
        assert self.path is not None
        return self.path.stat().st_size

    def open(self) -> BinaryIO:
        """A binary stream of the content."""
        import io

        if self.content is not None:
            return io.BytesIO(self.content)
        assert self.path is not None
        return self.path.open("rb")

    def describe(self, size: int) -> dict[str, Any]:
        """The metadata that travels inside the envelope (manifest entry)."""
        entry: dict[str, Any] = {
            "id": self.id,
            "media_type": self.media_type,
            "size": size,
            "confidentiality": self.confidentiality,
        }
        for name in ("filename", "title", "author", "replaces"):
            value = getattr(self, name)
            if value is not None:
                entry[name] = value
        if self.document_type is not None:
            entry["document_type"] = self.document_type.model_dump(mode="json", exclude_none=True)
        if self.created is not None:
            entry["created"] = self.created.isoformat()
        if self.patient is not None:
            entry["patient"] = json.loads(self.patient.to_json())
        return entry
