"""The MSSanté profile: structure, X-MSS-* fields, subject, patient mailbox rules."""

from __future__ import annotations

import email
import email.policy
import io

import pytest
from mailkit import MATRICULE, PATIENT, SUBMISSION, WHEN, cda_document, pdf_document, xdm_document

from medsecure.identifiers import INS
from medsecure.mail import (
    PatientMailboxForbidden,
    XdmDocument,
    build_mssante_message,
    display_subject,
    is_patient_mailbox,
    mssante_subject,
    parse_message,
    parse_xdm_zip,
)
from medsecure.models import Code, Patient

SENDER = "dr.martin@medecin.mssante.fr"
PRO = "dr.durand@clinique-exemple.mssante.fr"
PATIENT_BOX = f"{MATRICULE}@patient.mssante.fr"


def build(**over: object) -> bytes:
    args: dict[str, object] = {
        "sender": SENDER,
        "recipients": [PRO],
        "body": "Bonjour,\nci-joint le compte rendu.\nBien confraternellement.",
        "date": WHEN,
        "message_id": "01HXT0ZK3M5N7P9Q1R3S5T7V9W@medecin.mssante.fr",
        "product_reference": "NIL-2024-0042",
        "documents": [xdm_document(), pdf_document()],
        "submission": SUBMISSION,
    }
    args.update(over)
    return build_mssante_message(**args).read()  # type: ignore[arg-type]


def headers(raw: bytes) -> email.message.Message:
    return email.message_from_bytes(raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")


def test_mime_round_trip_with_a_pdf_and_the_xdm_archive() -> None:
    raw = build(read_receipt=True)
    files: dict[str, io.BytesIO] = {}
    parsed = parse_message(
        io.BytesIO(raw), attachment_sink=lambda i: files.setdefault(i.filename or "?", io.BytesIO())
    )
    assert parsed.kind == "mail"
    assert [p.media_type for p in parsed.parts] == [
        "text/plain",
        "application/pdf",
        "application/zip",
    ]
    assert list(files) == ["Compte rendu échographie.pdf", "IHE_XDM.ZIP"]
    assert files["Compte rendu échographie.pdf"].getvalue() == pdf_document().content
    pkg = parse_xdm_zip(io.BytesIO(files["IHE_XDM.ZIP"].getvalue()))
    (entry,) = pkg.entries
    assert entry.patient == PATIENT
    assert entry.sha1 and entry.size == cda_document().size
    assert parsed.text == "Bonjour,\r\nci-joint le compte rendu.\r\nBien confraternellement."
    assert parsed.disposition_notification_to == SENDER
    assert parsed.mssante.codecda == ("11488-4",)
    assert parsed.mssante.ins == "O"
    assert parsed.mssante.nil == "NIL-2024-0042"
    assert parsed.mssante.mes is None
    std = email.message_from_bytes(raw, policy=email.policy.default)
    assert not std.defects
    assert [a.get_filename() for a in std.iter_attachments()] == [
        "Compte rendu échographie.pdf",
        "IHE_XDM.ZIP",
    ]


def test_the_ans_subject_form() -> None:
    raw = build()
    subject = parse_message(io.BytesIO(raw)).subject
    assert subject == "XDM/1.0/DDM+Compte rendu de consultation DUPONT-LEFEVRE Helene 05/03/1979"
    assert display_subject(subject) == (
        "Compte rendu de consultation DUPONT-LEFEVRE Helene 05/03/1979"
    )
    two = build(documents=[xdm_document(), xdm_document(cda_document(title="Autre"))])
    assert parse_message(io.BytesIO(two)).subject == (
        "XDM/1.0/DDM+2 documents DUPONT-LEFEVRE Helene 05/03/1979"
    )
    hidden = build(identify_patient_in_subject=False, subject="Résultats")
    assert parse_message(io.BytesIO(hidden)).subject == "XDM/1.0/DDM+Résultats"
    assert mssante_subject("x" * 60, None) == "XDM/1.0/DDM+" + "x" * 40
    assert mssante_subject("Echographie", PATIENT, error=("902", "Inconnu")).startswith(
        "[KO Intégration système !][902] XDM/1.0/DDM+Echographie DUPONT-LEFEVRE"
    )
    assert display_subject("Bonjour docteur") == "Bonjour docteur"


def test_x_mss_fields_without_cda() -> None:
    raw = build(documents=[pdf_document()], subject="Résultats")
    h = headers(raw)
    assert h["X-MSS-NIL"] == "NIL-2024-0042"
    assert h["X-MSS-CODECDA"] is None and h["X-MSS-INS"] is None
    assert parse_message(io.BytesIO(raw)).subject == "Résultats"
    bare = build(documents=[], subject="Question")
    assert headers(bare)["X-MSS-NIL"] == "NIL-2024-0042"


def test_x_mss_codecda_lists_each_cda_type_once() -> None:
    lab = Code(code="11502-2", label="CR d'examens biologiques", system="http://loinc.org")
    raw = build(
        documents=[
            xdm_document(),
            xdm_document(cda_document(document_type=lab)),
            xdm_document(cda_document()),
        ]
    )
    assert headers(raw)["X-MSS-CODECDA"] == "11488-4,11502-2"


def test_x_mss_ins_is_n_without_a_qualified_ins() -> None:
    partial = Patient(ins=INS(MATRICULE, birth_name="DUPONT"))
    raw = build(documents=[xdm_document(cda_document(patient=partial))])
    assert headers(raw)["X-MSS-INS"] == "N"


def test_patient_mailbox_gets_x_mss_mes_fin() -> None:
    raw = build(recipients=[PATIENT_BOX])
    assert headers(raw)["X-MSS-MES"] == "FIN"
    may_reply = build(recipients=[PATIENT_BOX], patient_may_reply=True)
    assert headers(may_reply)["X-MSS-MES"] is None
    assert headers(build())["X-MSS-MES"] is None
    assert is_patient_mailbox(PATIENT_BOX.upper())
    assert not is_patient_mailbox(PRO)


def test_opposition_and_invisible_documents_never_reach_the_patient() -> None:
    with pytest.raises(PatientMailboxForbidden, match="opposition"):
        build(recipients=[PRO, PATIENT_BOX], patient_opposition=True)
    hidden = XdmDocument(
        cda_document(),
        class_code=xdm_document().class_code,
        restrictions=frozenset({"INVISIBLE_PATIENT"}),
    )
    with pytest.raises(PatientMailboxForbidden, match="INVISIBLE_PATIENT"):
        build(recipients=[PATIENT_BOX], documents=[hidden])
    # the same document may go to a professional
    assert build(recipients=[PRO], documents=[hidden])
    other = "162018885045327@patient.mssante.fr"
    with pytest.raises(PatientMailboxForbidden, match="INS"):
        build(recipients=[other])
    for err in (PatientMailboxForbidden,):
        try:
            build(recipients=[PATIENT_BOX], patient_opposition=True)
        except err as exc:
            assert MATRICULE not in str(exc)


def test_multipart_alternative_body() -> None:
    raw = build(html_body="<p>Bonjour,<br>ci-joint le <b>compte rendu</b>.</p>")
    std = email.message_from_bytes(raw, policy=email.policy.default)
    body = std.get_body(("html",))
    assert body is not None and "compte rendu" in body.get_content()
    plain = std.get_body(("plain",))
    assert plain is not None and "Bonjour" in plain.get_content()
    parsed = parse_message(io.BytesIO(raw))
    assert [p.media_type for p in parsed.parts][:2] == ["text/plain", "text/html"]


def test_misuse() -> None:
    with pytest.raises(ValueError, match="wrap it in XdmDocument"):
        build(documents=[cda_document()])
    with pytest.raises(ValueError, match="submission"):
        build(submission=None)
    with pytest.raises(ValueError, match="one patient"):
        build(
            documents=[
                xdm_document(),
                pdf_document(
                    patient=Patient(ins=INS("162018885045327", oid="1.2.250.1.213.1.4.10"))
                ),
            ]
        )
    with pytest.raises(ValueError, match="X-MSS-NIL"):
        build(product_reference=" ")
    with pytest.raises(ValueError):
        build(recipients=["x@y.fr\r\nBcc: z@w.fr"])
    with pytest.raises(TypeError):
        build(documents=["not a document"])
