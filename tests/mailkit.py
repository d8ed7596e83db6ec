"""Shared fixtures for the mail format tests: a patient, documents, an XDM submission, and a
lazily generated large file (never written to disk, never held whole)."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from pathlib import Path

from medsecure._document import Document
from medsecure.identifiers import INS
from medsecure.mail import XdmAuthor, XdmDocument, XdmSubmission
from medsecure.models import Code, Patient

SAMPLES = Path(__file__).parent / "mail_samples"
WHEN = dt.datetime(2024, 5, 14, 9, 30, tzinfo=dt.UTC)
MATRICULE = "279035121518989"
PATIENT = Patient(
    ins=INS(
        MATRICULE,
        birth_name="DUPONT-LEFÈVRE",
        first_given_name="Hélène",
        given_names=("Hélène", "Marie"),
        birth_date=dt.date(1979, 3, 5),
        sex="F",
        birth_place="51215",
    ),
    family_name="MARTIN",
    given_name="Lena",
)
CONSULT_NOTE = Code(code="11488-4", label="Compte rendu de consultation", system="http://loinc.org")
CLASS_CR = Code(code="11", label="Compte rendu", system="1.2.250.1.213.1.1.4.1")
SUBMISSION = XdmSubmission(
    author=XdmAuthor(
        "810002909371",
        family_name="MÉDECIN",
        given_name="Paul",
        institution_name="Cabinet A & B",
        institution_idnst="1750000000",
    ),
    content_type=Code(code="04", label="Hospitalisation de jour", system="1.2.250.1.213.2.2"),
    facility_type=Code(code="SA07", label="Cabinet individuel", system="1.2.250.1.71.4.2.4"),
    practice_setting=Code(code="AMBULATOIRE", label="Ambulatoire", system="1.2.250.1.213.1.1.4.9"),
    title="Envoi de compte rendu",
    comments="Suite à la consultation",
    recipients=("dr.durand@clinique-exemple.mssante.fr",),
)
CDA = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<ClinicalDocument xmlns="urn:hl7-org:v3"><code code="11488-4" '
    b'codeSystem="2.16.840.1.113883.6.1"/><title>Compte rendu</title></ClinicalDocument>\n'
)
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


def cda_document(**over: object) -> Document:
    meta: dict[str, object] = {
        "content": CDA,
        "filename": "cr-consultation.xml",
        "title": "Compte rendu de consultation du 14 mai",
        "patient": PATIENT,
        "document_type": CONSULT_NOTE,
        "created": dt.datetime(2024, 5, 14, 8, 0, tzinfo=dt.UTC),
    }
    meta.update(over)
    return Document(**meta)  # type: ignore[arg-type]


def pdf_document(**over: object) -> Document:
    meta: dict[str, object] = {
        "content": PDF,
        "filename": "Compte rendu échographie.pdf",
        "title": "Compte rendu (PDF)",
        "patient": PATIENT,
    }
    meta.update(over)
    return Document(**meta)  # type: ignore[arg-type]


def xdm_document(doc: Document | None = None, **over: object) -> XdmDocument:
    return XdmDocument(doc or cda_document(), class_code=CLASS_CR, **over)  # type: ignore[arg-type]


class LazyFile(io.RawIOBase):
    """``size`` bytes of deterministic pseudo-random content, generated as it is read; the
    SHA-256 of what was read accumulates in ``digest``."""

    def __init__(self, size: int, seed: bytes = b"medsecure") -> None:
        super().__init__()
        self.size = size
        self.pos = 0
        self.digest = hashlib.sha256()
        self._block = hashlib.shake_256(seed).digest(1 << 16)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        n = min(len(view), self.size - self.pos, len(self._block))
        if n <= 0:
            return 0
        start = self.pos % len(self._block)
        chunk = (self._block[start:] + self._block[:start])[:n]
        # vary the content across blocks so that reordering would be detected
        chunk = (self.pos // len(self._block)).to_bytes(8, "big") + chunk[8:] if n > 8 else chunk
        view[:n] = chunk
        self.pos += n
        self.digest.update(chunk)
        return n


class HashSink:
    """A write-only sink that keeps only a digest and a count."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return len(data)


class StreamReader(io.RawIOBase):
    """A file-like view of a chunk iterator (the receiving side of a pipe)."""

    def __init__(self, chunks: object) -> None:
        super().__init__()
        self._it = iter(chunks)  # type: ignore[call-overload]
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        while not self._buf:
            nxt = next(self._it, None)
            if nxt is None:
                return 0
            self._buf = nxt
        n = min(len(view), len(self._buf))
        view[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n
