"""The MSSanté profile: a standard message for a recipient without a medsecure key.

**TLS hop by hop only.** The operators' servers see everything here: the subject (which, by
the ANS convention, names the patient), the body and every document. It is sent only when the
caller asks for it, and the audit log records it.

Rules, with their sources:

* Subject (Référentiel socle MSSanté #2 §3.1.3, ECO.2.1.3; form shown in the ANS IG
  ansforge/IG-hl7v2-volet-trans-lps-doc-cda-courriel-mss ``struct-msg-mdn.md``): a message
  carrying documents in an IHE_XDM archive has the subject
  ``XDM/1.0/DDM+<libellé> <NOM> <prénom> <date de naissance>`` — libellé the document type's
  label (40 characters at most) or ``N documents``, NOM the birth name in capitals without
  accents, prénom without accents, date ``JJ/MM/AAAA``. The reader hides the prefix
  (SC.MSS/UX.28: :func:`display_subject`).
* One patient per message, documents as IHE_XDM.ZIP plus their human-readable renderings as
  plain attachments (ECO.2.1.1).
* ``X-MSS-CODECDA`` (§3.8.1): the CDA type codes of the documents in the archive, comma
  separated, absent without CDA. ``X-MSS-INS`` (§3.8.2): ``O`` when the archive's patient has a
  qualified INS (matricule, OID and the four traits: birth name, first given name, birth date,
  sex), else ``N``; absent without CDA. ``X-MSS-NIL`` (§3.8.3): the product reference given
  when the product was declared, on every message. ``X-MSS-MES: FIN`` (§3.4.2.3): on a message
  to a patient's mailbox (``<INS>@patient.mssante.fr``, Mon Espace Santé) when the patient may
  not reply.
* A patient's recorded opposition, or a document marked ``INVISIBLE_PATIENT`` (TRE_A07), forbids
  sending to the patient's mailbox (Ségur SC.MSS requirements on "envoi vers l'usager").
* ``Disposition-Notification-To`` asks for an MDN (RFC 8098 §2.1).
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from collections.abc import Callable, Iterator, Sequence

from .._document import CDA, Document
from ..models import Patient
from ._errors import PatientMailboxForbidden
from ._headers import (
    addresses_header,
    check_parties,
    check_value,
    normalize_message_id,
    opening_headers,
    raw_header_line,
)
from ._mime import (
    Leaf,
    MessageStream,
    Multipart,
    base64_body,
    leaf,
    read_chunks,
    render,
    text_body,
)
from ._xdm import XdmDocument, XdmSubmission, iter_xdm_zip

__all__ = [
    "PATIENT_DOMAIN",
    "XDM_FILENAME",
    "XDM_SUBJECT_PREFIX",
    "build_mssante_message",
    "display_subject",
    "is_patient_mailbox",
    "mssante_subject",
]

XDM_SUBJECT_PREFIX = "XDM/1.0/DDM"
XDM_FILENAME = "IHE_XDM.ZIP"
PATIENT_DOMAIN = "patient.mssante.fr"
_LABEL_MAX = 40


def _plain(text: str) -> str:
    """Without accents (the ANS subject form)."""
    folded = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in folded if not unicodedata.combining(ch))


def mssante_subject(
    label: str,
    patient: Patient | None,
    *,
    identify_patient: bool = True,
    error: tuple[str, str] | None = None,
) -> str:
    """``XDM/1.0/DDM+<libellé> <NOM> <prénom> <JJ/MM/AAAA>`` (ECO.2.1.3); with ``error``, the
    ANS error form ``[KO Intégration système !][<code>] XDM/1.0/DDM+…``. Without
    ``identify_patient`` (or without a patient) the patient part is left out."""
    check_value(label, "the subject label")
    parts = [label.strip()[:_LABEL_MAX].rstrip()]
    if identify_patient and patient is not None:
        ins = patient.ins
        if ins.birth_name:
            parts.append(_plain(ins.birth_name).upper())
        if ins.first_given_name:
            parts.append(_plain(ins.first_given_name))
        if ins.birth_date is not None:
            parts.append(f"{ins.birth_date:%d/%m/%Y}")
    subject = f"{XDM_SUBJECT_PREFIX}+{' '.join(p for p in parts if p)}"
    if error is not None:
        subject = f"[KO Intégration système !][{error[0]}] {subject}"
    return subject


def display_subject(subject: str | None) -> str | None:
    """The subject as a user should see it: without the technical ``XDM/1.0/DDM+`` prefix
    (SC.MSS/UX.28); any other subject unchanged."""
    if subject is None:
        return None
    head, sep, rest = subject.partition(XDM_SUBJECT_PREFIX)
    if not sep:
        return subject
    return (head + rest.lstrip("+").lstrip()).strip()


def is_patient_mailbox(address: str) -> bool:
    """True for a patient's Mon Espace Santé mailbox (``<INS>@patient.mssante.fr``)."""
    return address.rsplit("@", 1)[-1].lower() == PATIENT_DOMAIN


def _qualified(patient: Patient) -> bool:
    ins = patient.ins
    return bool(ins.matricule and ins.oid and ins.birth_name and ins.first_given_name) and (
        ins.birth_date is not None and ins.sex is not None
    )


def _attachment_name(doc: Document, index: int) -> str:
    if doc.filename:
        return doc.filename
    ext = {
        "application/pdf": "pdf",
        "image/jpeg": "jpg",
        "image/png": "png",
        "text/plain": "txt",
        "text/xml": "xml",
    }.get(doc.media_type or "", "bin")
    return f"document{index}.{ext}"


def build_mssante_message(
    *,
    sender: str,
    recipients: Sequence[str],
    body: str,
    date: dt.datetime,
    message_id: str,
    product_reference: str,
    documents: Sequence[Document | XdmDocument] = (),
    submission: XdmSubmission | None = None,
    subject: str | None = None,
    html_body: str | None = None,
    sender_name: str | None = None,
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
    read_receipt: bool = False,
    patient_may_reply: bool = False,
    patient_opposition: bool = False,
    identify_patient_in_subject: bool = True,
    header_charset: str = "utf-8",
) -> MessageStream:
    """A standard MSSanté message, produced as a stream.

    CDA documents (and every :class:`XdmDocument`) go into ``IHE_XDM.ZIP`` (``submission``
    required then; a CDA given as a plain ``Document`` must be wrapped in an ``XdmDocument``
    to carry its class code); other documents (PDF renderings…) are plain attachments.
    ``message_id`` is the bare Message-ID (``id@host``). ``subject`` is the libellé of the ANS
    subject when there is an archive (see :func:`mssante_subject`), else the whole subject.

    Raises :class:`PatientMailboxForbidden` when a recipient is a patient's mailbox and the
    patient has recorded an opposition or a document is ``INVISIBLE_PATIENT``, or when the
    mailbox's INS is not the documents' patient's; ValueError for malformed arguments.
    """
    check_parties(sender, recipients)
    check_value(product_reference, "product_reference")
    if not product_reference.strip() or not product_reference.isascii():
        raise ValueError("product_reference (X-MSS-NIL) must be a non-empty ASCII reference")
    mid = normalize_message_id(message_id)

    packaged: list[XdmDocument] = []
    attached: list[Document] = []
    for item in documents:
        if isinstance(item, XdmDocument):
            packaged.append(item)
        elif isinstance(item, Document):
            if item.media_type == CDA:
                raise ValueError(
                    "a CDA document goes into IHE_XDM.ZIP: wrap it in XdmDocument(document, "
                    "class_code=…)"
                )
            attached.append(item)
        else:
            raise TypeError("documents must be Document or XdmDocument values")
    all_docs = [d.document for d in packaged] + attached
    patients = {d.patient.ins.matricule for d in all_docs if d.patient is not None}
    if len(patients) > 1:
        raise ValueError("an MSSanté message concerns one patient only (ECO.2.1.1)")
    patient = next((d.patient for d in all_docs if d.patient is not None), None)
    if packaged and submission is None:
        raise ValueError("an IHE_XDM archive needs submission=XdmSubmission(…)")

    to_patient = [r for r in recipients if is_patient_mailbox(r)]
    if to_patient:
        if patient_opposition:
            raise PatientMailboxForbidden(
                "the patient has recorded an opposition: nothing is sent to their mailbox"
            )
        if any("INVISIBLE_PATIENT" in d.restrictions for d in packaged):
            raise PatientMailboxForbidden(
                "a document is not visible to the patient (INVISIBLE_PATIENT): it is not sent "
                "to the patient's mailbox"
            )
        for r in to_patient:
            local = r.rsplit("@", 1)[0].upper()
            if patient is not None and local != patient.ins.matricule:
                raise PatientMailboxForbidden(
                    "the patient mailbox's INS is not the documents' patient's INS"
                )

    if packaged:
        label = subject
        if label is None:
            if len(packaged) == 1:
                dtype = packaged[0].document.document_type
                label = (dtype.label if dtype and dtype.label else None) or (
                    packaged[0].document.title or "Document"
                )
            else:
                label = f"{len(packaged)} documents"
        full_subject = mssante_subject(label, patient, identify_patient=identify_patient_in_subject)
    else:
        full_subject = subject if subject is not None else "Message"

    headers = opening_headers(
        (sender_name, sender),
        recipients,
        date,
        mid,
        full_subject,
        charset=header_charset,
        in_reply_to=in_reply_to,
        references=references,
    )
    if read_receipt:
        headers.append(addresses_header("Disposition-Notification-To", [(None, sender)]))
    shown = {"From": sender, "To": ", ".join(recipients), "Subject": full_subject}
    if packaged:
        codes: list[str] = []
        for d in packaged:
            dtype = d.document.document_type
            if d.document.media_type == CDA and dtype is not None and dtype.code not in codes:
                codes.append(dtype.code)
        if codes:
            codecda = ",".join(codes)
            headers.append(raw_header_line("X-MSS-CODECDA", codecda))
            ins_flag = "O" if patient is not None and _qualified(patient) else "N"
            headers.append(raw_header_line("X-MSS-INS", ins_flag))
            shown["X-MSS-CODECDA"] = codecda
            shown["X-MSS-INS"] = ins_flag
    headers.append(raw_header_line("X-MSS-NIL", product_reference.strip()))
    shown["X-MSS-NIL"] = product_reference.strip()
    if to_patient and not patient_may_reply:
        headers.append(raw_header_line("X-MSS-MES", "FIN"))
        shown["X-MSS-MES"] = "FIN"

    text_part = leaf(
        "text/plain", text_body(body), encoding="quoted-printable", params=[("charset", "utf-8")]
    )
    first: Leaf | Multipart = text_part
    if html_body is not None:
        html_part = leaf(
            "text/html",
            text_body(html_body),
            encoding="quoted-printable",
            params=[("charset", "utf-8")],
        )
        first = Multipart("alternative", [text_part, html_part])
    parts: list[Leaf | Multipart] = [first]
    for i, doc in enumerate(attached, 1):
        parts.append(
            leaf(
                doc.media_type or "application/octet-stream",
                base64_body(_opener(doc)),
                encoding="base64",
                disposition="attachment",
                filename=_attachment_name(doc, i),
                charset=header_charset,
            )
        )
    if packaged:
        assert submission is not None
        chunks = iter_xdm_zip(packaged, submission, date=date)  # validates now, runs lazily
        parts.append(
            leaf(
                "application/zip",
                base64_body(lambda: chunks),
                encoding="base64",
                disposition="attachment",
                filename=XDM_FILENAME,
            )
        )
    message = Multipart("mixed", parts) if len(parts) > 1 else None
    tree: Leaf | Multipart = message if message is not None else first
    return MessageStream(render(headers, tree), message_id=mid, headers=shown)


def _opener(doc: Document) -> Callable[[], Iterator[bytes]]:
    def chunks() -> Iterator[bytes]:
        with doc.open() as fh:
            yield from read_chunks(fh)

    return chunks
