"""Large attachments in bounded memory, both ways (tracemalloc peaks, no timing)."""

from __future__ import annotations

import tracemalloc

import pytest
from mailkit import WHEN, HashSink, LazyFile, StreamReader, cda_document, pdf_document, xdm_document

from medsecure.mail import build_e2e_message, build_mssante_message, parse_message, parse_xdm_zip

MIB = 1024 * 1024


@pytest.mark.slow
def test_a_200_mib_envelope_is_built_and_parsed_in_bounded_memory() -> None:
    size = 200 * MIB
    source = LazyFile(size)
    sink = HashSink()
    tracemalloc.start()
    try:
        stream = build_e2e_message(
            source,  # type: ignore[arg-type]
            sender="dr.martin@medecin.mssante.fr",
            recipients=["dr.durand@clinique-exemple.mssante.fr"],
            message_id="01HXR4T3M5K8Q9V2W6Y7Z0ABCD",
            date=WHEN,
        )
        parsed = parse_message(StreamReader(stream.iter_chunks()), envelope_out=sink)  # type: ignore[arg-type]
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert source.pos == size
    assert sink.size == size == parsed.envelope_size
    assert sink.digest.digest() == source.digest.digest()
    # a few chunks of 64 KiB and their base64: far below the 270 MiB the message weighs
    assert peak < 8 * MIB, f"peak {peak / MIB:.1f} MiB"


def test_a_large_pdf_attachment_and_xdm_archive_stay_bounded(tmp_path: object) -> None:
    from pathlib import Path

    big = Path(str(tmp_path)) / "scan.pdf"
    with big.open("wb") as fh:
        fh.write(b"%PDF-1.4\n")
        lazy = LazyFile(24 * MIB)
        while chunk := lazy.read(1 << 20):
            fh.write(chunk)
    cda_path = Path(str(tmp_path)) / "cr.xml"
    with cda_path.open("wb") as fh:
        fh.write(b'<?xml version="1.0"?><ClinicalDocument xmlns="urn:hl7-org:v3"><text>')
        lazy = LazyFile(16 * MIB, seed=b"cda")
        while chunk := lazy.read(1 << 20):
            fh.write(chunk.hex()[: len(chunk)].encode())
        fh.write(b"</text></ClinicalDocument>")
    pdf = pdf_document(content=None, path=big)
    cda = cda_document(content=None, path=cda_path)
    got: dict[str, object] = {}
    zip_path = Path(str(tmp_path)) / "IHE_XDM.ZIP"

    def sink(info: object) -> object:
        name = getattr(info, "filename", None)
        if name == "IHE_XDM.ZIP":
            got[name] = zip_path.open("wb")
        else:
            got[str(name)] = HashSink()
        return got[str(name)]

    tracemalloc.start()
    try:
        stream = build_mssante_message(
            sender="dr.martin@medecin.mssante.fr",
            recipients=["dr.durand@clinique-exemple.mssante.fr"],
            body="Bonjour",
            date=WHEN,
            message_id="big.1@medecin.mssante.fr",
            product_reference="NIL-1",
            documents=[xdm_document(cda), pdf],
            submission=__import__("mailkit").SUBMISSION,
        )
        parse_message(StreamReader(stream.iter_chunks()), attachment_sink=sink)  # type: ignore[arg-type]
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        for f in got.values():
            close = getattr(f, "close", None)
            if close:
                close()
    assert peak < 8 * MIB, f"peak {peak / MIB:.1f} MiB"
    pdf_sink = got["Compte rendu échographie.pdf"]
    assert isinstance(pdf_sink, HashSink) and pdf_sink.size == big.stat().st_size
    (entry,) = parse_xdm_zip(zip_path).entries
    assert entry.size == cda_path.stat().st_size
