from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError

from medsecure import Identity
from medsecure.identifiers import INS
from medsecure.models import (
    Code,
    Endpoint,
    KeyEntry,
    Mailbox,
    Organization,
    OrganizationRef,
    Patient,
    Practitioner,
)


def make_practitioner(key: Identity) -> Practitioner:
    return Practitioner(
        idnps="810000005479",
        family_name="MARTIN",
        given_name="Sophie",
        profession=Code(code="10", label="Médecin"),
        specialty=Code(code="SM26", label="Cardiologie"),
        organizations=(OrganizationRef(idnst="1540000010", name="CHU de Nancy", city="Nancy"),),
        mailboxes=(Mailbox(address="sophie.martin@medecin.mssante.fr", type="PER"),),
        keys=(KeyEntry(public=key.public, not_after=dt.datetime(2030, 1, 1, tzinfo=dt.UTC)),),
        endpoints=(
            Endpoint(kind="relay", url="https://relay.example/", mailbox="smartin"),
            Endpoint(kind="mail", address="sophie.martin@medecin.mssante.fr", priority=1),
            Endpoint(kind="drop", path="/mnt/share/smartin"),
        ),
    )


def test_practitioner_round_trip(alice: Identity) -> None:
    p = make_practitioner(alice)
    assert p.rpps == "10000005479"  # derived from the IDNPS
    again = Practitioner.from_json(p.to_json())
    assert again == p
    assert again.keys[0].public == alice.public
    assert again.display_name == "Sophie MARTIN"
    assert "idnps:810000005479" in p.refs() and "mss:sophie.martin@medecin.mssante.fr" in p.refs()
    with pytest.raises(ValidationError):
        p.family_name = "X"  # type: ignore[misc]  # frozen


def test_practitioner_validation(alice: Identity) -> None:
    with pytest.raises(ValidationError, match="not a professional"):
        Practitioner(idnps="1540000010")
    with pytest.raises(ValidationError, match="rpps does not match"):
        Practitioner(idnps="810000005479", rpps="10000000001")
    with pytest.raises(ValidationError):
        Practitioner(idnps="810000005479", mailboxes=(Mailbox(address="x@gmail.com"),))
    with pytest.raises(ValidationError):
        Practitioner.from_json('{"idnps": "810000005479", "unknown": 1}')
    with pytest.raises(ValidationError):
        Practitioner.from_json('{"idnps": "810000005479", "keys": [{"public": "msp1garbage"}]}')
    with pytest.raises(ValidationError, match="needs url, mailbox"):
        Endpoint(kind="relay")
    adeli = Practitioner(idnps="adeli:751004587")
    assert adeli.idnps == "0751004587" and adeli.adeli == "751004587"


def test_organization_and_patient_round_trip() -> None:
    org = Organization(
        idnst="1540000010",
        name="CHU de Nancy",
        mailboxes=(Mailbox(address="secretariat@chu-nancy.mssante.fr", type="ORG"),),
    )
    assert org.finess == "540000010"
    assert Organization.from_json(org.to_json()) == org
    with pytest.raises(ValidationError, match="unknown structure identifier prefix"):
        Organization(idnst="810000005479")
    patient = Patient(
        ins=INS(
            "279035121518989",
            birth_name="DE VINCI",
            first_given_name="RUTH",
            given_names=("RUTH",),
            birth_date=dt.date(1979, 3, 2),
            sex="F",
        ),
        given_name="Ruth",
    )
    again = Patient.from_json(patient.to_json())
    assert again == patient and again.ins.birth_date == dt.date(1979, 3, 2)
    with pytest.raises(ValidationError):
        Patient.from_json('{"ins": {"matricule": "279035121518988"}}')


def test_key_validity_must_be_timezone_aware(alice: Identity) -> None:
    # a naive time would make every later trust decision fail; refuse it when the entry is read
    with pytest.raises(ValidationError, match="timezone"):
        KeyEntry(public=alice.public, not_after=dt.datetime(2030, 1, 1))
    ok = KeyEntry.from_json(
        KeyEntry(public=alice.public, not_after=dt.datetime(2030, 1, 1, tzinfo=dt.UTC)).to_json()
    )
    assert ok.not_after is not None and ok.not_after.tzinfo is not None


def test_validation_errors_never_quote_patient_data() -> None:
    for attempt in (
        lambda: INS("279035121518988"),
        lambda: Patient.from_json(
            '{"ins": {"matricule": "279035121518988", "birth_name": "DUPONT"}}'
        ),
        lambda: Patient.from_json(
            '{"ins": {"matricule": "279035121518989"}, "family_name": ["DUPONT"]}'
        ),
    ):
        with pytest.raises(ValueError) as info:
            attempt()
        assert "279035121518988" not in str(info.value) and "DUPONT" not in str(info.value)
