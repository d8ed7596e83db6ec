"""IHE XDM packages: layout, ebRIM metadata, hashes, round trip, hostile archives."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import re
import xml.etree.ElementTree as ET
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mailkit import (
    CLASS_CR,
    CONSULT_NOTE,
    PATIENT,
    SUBMISSION,
    WHEN,
    cda_document,
    pdf_document,
    xdm_document,
)

from medsecure.identifiers import INS, INS_DEMO_NIR, INS_TEST_NIR
from medsecure.mail import (
    MailFormatError,
    XdmDocument,
    XdmLimits,
    build_xdm_zip,
    iter_xdm_zip,
    parse_xdm_zip,
)
from medsecure.models import Code, Patient

RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"


def package(docs: list[XdmDocument] | None = None) -> bytes:
    out = io.BytesIO()
    build_xdm_zip(docs or [xdm_document()], SUBMISSION, out, date=WHEN)
    return out.getvalue()


def rezip(data: bytes, replace: dict[str, bytes | None]) -> bytes:
    """The same package with some members replaced (None: removed)."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            if info.filename in replace:
                if replace[info.filename] is not None:
                    dst.writestr(info.filename, replace[info.filename])  # type: ignore[arg-type]
            else:
                dst.writestr(info, src.read(info))
        for name, content in replace.items():
            if name not in src.namelist() and content is not None:
                dst.writestr(name, content)
    return out.getvalue()


def two_documents() -> list[XdmDocument]:
    second = cda_document(
        content=b'<?xml version="1.0"?><ClinicalDocument xmlns="urn:hl7-org:v3"/>\n' * 50,
        title="Lettre de liaison",
        document_type=Code(code="34133-9", label="Synthèse", system="http://loinc.org"),
        confidentiality="R",
    )
    return [
        xdm_document(),
        XdmDocument(
            second,
            class_code=CLASS_CR,
            restrictions=frozenset({"MASQUE_PS"}),
            format_code=Code(
                code="urn:ihe:pcc:xphr:2007", label="XPHR", system="1.3.6.1.4.1.19376.1.2.3"
            ),
            service_start=dt.datetime(2024, 5, 1, 8, 0, tzinfo=dt.UTC),
            service_stop=dt.datetime(2024, 5, 3, 17, 0, tzinfo=dt.UTC),
            event_codes=(
                Code(code="MR", label="Magnetic Resonance", system="1.2.250.1.213.1.1.5.618"),
            ),
            unique_id="1.2.250.1.999.1.1.7.1234",
            practice_setting=Code(
                code="ETABLISSEMENT", label="Établissement", system="1.2.250.1.213.1.1.4.9"
            ),
        ),
        XdmDocument(pdf_document(document_type=CONSULT_NOTE), class_code=CLASS_CR),
    ]


def test_layout_metadata_and_hashes() -> None:
    docs = two_documents()
    data = package(docs)
    zf = zipfile.ZipFile(io.BytesIO(data))
    assert zf.testzip() is None
    names = zf.namelist()
    assert names[:2] == ["README.TXT", "INDEX.HTM"]
    assert "IHE_XDM/SUBSET01/METADATA.XML" in names
    assert sorted(n for n in names if n.startswith("IHE_XDM/SUBSET01/DOC")) == [
        "IHE_XDM/SUBSET01/DOC00001.XML",
        "IHE_XDM/SUBSET01/DOC00002.XML",
        "IHE_XDM/SUBSET01/DOC00003.PDF",
    ]
    assert b"medsecure" in zf.read("README.TXT")
    index = zf.read("INDEX.HTM").decode()
    assert 'href="IHE_XDM/SUBSET01/DOC00001.XML"' in index
    root = ET.fromstring(zf.read("IHE_XDM/SUBSET01/METADATA.XML"))
    assert root.tag == f"{{{LCM}}}SubmitObjectsRequest"
    objects = root.findall(f"{{{RIM}}}RegistryObjectList/{{{RIM}}}ExtrinsicObject")
    assert len(objects) == len(docs)
    assert len(root.findall(f"{{{RIM}}}RegistryObjectList/{{{RIM}}}RegistryPackage")) == 1
    assocs = root.findall(f"{{{RIM}}}RegistryObjectList/{{{RIM}}}Association")
    assert {a.get("targetObject") for a in assocs} == {o.get("id") for o in objects}
    for obj, spec in zip(objects, docs, strict=True):
        slots = {
            s.get("name"): [v.text for v in s.iter(f"{{{RIM}}}Value")]
            for s in obj.findall(f"{{{RIM}}}Slot")
        }
        content = zf.read("IHE_XDM/SUBSET01/" + slots["URI"][0])
        assert content == spec.document.content
        assert slots["hash"] == [hashlib.sha1(content).hexdigest()]
        assert slots["size"] == [str(len(content))]
        assert obj.get("mimeType") == spec.document.media_type
        assert slots["sourcePatientId"] == ["279035121518989^^^&1.2.250.1.213.1.4.8&ISO^NH"]
    text = zf.read("IHE_XDM/SUBSET01/METADATA.XML").decode()
    assert "810002909371^MÉDECIN^Paul^^^^^^&amp;1.2.250.1.71.4.2.1&amp;ISO^D^^^IDNPS" in text
    assert "Cabinet A \\T\\ B^^^^^&amp;1.2.250.1.71.4.2.2&amp;ISO^IDNST^^^1750000000" in text


def test_round_trip_keeps_every_field() -> None:
    docs = two_documents()
    pkg = parse_xdm_zip(io.BytesIO(package(docs)))
    assert pkg.has_readme and pkg.has_index
    (ss,) = pkg.submissions
    assert ss.folder == "SUBSET01"
    assert ss.submitted == WHEN
    assert ss.title == SUBMISSION.title and ss.comments == SUBMISSION.comments
    assert ss.author == SUBMISSION.author
    assert ss.content_type == SUBMISSION.content_type
    assert ss.patient_id == (PATIENT.ins.matricule, PATIENT.ins.oid)
    assert ss.recipients == SUBMISSION.recipients
    assert ss.source_id and ss.unique_id and ss.unique_id.startswith("2.25.")
    assert len(ss.entries) == 3
    for entry, spec in zip(ss.entries, docs, strict=True):
        doc = spec.document
        assert entry.patient == PATIENT
        assert entry.author == SUBMISSION.author
        assert entry.title == doc.title
        assert entry.media_type == doc.media_type
        assert entry.size == doc.size
        assert entry.sha1 == hashlib.sha1(doc.content or b"").hexdigest()
        assert entry.created == (doc.created or WHEN)
        assert entry.language == "fr-FR"
        assert entry.class_code == spec.class_code
        assert entry.type_code is not None or doc.document_type is None
        if doc.document_type is not None:
            assert entry.type_code == Code(
                code=doc.document_type.code,
                label=doc.document_type.label,
                system="2.16.840.1.113883.6.1",
            )
        assert entry.confidentiality == doc.confidentiality
        assert entry.restrictions == spec.restrictions
        assert entry.practice_setting == (spec.practice_setting or SUBMISSION.practice_setting)
        assert entry.facility_type == SUBMISSION.facility_type
        assert entry.event_codes == spec.event_codes
        assert entry.service_start == spec.service_start
        assert entry.service_stop == spec.service_stop
        if spec.format_code is not None:
            assert entry.format_code == spec.format_code
    assert ss.entries[1].unique_id == "1.2.250.1.999.1.1.7.1234"
    assert ss.entries[2].format_code is not None
    assert ss.entries[2].format_code.code == "urn:ihe:iti:xds-sd:pdf:2008"
    assert ss.entries[0].format_code is not None
    assert ss.entries[0].format_code.code == "urn:asipSante:modelesHorsProfils:2011"


def test_extract_writes_each_checked_document() -> None:
    docs = two_documents()
    got: dict[str, io.BytesIO] = {}
    parse_xdm_zip(io.BytesIO(package(docs)), extract=lambda e: got.setdefault(e.uri, io.BytesIO()))
    assert [v.getvalue() for v in got.values()] == [d.document.content for d in docs]


@pytest.mark.parametrize("oid", [INS_TEST_NIR, INS_DEMO_NIR])
def test_test_and_demo_ins_roots(oid: str) -> None:
    patient = Patient(ins=INS("162018885045327", oid=oid, birth_name="PAT-SIX", sex="M"))
    data = package([xdm_document(cda_document(patient=patient))])
    text = zipfile.ZipFile(io.BytesIO(data)).read("IHE_XDM/SUBSET01/METADATA.XML").decode()
    assert f"162018885045327^^^&amp;{oid}&amp;ISO^NH" in text
    (entry,) = parse_xdm_zip(io.BytesIO(data)).entries
    assert entry.patient == patient


def test_streamed_and_written_packages_agree() -> None:
    docs = [xdm_document()]
    streamed = b"".join(iter_xdm_zip(docs, SUBMISSION, date=WHEN))
    assert (
        zipfile.ZipFile(io.BytesIO(streamed)).namelist()
        == zipfile.ZipFile(io.BytesIO(package(docs))).namelist()
    )


def test_the_package_is_built_from_a_file_in_chunks(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "big.xml"
    body = b'<?xml version="1.0"?><ClinicalDocument xmlns="urn:hl7-org:v3">' + b"x" * 3_000_000
    path.write_bytes(body + b"</ClinicalDocument>")
    doc = cda_document(content=None, path=path)
    (entry,) = parse_xdm_zip(io.BytesIO(package([xdm_document(doc)]))).entries
    assert entry.size == path.stat().st_size
    assert entry.sha1 == hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: [xdm_document(cda_document(patient=None))], "patient"),
        (lambda: [xdm_document(cda_document(document_type=None))], "document_type"),
        (
            lambda: [
                xdm_document(),
                xdm_document(
                    cda_document(patient=Patient(ins=INS("162018885045327", oid=INS_TEST_NIR)))
                ),
            ],
            "one patient",
        ),
        (lambda: [], "at least one"),
    ],
)
def test_bad_packages_are_refused_before_any_byte(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        iter_xdm_zip(make(), SUBMISSION, date=WHEN)  # type: ignore[operator]


def test_class_code_needs_an_oid_system() -> None:
    with pytest.raises(ValueError, match="OID"):
        iter_xdm_zip(
            [XdmDocument(cda_document(), class_code=Code(code="11", system="classes"))],
            SUBMISSION,
            date=WHEN,
        )
    with pytest.raises(ValueError, match="restriction"):
        XdmDocument(cda_document(), class_code=CLASS_CR, restrictions=frozenset({"SECRET"}))


# -- hostile packages ---------------------------------------------------------------------------

META = "IHE_XDM/SUBSET01/METADATA.XML"


def test_a_tampered_document_fails_its_hash() -> None:
    data = rezip(
        package(), {"IHE_XDM/SUBSET01/DOC00001.XML": b"X" * len(cda_document().content or b"")}
    )
    with pytest.raises(MailFormatError, match="hash"):
        parse_xdm_zip(io.BytesIO(data))


def test_a_wrong_size_is_detected() -> None:
    data = rezip(package(), {"IHE_XDM/SUBSET01/DOC00001.XML": b"short"})
    with pytest.raises(MailFormatError, match="size"):
        parse_xdm_zip(io.BytesIO(data))


def test_a_size_in_superscript_digits_is_a_format_error() -> None:
    """'²' is a digit to str.isdigit but no number to int(): a typed refusal, not ValueError."""
    meta = zipfile.ZipFile(io.BytesIO(package())).read(META).decode()
    size = re.search(r'name="size">\s*<rim:ValueList>\s*<rim:Value>([0-9]+)<', meta)
    assert size is not None
    hostile = meta.replace(size.group(0), size.group(0).replace(size.group(1), "\u00b2"))
    with pytest.raises(MailFormatError, match="size"):
        parse_xdm_zip(io.BytesIO(rezip(package(), {META: hostile.encode()})))


def test_a_missing_document_is_detected() -> None:
    data = rezip(package(), {"IHE_XDM/SUBSET01/DOC00001.XML": None})
    with pytest.raises(MailFormatError, match="missing"):
        parse_xdm_zip(io.BytesIO(data))


def _meta(data: bytes) -> str:
    return zipfile.ZipFile(io.BytesIO(data)).read(META).decode()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m.replace(
                "<?xml version='1.0' encoding='utf-8'?>",
                "<?xml version='1.0'?>\n<!DOCTYPE x [<!ENTITY a 'b'>]>",
            ),
            "DTD",
        ),
        (lambda m: m.replace("DOC00001.XML", "../../etc/passwd"), "unsafe"),
        (lambda m: m.replace("DOC00001.XML", "/etc/passwd"), "unsafe"),
        (lambda m: m.replace("lcm:SubmitObjectsRequest", "lcm:Other"), "SubmitObjectsRequest"),
        (lambda m: m[:-40], "well-formed"),
        (
            lambda m: m.replace(
                "<rim:Value>20240514080000</rim:Value>", "<rim:Value>2024-05-14</rim:Value>"
            ),
            "time",
        ),
        (lambda m: m.replace("279035121518989^^^", "279035121518988^^^"), "patient"),
    ],
)
def test_hostile_metadata_is_refused(edit: object, message: str) -> None:
    data = package()
    bad = edit(_meta(data))  # type: ignore[operator]
    with pytest.raises(MailFormatError, match=message):
        parse_xdm_zip(io.BytesIO(rezip(data, {META: bad.encode()})))


def test_utf16_doctype_is_refused_too() -> None:
    data = package()
    doc = "<?xml version='1.0' encoding='utf-16'?><!DOCTYPE x [<!ENTITY a 'b'>]><x>&a;</x>"
    with pytest.raises(MailFormatError, match="DTD"):
        parse_xdm_zip(io.BytesIO(rezip(data, {META: doc.encode("utf-16")})))


def test_not_a_package() -> None:
    for data in (b"", b"PK\x03\x04garbage", rezip(package(), {META: None})):
        with pytest.raises(MailFormatError):
            parse_xdm_zip(io.BytesIO(data))


def test_limits() -> None:
    data = package(two_documents())
    with pytest.raises(MailFormatError, match="members"):
        parse_xdm_zip(io.BytesIO(data), limits=XdmLimits(max_members=3))
    with pytest.raises(MailFormatError, match="METADATA"):
        parse_xdm_zip(io.BytesIO(data), limits=XdmLimits(max_metadata_bytes=1000))
    with pytest.raises(MailFormatError, match="too large"):
        parse_xdm_zip(io.BytesIO(data), limits=XdmLimits(max_document_bytes=100))


def test_a_drim_m_style_uri_with_the_subset_prefix_is_accepted() -> None:
    data = package()
    meta = _meta(data).replace(">DOC00001.XML<", ">SUBSET01/DOC00001.XML<")
    (entry,) = parse_xdm_zip(io.BytesIO(rezip(data, {META: meta.encode()}))).entries
    assert entry.path == "IHE_XDM/SUBSET01/DOC00001.XML"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 100_000), st.integers(0, 8), st.binary(max_size=8)),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_packages_raise_only_mail_format_error(
    edits: list[tuple[int, int, bytes]],
) -> None:
    raw = bytearray(_SEED)
    for pos, cut, insert in edits:
        pos %= len(raw) + 1
        raw[pos : pos + cut] = insert
    with contextlib.suppress(MailFormatError):
        parse_xdm_zip(io.BytesIO(bytes(raw)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 20_000), st.integers(0, 30), st.text(max_size=10)),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_metadata_raises_only_mail_format_error(
    edits: list[tuple[int, int, str]],
) -> None:
    meta = _SEED_META
    for pos, cut, insert in edits:
        pos %= len(meta) + 1
        meta = meta[:pos] + insert + meta[pos + cut :]
    with contextlib.suppress(MailFormatError):
        parse_xdm_zip(io.BytesIO(rezip(_SEED, {META: meta.encode("utf-8", "surrogatepass")})))


_SEED = package([xdm_document(cda_document(document_type=CONSULT_NOTE))])
_SEED_META = _meta(_SEED)
