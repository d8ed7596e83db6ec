"""French national identifiers of health professionals, structures and patients.

* **RPPS** (Répertoire Partagé des Professionnels de Santé): the 11-digit lifelong number of a
  health professional; its last digit is a Luhn check digit.
* **ADELI** (Automatisation DEs LIstes): the older 9-character number of professionals not (yet)
  in the RPPS (some paramedical professions); the ninth character is a Luhn check digit.
* **IDNPS** (identifiant national de professionnel de santé, ``idNatPs``): what the Annuaire
  Santé and the CPS card carry: a one-digit type prefix then the number. For professionals:
  ``8`` + RPPS, ``0`` + ADELI (also ``1``/``3``/``4``/``5``/``6`` + an internal number after a
  structure's, which medsecure accepts as ``kind="internal"``).
* **IDNST** (``idNatSt``), for structures — the prefixes differ from professionals': ``1`` +
  FINESS, ``2`` + SIREN, ``3`` + SIRET, ``4`` + RPPS-rang, ``0`` + ADELI cabinet.
* **FINESS** (Fichier National des Établissements Sanitaires et Sociaux): 9 characters (digits,
  or ``2A``/``2B`` for Corsica in the department), the ninth a Luhn check digit.
* **SIRET** / **SIREN**: 14 / 9 digit business identifiers, Luhn-checked.
* **INS** (Identifiant National de Santé): the patient's NIR (social-security number) or NIA,
  13 characters and a 2-digit key ``97 − (N mod 97)``; Corsica's ``2A``/``2B`` count as
  ``19``/``18``. It always travels with the identity traits it was qualified with.
* **MSSanté** addresses: mailboxes of the national secure health messaging space, in
  ``*.mssante.fr`` domains (``prenom.nom@medecin.mssante.fr``, ``<INS>@patient.mssante.fr``).

Check digits are *reported* (``checksum_ok``), never enforced here: several official fictitious
examples fail them, and what a directory serves is not this module's to reject. The ``medsecure``
command refuses an RPPS number a person types whose Luhn check digit fails (docs/directory.md).
Malformed input raises ``ValueError`` naming what is wrong.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

__all__ = [
    "IDNPS_SYSTEM",
    "IDNST_SYSTEM",
    "INS",
    "INS_DEMO_NIR",
    "INS_NIA",
    "INS_NIR",
    "INS_TEST_NIR",
    "RPPS_SYSTEM",
    "Identifier",
    "MSSanteAddress",
    "luhn_ok",
    "parse",
    "parse_address",
]

#: FHIR system of the IDNPS (idNatPs) in the Annuaire Santé.
IDNPS_SYSTEM = "urn:oid:1.2.250.1.71.4.2.1"
#: FHIR system of the IDNST (idNatSt) of structures in the Annuaire Santé.
IDNST_SYSTEM = "urn:oid:1.2.250.1.71.4.2.2"
#: FHIR system of the RPPS number.
RPPS_SYSTEM = "https://rpps.esante.gouv.fr"

Kind = Literal[
    "rpps", "adeli", "finess", "siret", "siren", "rpps-rang", "adeli-cabinet", "internal"
]

_PROFESSIONAL_KINDS = {"rpps", "adeli", "internal"}
# kind -> IDNPS/IDNST prefix
_PREFIX = {
    "rpps": "8",
    "adeli": "0",
    "finess": "1",
    "siren": "2",
    "siret": "3",
    "rpps-rang": "4",
    "adeli-cabinet": "0",
}
_FORMATS = {
    "rpps": (re.compile(r"[0-9]{11}"), "11 digits"),
    "adeli": (
        re.compile(r"([0-9]{2}|2A|2B)[0-9]{7}"),
        "9 characters (digits; 2A/2B allowed for Corsica)",
    ),
    "finess": (
        re.compile(r"([0-9]{2}|2A|2B)[0-9]{7}"),
        "9 characters (digits; 2A/2B allowed for Corsica)",
    ),
    "siret": (re.compile(r"[0-9]{14}"), "14 digits"),
    "siren": (re.compile(r"[0-9]{9}"), "9 digits"),
    "rpps-rang": (re.compile(r"[0-9]{12,16}"), "an RPPS number followed by a rank"),
    "adeli-cabinet": (re.compile(r"[0-9A-Z]{9,10}"), "9 or 10 characters"),
}


def luhn_ok(digits: str) -> bool:
    """True if ``digits`` (a string of digits) passes the Luhn check."""
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError("the Luhn check applies to digits only")
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


@dataclass(frozen=True, slots=True)
class Identifier:
    """A national identifier of a professional or a structure.

    ``kind`` is one of ``rpps``, ``adeli``, ``finess``, ``siret``, ``siren``, ``rpps-rang``,
    ``adeli-cabinet`` (structures) or ``internal`` (a professional's IDNPS built on a structure's
    number); ``value`` is the number without prefix.
    """

    kind: str
    value: str

    def __post_init__(self) -> None:
        if self.kind == "internal":
            if not re.fullmatch(r"[13456][0-9A-Za-z]+/[0-9A-Za-z-]+", self.value):
                raise ValueError(f"malformed internal IDNPS {self.value!r}")
            return
        fmt = _FORMATS.get(self.kind)
        if fmt is None:
            raise ValueError(f"unknown identifier kind {self.kind!r}")
        pattern, description = fmt
        if not pattern.fullmatch(self.value):
            raise ValueError(
                f"malformed {self.kind.upper()} {self.value!r}: expected {description}"
            )

    @property
    def idnps(self) -> str:
        """The national identifier with its one-digit type prefix (IDNPS or IDNST)."""
        if self.kind == "internal":
            return self.value
        return _PREFIX[self.kind] + self.value

    @property
    def is_professional(self) -> bool:
        """True for a professional (IDNPS), False for a structure (IDNST)."""
        return self.kind in _PROFESSIONAL_KINDS

    @property
    def checksum_ok(self) -> bool | None:
        """The Luhn check of the number, or None where it does not apply (Corsica, internal)."""
        if self.kind in ("internal", "rpps-rang", "adeli-cabinet") or not (
            self.value.isascii() and self.value.isdigit()
        ):
            return None
        return luhn_ok(self.value)

    def __str__(self) -> str:
        if self.kind == "internal":
            return f"idnps:{self.value}"
        return f"{self.kind}:{self.value}"


_KIND_ALIASES = {
    "rpps": "rpps",
    "adeli": "adeli",
    "finess": "finess",
    "siret": "siret",
    "siren": "siren",
}


def parse(text: str | Identifier, *, structure: bool = False) -> Identifier:
    """Parse ``rpps:…``, ``adeli:…``, ``finess:…``, ``siret:…``, ``siren:…``, ``idnps:…`` or a
    bare national identifier with its one-digit prefix.

    A bare identifier is read as a professional's IDNPS (``8``+RPPS, ``0``+ADELI) unless
    ``structure=True`` asks for a structure's IDNST (``1``+FINESS, ``3``+SIRET, …); bare
    ``1…`` of 10 characters and ``3…`` of 15 digits, which no professional IDNPS can be, are read
    as FINESS and SIRET either way.
    """
    if isinstance(text, Identifier):
        return text
    if not isinstance(text, str):
        raise TypeError("an identifier must be a str")
    raw = text.strip()
    if not raw:
        raise ValueError("empty identifier")
    if ":" in raw:
        scheme, _, value = raw.partition(":")
        scheme = scheme.strip().lower()
        value = value.strip().upper()
        if scheme in _KIND_ALIASES:
            return Identifier(_KIND_ALIASES[scheme], value)
        if scheme in ("idnps", "idnst"):
            return _parse_bare(value, structure=scheme == "idnst")
        raise ValueError(
            f"unknown identifier scheme {scheme!r}: expected rpps, adeli, finess, siret, siren or idnps"
        )
    return _parse_bare(raw.upper(), structure=structure)


def _parse_bare(value: str, *, structure: bool) -> Identifier:
    if not value:
        raise ValueError("empty identifier")
    prefix, rest = value[0], value[1:]
    if not re.fullmatch(r"[0-9A-Z/-]+", value):
        raise ValueError(f"malformed national identifier {value!r}: unexpected characters")
    if "/" in value and not structure:
        if prefix not in "13456":
            raise ValueError(f"malformed national identifier {value!r}: unknown prefix {prefix!r}")
        return Identifier("internal", value)
    if structure or (prefix == "1" and len(value) == 10) or (prefix == "3" and len(value) == 15):
        kinds = {"1": "finess", "2": "siren", "3": "siret", "4": "rpps-rang", "0": "adeli-cabinet"}
        kind = kinds.get(prefix)
        if kind is None:
            raise ValueError(
                f"unknown structure identifier prefix {prefix!r} in {value!r}: expected 0 (ADELI "
                "cabinet), 1 (FINESS), 2 (SIREN), 3 (SIRET) or 4 (RPPS-rang)"
            )
        return Identifier(kind, rest)
    if prefix == "8":
        if len(value) != 12:
            raise ValueError(f"malformed IDNPS {value!r}: '8' + RPPS must be 12 digits")
        return Identifier("rpps", rest)
    if prefix == "0":
        if len(value) != 10:
            raise ValueError(f"malformed IDNPS {value!r}: '0' + ADELI must be 10 characters")
        return Identifier("adeli", rest)
    raise ValueError(
        f"unknown IDNPS prefix {prefix!r} in {value!r}: expected 8 (RPPS) or 0 (ADELI) for a "
        "professional"
    )


# --------------------------------------------------------------------------------------------
# INS
# --------------------------------------------------------------------------------------------

INS_NIR = "1.2.250.1.213.1.4.8"
INS_NIA = "1.2.250.1.213.1.4.9"
INS_TEST_NIR = "1.2.250.1.213.1.4.10"
INS_DEMO_NIR = "1.2.250.1.213.1.4.11"
_INS_OIDS = {INS_NIR: "NIR", INS_NIA: "NIA", INS_TEST_NIR: "test NIR", INS_DEMO_NIR: "demo NIR"}
_LENIENT_OIDS = {INS_TEST_NIR, INS_DEMO_NIR}
_INS_RE = re.compile(r"[1-478][0-9]{4}([0-9]{2}|2A|2B)[0-9]{6}[0-9]{2}")


def ins_key(first13: str) -> int:
    """The 2-digit key of a NIR/NIA: 97 − (N mod 97), with 2A → 19 and 2B → 18."""
    dept = first13[5:7].upper()
    digits = first13[:5] + {"2A": "19", "2B": "18"}.get(dept, dept) + first13[7:]
    return 97 - int(digits) % 97


@pydantic_dataclass(frozen=True, config=ConfigDict(hide_input_in_errors=True))
class INS:
    """A patient's Identifiant National de Santé (NIR or NIA) with its identity traits.

    ``INS("279035121518989", oid=INS_NIR, birth_name="…", …)``. A wrong key raises ValueError,
    except under the test and demo OIDs, which are lenient (``key_ok`` tells).
    """

    matricule: str
    oid: str = INS_NIR
    birth_name: str | None = None
    first_given_name: str | None = None
    given_names: tuple[str, ...] = ()
    birth_date: _dt.date | None = None
    sex: Literal["M", "F", "I"] | None = None
    birth_place: str | None = Field(default=None, description="INSEE code of the birth place")

    @field_validator("matricule")
    @classmethod
    def _check_matricule(cls, value: str) -> str:
        value = value.replace(" ", "").upper()
        if not _INS_RE.fullmatch(value):
            raise ValueError(
                "malformed INS matricule: expected 13 characters (sex, year, month, department "
                "with 2A/2B for Corsica, commune, order) and a 2-digit key"
            )
        return value

    @field_validator("birth_place")
    @classmethod
    def _check_birth_place(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(
            r"([0-9]{2}|2A|2B)[0-9]{3}|99[0-9]{3}", value.upper()
        ):
            raise ValueError("malformed birth place: expected a 5-character INSEE code")
        return value.upper() if value else value

    @model_validator(mode="after")
    def _check_key(self) -> INS:
        if self.oid not in _INS_OIDS:
            raise ValueError(f"unknown INS OID {self.oid!r}")
        if not self.key_ok and self.oid not in _LENIENT_OIDS:
            raise ValueError("the INS key does not match the matricule (97 − N mod 97)")
        return self

    @property
    def key_ok(self) -> bool:
        """Whether the 2-digit key matches the first 13 characters."""
        return ins_key(self.matricule[:13]) == int(self.matricule[13:])

    @property
    def kind(self) -> str:
        """``NIR``, ``NIA``, ``test NIR`` or ``demo NIR``, from the OID."""
        return _INS_OIDS[self.oid]

    def __str__(self) -> str:
        return self.matricule


# --------------------------------------------------------------------------------------------
# MSSanté addresses
# --------------------------------------------------------------------------------------------

_LOCAL_RE = re.compile(r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
MSSANTE_DOMAIN = "mssante.fr"
PATIENT_DOMAIN = "patient.mssante.fr"


@dataclass(frozen=True, slots=True)
class MSSanteAddress:
    """A validated MSSanté mailbox address (lower-cased)."""

    local: str
    domain: str

    def __post_init__(self) -> None:
        if not self.local or len(self.local) > 64 or not _LOCAL_RE.fullmatch(self.local):
            # the local part is not quoted: for a patient mailbox it is the INS
            raise ValueError("malformed MSSanté address: bad local part (before the '@')")
        labels = self.domain.split(".")
        if len(self.domain) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
            raise ValueError(f"malformed MSSanté address: bad domain {self.domain!r}")
        if self.domain != MSSANTE_DOMAIN and not self.domain.endswith("." + MSSANTE_DOMAIN):
            raise ValueError(
                f"not an MSSanté address: the domain {self.domain!r} is not in {MSSANTE_DOMAIN}"
            )
        if self.is_patient:
            INS(self.local.upper(), oid=INS_NIR)  # raises ValueError if the INS is invalid

    @property
    def is_patient(self) -> bool:
        """True for a patient's mailbox (``<INS>@patient.mssante.fr``)."""
        return self.domain == PATIENT_DOMAIN

    @property
    def ins(self) -> INS | None:
        """The patient's INS for a patient mailbox, else None."""
        return INS(self.local.upper(), oid=INS_NIR) if self.is_patient else None

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


def parse_address(text: str) -> MSSanteAddress:
    """Parse and validate an MSSanté address such as ``prenom.nom@medecin.mssante.fr``."""
    if not isinstance(text, str):
        raise TypeError("an address must be a str")
    raw = text.strip()
    if raw.lower().startswith("mailto:"):
        raw = raw[7:]
    if raw.count("@") != 1:
        raise ValueError("malformed MSSanté address: expected one '@'")
    local, domain = raw.rsplit("@", 1)
    return MSSanteAddress(local.lower(), domain.lower().rstrip("."))
