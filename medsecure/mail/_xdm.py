"""IHE XDM packages (IHE ITI TF-1 §16, ITI-32 "Distribute Document Set on Media", zip form).

Layout of ``IHE_XDM.ZIP``::

    README.TXT                       who produced the package
    INDEX.HTM                        a human-readable list of the documents
    IHE_XDM/SUBSET01/METADATA.XML    ebRIM 3.0 SubmitObjectsRequest (one per submission set)
    IHE_XDM/SUBSET01/DOC00001.XML    the documents, ISO 9660 "8.3" names
    …

``METADATA.XML`` holds one SubmissionSet (a ``RegistryPackage``) and one ``ExtrinsicObject``
(DocumentEntry) per document, linked by ``HasMember`` associations. The identification and
classification scheme UUIDs are those of IHE ITI TF-3 §4.2.5 as used, with the French values,
in the ANS DRIM-M sample ``ansforge/DRIM-M_DATA: informatif/XDM/KA202401/IHE_XDM/SS000001/
METADATA.XML``:

* patient: the INS as an HL7 CX ``<matricule>^^^&<OID>&ISO^NH`` — OID ``1.2.250.1.213.1.4.8``
  for an INS-NIR, ``.9`` NIA, ``.10`` test NIR, ``.11`` demo NIR (the DRIM-M sample uses
  ``.10``); ``sourcePatientInfo`` carries ``PID-5`` (names), ``PID-7`` (birth date), ``PID-8``
  (sex) as in the sample;
* author: ``authorPerson`` XCN ``<IDNPS>^<NOM>^<Prénom>^^^^^^&1.2.250.1.71.4.2.1&ISO^D^^^IDNPS``
  and ``authorInstitution`` XON ``<nom>^^^^^&1.2.250.1.71.4.2.2&ISO^IDNST^^^<IDNST>``;
* codes: classCode (JDV_J06, TRE_A03 ``1.2.250.1.213.1.1.4.1``), typeCode (LOINC
  ``2.16.840.1.113883.6.1`` or TRE_A05 ``1.2.250.1.213.1.1.4.12``), confidentialityCode (HL7
  ``2.16.840.1.113883.5.25`` N/R/V, plus TRE_A07 ``1.2.250.1.213.1.1.4.13`` ``MASQUE_PS`` /
  ``INVISIBLE_PATIENT`` / ``INVISIBLE_REP_LEGAUX``), formatCode (JDV_J10: IHE
  ``1.3.6.1.4.1.19376.1.2.3`` or TRE_A06 ``1.2.250.1.213.1.1.4.2.282``),
  healthcareFacilityTypeCode (``1.2.250.1.71.4.2.4``), practiceSettingCode
  (``1.2.250.1.213.1.1.4.9``), SubmissionSet contentTypeCode;
* ``hash`` (SHA-1, hex) and ``size`` of every file, computed while the file is written.

The zip is produced as a stream (:func:`iter_xdm_zip`): documents are read in chunks and the
metadata, which needs their hashes, is written last. :func:`parse_xdm_zip` reads a package
with a hardened XML parser and bounded sizes, and checks every hash and size.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import os
import re
import uuid
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, BinaryIO, cast

from .._document import Document
from ..identifiers import IDNPS_SYSTEM, IDNST_SYSTEM, INS, parse
from ..models import Code, Patient
from ._errors import MailFormatError
from ._xml import parse_xml

__all__ = [
    "XdmAuthor",
    "XdmDocument",
    "XdmEntry",
    "XdmLimits",
    "XdmPackage",
    "XdmSubmission",
    "XdmSubmissionSet",
    "build_xdm_zip",
    "iter_xdm_zip",
    "parse_xdm_zip",
]

RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
XML_NS = "http://www.w3.org/XML/1998/namespace"
ET.register_namespace("rim", RIM)
ET.register_namespace("lcm", LCM)

# IHE ITI TF-3 §4.2.5 (the same UUIDs appear in the DRIM-M sample cited above)
DOCUMENT_ENTRY = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
SUBMISSION_SET_NODE = "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"
SS_AUTHOR = "urn:uuid:a7058bb9-b4e4-4307-ba5b-e3f0ab85e12d"
SS_CONTENT_TYPE = "urn:uuid:aa543740-bdda-424e-8c96-df4873be8500"
SS_PATIENT_ID = "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446"
SS_SOURCE_ID = "urn:uuid:554ac39e-e3fe-47fe-b233-965d2a147832"
SS_UNIQUE_ID = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"
DE_AUTHOR = "urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d"
DE_CLASS = "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a"
DE_TYPE = "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983"
DE_CONFIDENTIALITY = "urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f"
DE_FORMAT = "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"
DE_FACILITY = "urn:uuid:f33fb8ac-18af-42cc-ae0e-ed0b0bdb91e1"
DE_PRACTICE = "urn:uuid:cccf5598-8b07-4b77-a05e-ae952c785ead"
DE_EVENT = "urn:uuid:2c6b8cb7-8b2a-4051-b291-b1ae6a575ef4"
DE_PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
DE_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
HAS_MEMBER = "urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember"

CONFIDENTIALITY_SYSTEM = "2.16.840.1.113883.5.25"
RESTRICTION_SYSTEM = "1.2.250.1.213.1.1.4.13"  # TRE_A07-StatusVisibiliteDocument
RESTRICTIONS = {
    "MASQUE_PS": "Masqué aux professionnels de santé",
    "INVISIBLE_PATIENT": "Non visible par le patient",
    "INVISIBLE_REP_LEGAUX": "Non visible par les représentants légaux du patient",
}
_CONFIDENTIALITY_LABELS = {"N": "Normal", "R": "Restricted", "V": "Very restricted"}
LOINC_OID = "2.16.840.1.113883.6.1"
IHE_FORMAT_OID = "1.3.6.1.4.1.19376.1.2.3"
FORMAT_COMPLEMENT_OID = "1.2.250.1.213.1.1.4.2.282"  # TRE_A06-FormatCodeComplementaire
# JDV_J10 / ASS_A12 (ansforge/IG-terminologie-de-sante): format of an unstructured body by
# media type; a CDA without a declared model is "urn:asipSante:modelesHorsProfils:2011".
_FORMATS = {
    media_type: Code(
        code=code, label=f"Document à corps non structuré en {what}", system=IHE_FORMAT_OID
    )
    for media_type, code, what in (
        ("application/pdf", "urn:ihe:iti:xds-sd:pdf:2008", "Pdf/A-1"),
        ("text/plain", "urn:ihe:iti:xds-sd:text:2008", "texte brut"),
        ("image/jpeg", "urn:ihe:iti-fr:xds-sd:jpeg:2010", "format jpeg"),
        ("image/tiff", "urn:ihe:iti-fr:xds-sd:tiff:2010", "format tiff"),
        ("application/rtf", "urn:ihe:iti-fr:xds-sd:rtf:2010", "format rtf"),
    )
}
_DEFAULT_FORMAT = Code(
    code="urn:asipSante:modelesHorsProfils:2011",
    label="Document non référencé IHE ou CI-SIS",
    system=FORMAT_COMPLEMENT_OID,
)
_EXTENSIONS = {
    "text/xml": "XML",
    "application/xml": "XML",
    "application/pdf": "PDF",
    "image/jpeg": "JPG",
    "image/png": "PNG",
    "image/tiff": "TIF",
    "text/plain": "TXT",
    "application/rtf": "RTF",
    "application/dicom": "DCM",
}
SUBSET = "SUBSET01"
_OID_RE = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_CHUNK = 64 * 1024


def _oid_of(system: str | None, what: str) -> str:
    """The coding-scheme OID of a Code's system (``urn:oid:…``, an OID, or LOINC's URL)."""
    if system is None:
        raise ValueError(f"the {what} needs a system (its coding-scheme OID)")
    if system in ("http://loinc.org", "urn:oid:" + LOINC_OID):
        return LOINC_OID
    bare = system[8:] if system.startswith("urn:oid:") else system
    if not _OID_RE.fullmatch(bare):
        raise ValueError(f"the {what} system must be an OID (or http://loinc.org)")
    return bare


@dataclass(frozen=True)
class XdmAuthor:
    """The author of the documents and of the submission set (a professional, optionally the
    structure they act for). ``idnps`` is the professional's IDNPS (``8`` + RPPS, …);
    ``institution_idnst`` the structure's IDNST (``1`` + FINESS, ``3`` + SIRET, …)."""

    idnps: str
    family_name: str | None = None
    given_name: str | None = None
    institution_name: str | None = None
    institution_idnst: str | None = None

    def __post_init__(self) -> None:
        ident = parse(self.idnps)
        if not ident.is_professional:
            raise ValueError("the author's idnps must be a professional's IDNPS")
        object.__setattr__(self, "idnps", ident.idnps)
        if self.institution_idnst is not None:
            st = parse(self.institution_idnst, structure=True)
            object.__setattr__(self, "institution_idnst", st.idnps)


@dataclass(frozen=True)
class XdmSubmission:
    """What describes the whole package: its author, the source system, the codes of the
    care setting (used for every document unless a document overrides them)."""

    author: XdmAuthor
    content_type: Code
    """SubmissionSet contentTypeCode (e.g. ``04`` "Hospitalisation de jour", 1.2.250.1.213.2.2)."""
    facility_type: Code
    """healthcareFacilityTypeCode (e.g. ``SA07`` "Cabinet individuel", 1.2.250.1.71.4.2.4)."""
    practice_setting: Code
    """practiceSettingCode (e.g. ``AMBULATOIRE``, 1.2.250.1.213.1.1.4.9)."""
    source_id: str | None = None
    """OID of the sending system; default derived from the author's IDNPS."""
    title: str | None = None
    comments: str | None = None
    recipients: tuple[str, ...] = ()
    """intendedRecipient mail addresses."""
    unique_id: str | None = None
    product: str = "medsecure"
    """Named in README.TXT."""


@dataclass(frozen=True)
class XdmDocument:
    """A document with the XDS metadata the ``Document`` model does not carry.

    ``class_code`` comes from JDV_J06-XdsClassCode-CISIS (TRE_A03, 1.2.250.1.213.1.1.4.1);
    the typeCode is the document's ``document_type``; ``format_code`` defaults from the media
    type (JDV_J10); ``restrictions`` are TRE_A07 codes (``MASQUE_PS``, ``INVISIBLE_PATIENT``,
    ``INVISIBLE_REP_LEGAUX``).
    """

    document: Document
    class_code: Code
    format_code: Code | None = None
    practice_setting: Code | None = None
    facility_type: Code | None = None
    restrictions: frozenset[str] = frozenset()
    service_start: dt.datetime | None = None
    service_stop: dt.datetime | None = None
    event_codes: tuple[Code, ...] = ()
    unique_id: str | None = None
    language: str = "fr-FR"

    def __post_init__(self) -> None:
        if not isinstance(self.document, Document):
            raise TypeError("document must be a Document")
        bad = set(self.restrictions) - set(RESTRICTIONS)
        if bad:
            raise ValueError(
                f"unknown restriction {sorted(bad)[0]!r}: expected {sorted(RESTRICTIONS)}"
            )
        object.__setattr__(self, "restrictions", frozenset(self.restrictions))


@dataclass(frozen=True)
class XdmEntry:
    """A DocumentEntry read back from METADATA.XML (hash and size checked against the file)."""

    uri: str
    path: str
    media_type: str
    sha1: str
    size: int
    title: str | None = None
    created: dt.datetime | None = None
    language: str | None = None
    patient: Patient | None = None
    author: XdmAuthor | None = None
    class_code: Code | None = None
    type_code: Code | None = None
    format_code: Code | None = None
    practice_setting: Code | None = None
    facility_type: Code | None = None
    confidentiality: str | None = None
    restrictions: frozenset[str] = frozenset()
    event_codes: tuple[Code, ...] = ()
    unique_id: str | None = None
    service_start: dt.datetime | None = None
    service_stop: dt.datetime | None = None


@dataclass(frozen=True)
class XdmSubmissionSet:
    """A submission set read back from a package."""

    folder: str
    unique_id: str | None
    source_id: str | None
    submitted: dt.datetime | None
    title: str | None
    comments: str | None
    author: XdmAuthor | None
    content_type: Code | None
    patient_id: tuple[str, str] | None
    """(matricule, OID) of the submission set's patient."""
    recipients: tuple[str, ...]
    entries: tuple[XdmEntry, ...]


@dataclass(frozen=True)
class XdmPackage:
    """A parsed IHE XDM package."""

    submissions: tuple[XdmSubmissionSet, ...]
    has_readme: bool
    has_index: bool

    @property
    def entries(self) -> tuple[XdmEntry, ...]:
        """Every document entry, all submission sets together."""
        return tuple(e for s in self.submissions for e in s.entries)


@dataclass(frozen=True)
class XdmLimits:
    """Bounds for reading packages from others."""

    max_members: int = 1000
    max_metadata_bytes: int = 16 * 1024 * 1024
    max_document_bytes: int = 2 * 1024 * 1024 * 1024
    max_submission_sets: int = 16


# --------------------------------------------------------------------------------------------
# HL7 v2 data types used in XDS slots
# --------------------------------------------------------------------------------------------

_HL7_ESCAPES = [("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")]


def _hl7(text: str | None) -> str:
    if not text:
        return ""
    for raw, esc in _HL7_ESCAPES:
        text = text.replace(raw, esc)
    return text


def _unhl7(text: str) -> str | None:
    if not text:
        return None
    for raw, esc in reversed(_HL7_ESCAPES):
        text = text.replace(esc, raw)
    return text


def _ts(when: dt.datetime) -> str:
    if when.tzinfo is None:
        raise ValueError("XDM times must be timezone-aware")
    return when.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S")


def _parse_ts(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    value = value.strip()
    formats = {14: "%Y%m%d%H%M%S", 12: "%Y%m%d%H%M", 10: "%Y%m%d%H", 8: "%Y%m%d"}
    fmt = formats.get(len(value))
    if fmt is None or not (value.isascii() and value.isdigit()):
        raise MailFormatError("malformed time in XDM metadata")
    try:
        return dt.datetime.strptime(value, fmt).replace(tzinfo=dt.UTC)
    except ValueError as exc:
        raise MailFormatError("malformed time in XDM metadata") from exc


def _cx(ins: INS) -> str:
    return f"{ins.matricule}^^^&{ins.oid}&ISO^NH"


def _parse_cx(value: str) -> tuple[str, str]:
    m = re.fullmatch(r"([^^]+)\^\^\^&([0-9.]+)&ISO(?:\^[A-Z]*)?", value.strip())
    if m is None:
        raise MailFormatError("malformed patient identifier in XDM metadata")
    return m.group(1), m.group(2)


def _xcn(author: XdmAuthor) -> str:
    oid = IDNPS_SYSTEM.removeprefix("urn:oid:")
    return (
        f"{author.idnps}^{_hl7(author.family_name)}^{_hl7(author.given_name)}"
        f"^^^^^^&{oid}&ISO^D^^^IDNPS"
    )


def _xon(author: XdmAuthor) -> str | None:
    if author.institution_idnst is None and author.institution_name is None:
        return None
    oid = IDNST_SYSTEM.removeprefix("urn:oid:")
    return (
        f"{_hl7(author.institution_name)}^^^^^&{oid}&ISO^IDNST^^^{author.institution_idnst or ''}"
    )


def _parse_author(slots: dict[str, list[str]]) -> XdmAuthor | None:
    persons = slots.get("authorPerson") or []
    if not persons:
        return None
    comps = persons[0].split("^")
    institution_name = institution_idnst = None
    institutions = slots.get("authorInstitution") or []
    if institutions:
        icomps = institutions[0].split("^")
        institution_name = _unhl7(icomps[0])
        institution_idnst = icomps[9] if len(icomps) > 9 and icomps[9] else None
    try:
        return XdmAuthor(
            idnps=comps[0],
            family_name=_unhl7(comps[1]) if len(comps) > 1 else None,
            given_name=_unhl7(comps[2]) if len(comps) > 2 else None,
            institution_name=institution_name,
            institution_idnst=institution_idnst,
        )
    except ValueError as exc:
        raise MailFormatError("malformed author in XDM metadata") from exc


def _patient_info(patient: Patient) -> list[str]:
    ins = patient.ins
    names = (
        f"{_hl7(ins.birth_name)}^{_hl7(ins.first_given_name)}^{_hl7(' '.join(ins.given_names))}"
        "^^^^L"
    )
    if patient.family_name or patient.given_name:
        names += f"~{_hl7(patient.family_name)}^{_hl7(patient.given_name)}^^^^^D"
    out = [f"PID-5|{names}"]
    if ins.birth_date is not None:
        out.append(f"PID-7|{ins.birth_date:%Y%m%d}")
    if ins.sex is not None:
        out.append(f"PID-8|{'U' if ins.sex == 'I' else ins.sex}")
    if ins.birth_place is not None:
        out.append(f"PID-11|^^^^^^BDL^^{ins.birth_place}")
    return out


def _parse_patient(cx: tuple[str, str], info: list[str]) -> Patient:
    fields: dict[str, str] = {}
    for value in info:
        key, sep, rest = value.partition("|")
        if sep:
            fields[key.strip()] = rest
    traits: dict[str, object] = {}
    family = given = None
    for rep in fields.get("PID-5", "").split("~"):
        comps = rep.split("^") + [""] * 7
        if comps[6] == "L":
            traits["birth_name"] = _unhl7(comps[0])
            traits["first_given_name"] = _unhl7(comps[1])
            others = _unhl7(comps[2])
            traits["given_names"] = tuple(others.split(" ")) if others else ()
        elif comps[6] == "D":
            family, given = _unhl7(comps[0]), _unhl7(comps[1])
    if "PID-7" in fields:
        try:
            traits["birth_date"] = dt.datetime.strptime(fields["PID-7"][:8], "%Y%m%d").date()
        except ValueError as exc:
            raise MailFormatError("malformed birth date in XDM metadata") from exc
    sex = fields.get("PID-8", "").strip()
    if sex:
        traits["sex"] = {"U": "I"}.get(sex, sex)
    if "PID-11" in fields:
        comps = fields["PID-11"].split("^")
        if len(comps) > 8 and comps[8]:
            traits["birth_place"] = comps[8]
    try:
        ins = INS(cx[0], oid=cx[1], **traits)  # type: ignore[arg-type]
        return Patient(ins=ins, family_name=family, given_name=given)
    except ValueError as exc:
        raise MailFormatError("invalid patient identity in XDM metadata") from exc


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _uuid_oid(seed: str | None = None) -> str:
    """A ``2.25.<uuid>`` OID (ISO/IEC 9834-8), random or derived from ``seed``."""
    value = uuid.uuid5(uuid.NAMESPACE_URL, seed) if seed else uuid.uuid4()
    return f"2.25.{value.int}"


class _Builder:
    def __init__(self) -> None:
        self.counter = 0

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter:02d}"


def _el(parent: ET.Element, tag: str, **attrs: str) -> ET.Element:
    return ET.SubElement(parent, f"{{{RIM}}}{tag}", attrs)


def _slot(parent: ET.Element, name: str, values: Iterable[str]) -> None:
    slot = _el(parent, "Slot", name=name)
    vl = _el(slot, "ValueList")
    for v in values:
        _el(vl, "Value").text = v


def _localized(parent: ET.Element, tag: str, text: str | None) -> None:
    if text is None:
        return
    node = _el(parent, tag)
    ls = _el(node, "LocalizedString", charset="UTF-8", value=text)
    ls.set(f"{{{XML_NS}}}lang", "fr-FR")


def _classified(b: _Builder, parent: ET.Element, scheme: str, obj: str, node: str) -> ET.Element:
    return _el(
        parent,
        "Classification",
        classificationScheme=scheme,
        classifiedObject=obj,
        id=b.next_id("cl"),
        nodeRepresentation=node,
    )


def _classification(
    b: _Builder, parent: ET.Element, scheme: str, obj: str, code: Code, what: str
) -> None:
    c = _classified(b, parent, scheme, obj, code.code)
    _slot(c, "codingScheme", [_oid_of(code.system, what)])
    _localized(c, "Name", code.label or code.code)


def _author_classification(
    b: _Builder, parent: ET.Element, scheme: str, obj: str, author: XdmAuthor
) -> None:
    c = _classified(b, parent, scheme, obj, "")
    _slot(c, "authorPerson", [_xcn(author)])
    xon = _xon(author)
    if xon is not None:
        _slot(c, "authorInstitution", [xon])


def _external_id(
    b: _Builder, parent: ET.Element, scheme: str, obj: str, value: str, name: str
) -> None:
    e = _el(
        parent,
        "ExternalIdentifier",
        id=b.next_id("ei"),
        identificationScheme=scheme,
        registryObject=obj,
        value=value,
    )
    _localized(e, "Name", name)


@dataclass
class _Written:
    spec: XdmDocument
    uri: str
    sha1: str
    size: int
    obj_id: str = field(default="")


def _metadata(
    written: Sequence[_Written], submission: XdmSubmission, patient: Patient, now: dt.datetime
) -> bytes:
    b = _Builder()
    root = ET.Element(f"{{{LCM}}}SubmitObjectsRequest")
    rol = _el(root, "RegistryObjectList")
    ss = "SubmissionSet01"
    pkg = _el(rol, "RegistryPackage", id=ss)
    _slot(pkg, "submissionTime", [_ts(now)])
    if submission.recipients:
        _slot(pkg, "intendedRecipient", [f"||^^Internet^{r}" for r in submission.recipients])
    _localized(pkg, "Name", submission.title)
    _localized(pkg, "Description", submission.comments)
    _author_classification(b, pkg, SS_AUTHOR, ss, submission.author)
    _classification(b, pkg, SS_CONTENT_TYPE, ss, submission.content_type, "content type")
    _el(
        pkg,
        "Classification",
        classificationNode=SUBMISSION_SET_NODE,
        classifiedObject=ss,
        id=b.next_id("cl"),
    )
    _external_id(b, pkg, SS_PATIENT_ID, ss, _cx(patient.ins), "XDSSubmissionSet.patientId")
    source_id = submission.source_id or _uuid_oid("medsecure:" + submission.author.idnps)
    _external_id(b, pkg, SS_SOURCE_ID, ss, source_id, "XDSSubmissionSet.sourceId")
    _external_id(
        b, pkg, SS_UNIQUE_ID, ss, submission.unique_id or _uuid_oid(), "XDSSubmissionSet.uniqueId"
    )
    for i, w in enumerate(written, 1):
        doc = w.spec.document
        obj = f"Document{i:02d}"
        w.obj_id = obj
        media_type = doc.media_type or "application/octet-stream"
        eo = _el(rol, "ExtrinsicObject", id=obj, mimeType=media_type, objectType=DOCUMENT_ENTRY)
        _slot(eo, "creationTime", [_ts(doc.created or now)])
        _slot(eo, "hash", [w.sha1])
        _slot(eo, "size", [str(w.size)])
        _slot(eo, "languageCode", [w.spec.language])
        _slot(eo, "URI", [w.uri])
        _slot(eo, "sourcePatientId", [_cx(patient.ins)])
        _slot(eo, "sourcePatientInfo", _patient_info(patient))
        if w.spec.service_start is not None:
            _slot(eo, "serviceStartTime", [_ts(w.spec.service_start)])
        if w.spec.service_stop is not None:
            _slot(eo, "serviceStopTime", [_ts(w.spec.service_stop)])
        _localized(eo, "Name", doc.title or doc.filename)
        _author_classification(b, eo, DE_AUTHOR, obj, submission.author)
        _classification(b, eo, DE_CLASS, obj, w.spec.class_code, "class code")
        if doc.document_type is None:
            raise ValueError("a document in an XDM package needs a document_type (its typeCode)")
        _classification(b, eo, DE_TYPE, obj, doc.document_type, "document type")
        conf = Code(
            code=doc.confidentiality,
            label=_CONFIDENTIALITY_LABELS[doc.confidentiality],
            system=CONFIDENTIALITY_SYSTEM,
        )
        _classification(b, eo, DE_CONFIDENTIALITY, obj, conf, "confidentiality")
        for r in sorted(w.spec.restrictions):
            restriction = Code(code=r, label=RESTRICTIONS[r], system=RESTRICTION_SYSTEM)
            _classification(b, eo, DE_CONFIDENTIALITY, obj, restriction, "restriction")
        fmt = w.spec.format_code or _FORMATS.get(media_type, _DEFAULT_FORMAT)
        _classification(b, eo, DE_FORMAT, obj, fmt, "format code")
        facility = w.spec.facility_type or submission.facility_type
        _classification(b, eo, DE_FACILITY, obj, facility, "facility type")
        practice = w.spec.practice_setting or submission.practice_setting
        _classification(b, eo, DE_PRACTICE, obj, practice, "practice setting")
        for ev in w.spec.event_codes:
            _classification(b, eo, DE_EVENT, obj, ev, "event code")
        _external_id(b, eo, DE_PATIENT_ID, obj, _cx(patient.ins), "XDSDocumentEntry.patientId")
        unique = w.spec.unique_id or _document_oid(doc)
        _external_id(b, eo, DE_UNIQUE_ID, obj, unique, "XDSDocumentEntry.uniqueId")
    for w in written:
        assoc = _el(
            rol,
            "Association",
            associationType=HAS_MEMBER,
            id=b.next_id("as"),
            sourceObject=ss,
            targetObject=w.obj_id,
        )
        _slot(assoc, "SubmissionSetStatus", ["Original"])
    ET.indent(root)
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))


def _document_oid(doc: Document) -> str:
    m = re.fullmatch(r"doc-([0-9a-f]{32})", doc.id)
    if m:
        return f"2.25.{int(m.group(1), 16)}"
    return _uuid_oid("medsecure-document:" + doc.id)


def _readme(submission: XdmSubmission, count: int) -> bytes:
    text = (
        "IHE XDM package (IHE ITI-32, Distribute Document Set on Media)\r\n"
        f"Produced by: {submission.product}\r\n"
        f"Submission set: IHE_XDM/{SUBSET}\r\n"
        f"Documents: {count}\r\n"
        "Open INDEX.HTM to list the documents.\r\n"
    )
    return text.encode("utf-8")


def _index(written: Sequence[_Written]) -> bytes:
    rows = "".join(
        f'<li><a href="IHE_XDM/{SUBSET}/{html.escape(w.uri)}">'
        f"{html.escape(w.spec.document.title or w.spec.document.filename or w.uri)}</a></li>\n"
        for w in written
    )
    page = (
        '<!DOCTYPE html>\n<html lang="fr"><head><meta charset="utf-8">'
        "<title>IHE XDM</title></head>\n<body><h1>Documents</h1>\n<ul>\n"
        f"{rows}</ul></body></html>\n"
    )
    return page.encode("utf-8")


class _Sink:
    """A write-only, non-seekable target for zipfile; the caller drains it."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.pending = 0

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        self.pending += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        self.pending = 0
        return out


def _zipinfo(name: str, when: dt.datetime, compress: bool) -> zipfile.ZipInfo:
    local = when.astimezone(dt.UTC)
    info = zipfile.ZipInfo(
        name,
        date_time=(
            max(local.year, 1980),
            local.month,
            local.day,
            local.hour,
            local.minute,
            local.second,
        ),
    )
    info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    info.external_attr = 0o100600 << 16  # a regular file, owner read/write only
    return info


def _patient_of(documents: Sequence[XdmDocument]) -> Patient:
    patients = {d.document.patient for d in documents}
    if None in patients:
        raise ValueError("every document of an XDM package needs a patient (its INS)")
    if len({p.ins.matricule for p in patients if p is not None}) != 1:
        raise ValueError("an XDM package (and an MSSanté message) holds one patient's documents")
    first = documents[0].document.patient
    assert first is not None
    return first


def iter_xdm_zip(
    documents: Sequence[XdmDocument], submission: XdmSubmission, *, date: dt.datetime
) -> Iterator[bytes]:
    """The bytes of ``IHE_XDM.ZIP``, produced as the documents are read (bounded memory).

    ``date`` is the submission time (and the zip entries' time). All documents must concern one
    patient (ValueError otherwise). Hashes and sizes are those of the bytes actually written.
    """
    if not documents:
        raise ValueError("an XDM package needs at least one document")
    if not isinstance(submission, XdmSubmission):
        raise TypeError("submission must be an XdmSubmission")
    patient = _patient_of(documents)
    for d in documents:
        if d.document.document_type is None:
            raise ValueError("a document in an XDM package needs a document_type (its typeCode)")
        _oid_of(d.class_code.system, "class code")
    _ts(date)
    return _generate(list(documents), submission, patient, date)


def _generate(
    documents: list[XdmDocument], submission: XdmSubmission, patient: Patient, date: dt.datetime
) -> Iterator[bytes]:
    sink = _Sink()
    written: list[_Written] = []
    for i, d in enumerate(documents, 1):
        ext = _EXTENSIONS.get(d.document.media_type or "", "BIN")
        written.append(_Written(d, f"DOC{i:05d}.{ext}", "", 0))
    with zipfile.ZipFile(cast(IO[bytes], sink), "w") as zf:
        zf.writestr(_zipinfo("README.TXT", date, True), _readme(submission, len(written)))
        zf.writestr(_zipinfo("INDEX.HTM", date, True), _index(written))
        yield sink.drain()
        for w in written:
            doc = w.spec.document
            info = _zipinfo(f"IHE_XDM/{SUBSET}/{w.uri}", doc.created or date, True)
            digest = hashlib.sha1(usedforsecurity=False)
            size = 0
            with doc.open() as src, zf.open(info, "w", force_zip64=doc.size > (1 << 31)) as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    dst.write(chunk)
                    if sink.pending >= _CHUNK:
                        yield sink.drain()
            w.sha1, w.size = digest.hexdigest(), size
        metadata = _metadata(written, submission, patient, date)
        zf.writestr(_zipinfo(f"IHE_XDM/{SUBSET}/METADATA.XML", date, True), metadata)
    yield sink.drain()


def build_xdm_zip(
    documents: Sequence[XdmDocument],
    submission: XdmSubmission,
    out: BinaryIO,
    *,
    date: dt.datetime,
) -> int:
    """Write ``IHE_XDM.ZIP`` to ``out`` (see :func:`iter_xdm_zip`); return its size."""
    total = 0
    for chunk in iter_xdm_zip(documents, submission, date=date):
        out.write(chunk)
        total += len(chunk)
    return total


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _slots(node: ET.Element) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for slot in node.findall(f"{{{RIM}}}Slot"):
        name = slot.get("name")
        if name is None:
            continue
        out[name] = [v.text or "" for v in slot.iterfind(f"{{{RIM}}}ValueList/{{{RIM}}}Value")]
    return out


def _first(slots: dict[str, list[str]], name: str) -> str | None:
    values = slots.get(name)
    return values[0] if values else None


def _name(node: ET.Element, tag: str = "Name") -> str | None:
    ls = node.find(f"{{{RIM}}}{tag}/{{{RIM}}}LocalizedString")
    return ls.get("value") if ls is not None else None


def _code(c: ET.Element) -> Code:
    scheme = _first(_slots(c), "codingScheme")
    node = c.get("nodeRepresentation")
    if not node:
        raise MailFormatError("a classification without a code in XDM metadata")
    try:
        return Code(code=node, label=_name(c), system=scheme)
    except ValueError as exc:
        raise MailFormatError("malformed code in XDM metadata") from exc


def _classifications(
    node: ET.Element, loose: dict[str, list[ET.Element]]
) -> dict[str, list[ET.Element]]:
    out: dict[str, list[ET.Element]] = {}
    for c in [*node.findall(f"{{{RIM}}}Classification"), *loose.get(node.get("id", ""), [])]:
        scheme = c.get("classificationScheme") or c.get("classificationNode") or ""
        out.setdefault(scheme, []).append(c)
    return out


def _external(node: ET.Element) -> dict[str, str]:
    return {
        e.get("identificationScheme", ""): e.get("value", "")
        for e in node.findall(f"{{{RIM}}}ExternalIdentifier")
    }


def _one_code(classes: dict[str, list[ET.Element]], scheme: str) -> Code | None:
    found = classes.get(scheme)
    return _code(found[0]) if found else None


_URI_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")


def _entry(
    eo: ET.Element, folder: str, loose: dict[str, list[ET.Element]], names: set[str]
) -> XdmEntry:
    slots = _slots(eo)
    classes = _classifications(eo, loose)
    uri = (slots.get("URI") or [""])[0].strip()
    if not _URI_RE.fullmatch(uri) or ".." in uri.split("/"):
        raise MailFormatError("a document URI in XDM metadata is missing or unsafe")
    path = f"IHE_XDM/{folder}/{uri}"
    if path not in names and f"IHE_XDM/{uri}" in names and uri.startswith(folder + "/"):
        path = f"IHE_XDM/{uri}"  # some producers prefix the subset folder (as DRIM-M does)
    if path not in names:
        raise MailFormatError("a document listed in XDM metadata is missing from the package")
    sha1 = (slots.get("hash") or [""])[0].strip().lower()
    if not re.fullmatch(r"[0-9a-f]{40}", sha1):
        raise MailFormatError("a document in XDM metadata has no valid SHA-1 hash")
    size_text = (slots.get("size") or [""])[0].strip()
    if not (size_text.isascii() and size_text.isdigit()):
        raise MailFormatError("a document in XDM metadata has no valid size")
    ext = _external(eo)
    patient = None
    patient_cx = ext.get(DE_PATIENT_ID) or _first(slots, "sourcePatientId")
    if patient_cx:
        patient = _parse_patient(_parse_cx(patient_cx), slots.get("sourcePatientInfo") or [])
    author = None
    if classes.get(DE_AUTHOR):
        author = _parse_author(_slots(classes[DE_AUTHOR][0]))
    confidentiality = None
    restrictions: set[str] = set()
    for c in classes.get(DE_CONFIDENTIALITY, []):
        code = _code(c)
        if code.code in RESTRICTIONS:
            restrictions.add(code.code)
        elif code.code in _CONFIDENTIALITY_LABELS and confidentiality is None:
            confidentiality = code.code
    return XdmEntry(
        uri=uri,
        path=path,
        media_type=eo.get("mimeType") or "application/octet-stream",
        sha1=sha1,
        size=int(size_text),
        title=_name(eo),
        created=_parse_ts(_first(slots, "creationTime")),
        language=_first(slots, "languageCode"),
        patient=patient,
        author=author,
        class_code=_one_code(classes, DE_CLASS),
        type_code=_one_code(classes, DE_TYPE),
        format_code=_one_code(classes, DE_FORMAT),
        practice_setting=_one_code(classes, DE_PRACTICE),
        facility_type=_one_code(classes, DE_FACILITY),
        confidentiality=confidentiality,
        restrictions=frozenset(restrictions),
        event_codes=tuple(_code(c) for c in classes.get(DE_EVENT, [])),
        unique_id=ext.get(DE_UNIQUE_ID),
        service_start=_parse_ts(_first(slots, "serviceStartTime")),
        service_stop=_parse_ts(_first(slots, "serviceStopTime")),
    )


def _submission_set(root: ET.Element, folder: str, names: set[str]) -> XdmSubmissionSet:
    if root.tag != f"{{{LCM}}}SubmitObjectsRequest":
        raise MailFormatError("METADATA.XML is not an ebRIM 3.0 SubmitObjectsRequest")
    rol = root.find(f"{{{RIM}}}RegistryObjectList")
    if rol is None:
        raise MailFormatError("METADATA.XML has no RegistryObjectList")
    loose: dict[str, list[ET.Element]] = {}
    for c in rol.findall(f"{{{RIM}}}Classification"):
        loose.setdefault(c.get("classifiedObject", ""), []).append(c)
    packages = rol.findall(f"{{{RIM}}}RegistryPackage")
    pkg = None
    for p in packages:
        if SUBMISSION_SET_NODE in _classifications(p, loose):
            pkg = p
            break
    if pkg is None:
        if not packages:
            raise MailFormatError("METADATA.XML has no SubmissionSet")
        pkg = packages[0]
    slots = _slots(pkg)
    classes = _classifications(pkg, loose)
    ext = _external(pkg)
    author = _parse_author(_slots(classes[SS_AUTHOR][0])) if classes.get(SS_AUTHOR) else None
    patient_cx = ext.get(SS_PATIENT_ID)
    recipients = []
    for value in slots.get("intendedRecipient", []):
        telecom = value.split("|")[-1].split("^")
        if len(telecom) > 3 and telecom[2].lower() == "internet" and telecom[3]:
            recipients.append(telecom[3])
    entries = tuple(
        _entry(eo, folder, loose, names) for eo in rol.findall(f"{{{RIM}}}ExtrinsicObject")
    )
    return XdmSubmissionSet(
        folder=folder,
        unique_id=ext.get(SS_UNIQUE_ID),
        source_id=ext.get(SS_SOURCE_ID),
        submitted=_parse_ts(_first(slots, "submissionTime")),
        title=_name(pkg),
        comments=_name(pkg, "Description"),
        author=author,
        content_type=_one_code(classes, SS_CONTENT_TYPE),
        patient_id=_parse_cx(patient_cx) if patient_cx else None,
        recipients=tuple(recipients),
        entries=entries,
    )


_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    EOFError,
    NotImplementedError,
    RuntimeError,
    ValueError,
    KeyError,
)


def parse_xdm_zip(
    source: BinaryIO | str | os.PathLike[str],
    *,
    extract: Callable[[XdmEntry], BinaryIO | None] | None = None,
    limits: XdmLimits | None = None,
) -> XdmPackage:
    """Read an ``IHE_XDM.ZIP`` (a seekable file or a path) and check every document's SHA-1 and
    size against its metadata. ``extract(entry)`` may return a file to receive the document
    (written while checked: discard it if this function raises). MailFormatError on anything
    malformed, unsafe or over ``limits``."""
    limits = limits or XdmLimits()
    try:
        with zipfile.ZipFile(source) as zf:
            return _parse_zip(zf, extract, limits)
    except MailFormatError:
        raise
    except _ZIP_ERRORS as exc:
        raise MailFormatError("not a readable zip archive") from exc


def _parse_zip(
    zf: zipfile.ZipFile,
    extract: Callable[[XdmEntry], BinaryIO | None] | None,
    limits: XdmLimits,
) -> XdmPackage:
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise MailFormatError(f"the package has more than {limits.max_members} members")
    names = {i.filename for i in infos}
    if len(names) != len(infos):
        raise MailFormatError("the package has duplicate member names")
    upper = {n.upper(): n for n in names}
    folders = sorted(
        n.split("/")[1]
        for n in names
        if re.fullmatch(r"IHE_XDM/[^/]+/METADATA\.XML", n, re.IGNORECASE)
    )
    if not folders:
        raise MailFormatError("not an IHE XDM package: no IHE_XDM/<subset>/METADATA.XML")
    if len(folders) > limits.max_submission_sets:
        raise MailFormatError("too many submission sets in the package")
    submissions = []
    for folder in folders:
        meta_name = upper[f"IHE_XDM/{folder}/METADATA.XML".upper()]
        info = zf.getinfo(meta_name)
        if info.file_size > limits.max_metadata_bytes:
            raise MailFormatError("METADATA.XML is too large")
        with zf.open(info) as fh:
            data = fh.read(limits.max_metadata_bytes + 1)
        root = parse_xml(data, max_bytes=limits.max_metadata_bytes, what="METADATA.XML")
        ss = _submission_set(root, folder, names)
        for entry in ss.entries:
            _check_document(zf, entry, extract, limits)
        submissions.append(ss)
    return XdmPackage(
        submissions=tuple(submissions),
        has_readme="README.TXT" in upper,
        has_index="INDEX.HTM" in upper,
    )


def _check_document(
    zf: zipfile.ZipFile,
    entry: XdmEntry,
    extract: Callable[[XdmEntry], BinaryIO | None] | None,
    limits: XdmLimits,
) -> None:
    info = zf.getinfo(entry.path)
    if info.file_size != entry.size:
        raise MailFormatError("a document's size does not match its XDM metadata")
    if info.file_size > limits.max_document_bytes:
        raise MailFormatError("a document in the package is too large")
    out = extract(entry) if extract is not None else None
    digest = hashlib.sha1(usedforsecurity=False)
    size = 0
    with zf.open(info) as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if out is not None:
                out.write(chunk)
    if size != entry.size or digest.hexdigest() != entry.sha1:
        raise MailFormatError("a document's hash or size does not match its XDM metadata")
