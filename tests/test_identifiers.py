from __future__ import annotations

import datetime as dt

import pytest

from medsecure import identifiers as I
from medsecure.identifiers import INS


def test_rpps_sample_from_ans_documentation() -> None:
    ident = I.parse("rpps:10000005479")
    assert (ident.kind, ident.value, ident.idnps) == ("rpps", "10000005479", "810000005479")
    assert ident.checksum_ok is True
    assert ident.is_professional
    assert str(ident) == "rpps:10000005479"
    assert I.parse("810000005479") == ident
    assert I.parse("idnps:810000005479") == ident
    assert I.parse("  RPPS:10000005479 ") == ident


def test_checksum_is_reported_not_enforced() -> None:
    ident = I.parse("rpps:10003456789")  # an official fictitious example that fails Luhn
    assert ident.checksum_ok is False
    assert I.parse("rpps:10101201234").checksum_ok is False


def test_adeli_and_bare_idnps() -> None:
    adeli = I.parse("adeli:751004587")
    assert adeli.idnps == "0751004587" and adeli.kind == "adeli"
    assert I.parse("0751004587") == adeli
    assert isinstance(adeli.checksum_ok, bool)
    assert I.parse("adeli:2A1234567").checksum_ok is None  # Corsica: no Luhn


def test_structures_use_their_own_prefixes() -> None:
    finess = I.parse("finess:540000010")
    assert finess.idnps == "1540000010" and not finess.is_professional
    assert I.parse("1540000010") == finess  # 10 characters starting with 1: FINESS
    siret = I.parse("siret:12345678901234")
    assert siret.idnps == "312345678901234"
    assert I.parse("312345678901234") == siret
    assert I.parse("idnst:2123456789").kind == "siren"
    assert I.parse("2123456789", structure=True).kind == "siren"
    assert I.parse("4100000054790001", structure=True).kind == "rpps-rang"
    assert I.parse("siret:73282932000074").checksum_ok is True
    # a professional's internal identifier built on a structure's number
    internal = I.parse("3540000010/12345")
    assert internal.kind == "internal" and internal.is_professional


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rpps:123", "11 digits"),
        ("rpps:1000000547X", "11 digits"),
        ("adeli:12345", "9 characters"),
        ("finess:12", "9 characters"),
        ("siret:123", "14 digits"),
        ("foo:123", "unknown identifier scheme"),
        ("9123456789", "unknown IDNPS prefix '9'"),
        ("81234", "must be 12 digits"),
        ("012", "must be 10 characters"),
        ("", "empty"),
        ("8100000054#9", "unexpected characters"),
        ("9123456789", r"expected 8 \(RPPS\) or 0 \(ADELI\)"),
    ],
)
def test_malformed_identifiers(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        I.parse(text)


@pytest.mark.parametrize(
    "text",
    [
        "rpps:" + "\u0661" * 11,  # Arabic-Indic digits: \\d and str.isdigit accept them
        "rpps:1000000547\u0669",
        "8" + "\u0661" * 11,
        "adeli:" + "\uff11" * 9,  # fullwidth
        "rpps:1000000547\u00b2",  # superscript two: isdigit() but no decimal digit
    ],
)
def test_identifiers_are_ascii_digits_only(text: str) -> None:
    """A lookalike of a valid number written with other scripts' digits is another identifier
    to every comparison: it is refused, never parsed."""
    with pytest.raises(ValueError):
        I.parse(text)


def test_structure_prefix_table_differs() -> None:
    with pytest.raises(ValueError, match="unknown structure identifier prefix '8'"):
        I.parse("810000005479", structure=True)
    with pytest.raises(TypeError):
        I.parse(123)  # type: ignore[arg-type]


def test_ins_insi_test_identity() -> None:
    ins = INS("279035121518989", oid=I.INS_NIR)
    assert ins.key_ok and ins.kind == "NIR" and str(ins) == "279035121518989"
    assert I.ins_key("2790351215189") == 89


def test_ins_traits_and_json_round_trip() -> None:
    from pydantic import TypeAdapter

    ins = INS(
        "279035121518989",
        birth_name="DE VINCI",
        first_given_name="RUTH",
        given_names=("RUTH", "ISABELLE"),
        birth_date=dt.date(1979, 3, 2),
        sex="F",
        birth_place="51215",
    )
    adapter = TypeAdapter(INS)
    again = adapter.validate_json(adapter.dump_json(ins))
    assert again == ins and again.given_names == ("RUTH", "ISABELLE")


def test_ins_corsica() -> None:
    base = "1850" + "2" + "2A" + "004" + "123"  # 13 chars with 2A department
    base = "18502" + "2A" + "004123"
    assert len(base) == 13
    key = 97 - int(base.replace("2A", "19")) % 97
    ins = INS(base + f"{key:02d}")
    assert ins.key_ok
    b = "18502" + "2B" + "004123"
    assert INS(b + f"{97 - int(b.replace('2B', '18')) % 97:02d}").key_ok


def test_ins_wrong_key() -> None:
    with pytest.raises(ValueError, match="key does not match"):
        INS("279035121518988")
    lenient = INS("279035121518988", oid=I.INS_TEST_NIR)
    assert not lenient.key_ok
    assert INS("279035121518988", oid=I.INS_DEMO_NIR).kind == "demo NIR"
    assert INS("279035121518989", oid=I.INS_NIA).kind == "NIA"
    with pytest.raises(ValueError, match="malformed INS"):
        INS("27903512151898")
    with pytest.raises(ValueError, match="malformed INS"):
        INS("979035121518989")
    with pytest.raises(ValueError, match="unknown INS OID"):
        INS("279035121518989", oid="1.2.3")
    with pytest.raises(ValueError, match="birth place"):
        INS("279035121518989", birth_place="ABC")


def test_mssante_addresses() -> None:
    a = I.parse_address("Sophie.Martin@Medecin.MSSante.fr")
    assert str(a) == "sophie.martin@medecin.mssante.fr"
    assert not a.is_patient and a.ins is None
    p = I.parse_address("279035121518989@patient.mssante.fr")
    assert p.is_patient and p.ins is not None and p.ins.matricule == "279035121518989"
    assert str(I.parse_address("mailto:x@mssante.fr")) == "x@mssante.fr"
    for bad, msg in [
        ("sophie.martin@gmail.com", "not an MSSanté address"),
        ("sophie.martin", "expected one '@'"),
        ("a@b@mssante.fr", "expected one '@'"),
        (".dot@medecin.mssante.fr", "bad local part"),
        ("x@-bad.mssante.fr", "bad domain"),
        ("279035121518988@patient.mssante.fr", "key does not match"),
        ("x@evilmssante.fr", "not an MSSanté address"),
    ]:
        with pytest.raises(ValueError, match=msg):
            I.parse_address(bad)
