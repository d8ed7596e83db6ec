from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest

from medsecure import Document
from medsecure._document import sniff_media_type
from medsecure.models import Code

CDA = b'<?xml version="1.0"?>\n<ClinicalDocument xmlns="urn:hl7-org:v3"><id/></ClinicalDocument>'
SAMPLES = {
    "application/pdf": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
    "image/jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF",
    "image/png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "application/dicom": b"\x00" * 128 + b"DICM\x02\x00",
    "text/xml": CDA,
    "application/hl7-v2": b"MSH|^~\\&|LAB|HOSP|||20260101||ORU^R01|1|P|2.5\rPID|1",
    "application/fhir+json": b'{"resourceType": "DiagnosticReport", "status": "final"}',
    "text/plain": "Compte rendu: plaie en voie de cicatrisation, écoulement séreux.".encode(),
    "application/octet-stream": b"\x00\x01\x02\x03\xff\xfe",
}


@pytest.mark.parametrize("media_type", sorted(SAMPLES))
def test_sniffing(media_type: str) -> None:
    assert sniff_media_type(SAMPLES[media_type]) == media_type
    assert Document(content=SAMPLES[media_type]).media_type == media_type


def test_filename_agreement_and_disagreement() -> None:
    assert Document(content=SAMPLES["application/pdf"], filename="cr.pdf").warnings == ()
    liar = Document(content=SAMPLES["image/jpeg"], filename="cr.pdf")
    assert liar.media_type == "image/jpeg" and "suggests application/pdf" in liar.warnings[0]
    assert Document(content=b"a,b\n1,2\n", filename="labs.csv").media_type == "text/csv"
    assert Document(content=CDA, filename="cda.xml").media_type == "text/xml"
    docx = Document(content=b"PK\x03\x04\x00\x00binary", filename="lettre.docx")
    assert docx.media_type.startswith("application/vnd.openxmlformats")
    unknown = Document(content=b"\x00\x01\x02", filename="data.bin")
    assert unknown.media_type == "application/octet-stream"  # never refused
    assert (
        Document(content=b"\x00\x01", filename="fake.pdf").media_type == "application/octet-stream"
    )


def test_a_disagreeing_file_name_is_noted_not_logged_when_made(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The mismatch is noted in ``warnings`` when the document is made; it is logged when the
    document is sent, where its position in the message is known (test_client.py)."""
    with caplog.at_level(logging.WARNING, logger="medsecure"):
        liar = Document(content=SAMPLES["image/jpeg"], filename="IRM_DUPONT_Jean.pdf")
    assert liar.warnings and "DUPONT" not in liar.warnings[0]
    assert caplog.records == []


def test_explicit_media_type() -> None:
    assert (
        Document(content=b"anything", media_type="application/x-custom").media_type
        == "application/x-custom"
    )
    with pytest.raises(ValueError, match="contradicts"):
        Document(content=SAMPLES["application/pdf"], media_type="image/png")


def test_from_path_and_metadata(tmp_path: Path) -> None:
    p = tmp_path / "radio.png"
    p.write_bytes(SAMPLES["image/png"] + b"\x00" * 100)
    d = Document.from_path(
        p,
        title="Radio",
        document_type=Code(code="18748-4", label="Diagnostic imaging study"),
        created=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    )
    assert d.filename == "radio.png" and d.media_type == "image/png" and d.size == p.stat().st_size
    assert d.describe(d.size)["document_type"]["code"] == "18748-4"
    with d.open() as fh:
        assert fh.read() == p.read_bytes()
    with pytest.raises(ValueError, match="not a readable file"):
        Document.from_path(tmp_path / "missing.pdf")


def test_document_misuse() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Document()
    with pytest.raises(ValueError, match="exactly one"):
        Document(content=b"x", path=Path("/etc/hostname"))
    with pytest.raises(TypeError):
        Document(content="text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bare file name"):
        Document(content=b"x", filename="../../etc/passwd")
    with pytest.raises(ValueError, match="confidentiality"):
        Document(content=b"x", confidentiality="X")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timezone"):
        Document(content=b"x", created=dt.datetime(2026, 1, 1))
    assert Document(content=b"x").id != Document(content=b"x").id
