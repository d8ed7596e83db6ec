"""Values of the medsecure domain: practitioners, organizations, patients (pydantic v2, frozen).

A model that exists is valid: identifiers, MSSanté addresses, INS keys and public keys are
checked on construction. Untrusted JSON goes through ``Model.model_validate_json`` (or
``from_json``) only; every model round-trips through ``to_json`` / ``from_json``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
    model_validator,
)

from ._errors import IdentityError
from ._identity import PublicIdentity
from .identifiers import INS, parse, parse_address

__all__ = [
    "Code",
    "Endpoint",
    "KeyEntry",
    "Mailbox",
    "Organization",
    "OrganizationRef",
    "Patient",
    "Practitioner",
]


def _public_identity(value: Any) -> PublicIdentity:
    if isinstance(value, PublicIdentity):
        return value
    if isinstance(value, str):
        try:
            return PublicIdentity.from_text(value)
        except IdentityError as exc:
            raise ValueError(str(exc)) from None
    raise ValueError("expected a medsecure public key (msp1… text form)")


#: A PublicIdentity field, serialized as its ``msp1…`` text form.
PublicIdentityField = Annotated[
    PublicIdentity,
    PlainValidator(_public_identity),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "pattern": "^msp1[a-z2-7]+$"}),
]


def _address(value: str) -> str:
    return str(parse_address(value))


def _professional_idnps(value: str) -> str:
    ident = parse(value)
    if not ident.is_professional:
        raise ValueError(f"{value!r} is not a professional's IDNPS")
    return ident.idnps


def _structure_idnst(value: str) -> str:
    ident = parse(value, structure=True)
    if ident.is_professional:
        raise ValueError(f"{value!r} is not a structure's IDNST")
    return ident.idnps


Address = Annotated[str, AfterValidator(_address)]


class _Model(BaseModel):
    # hide_input_in_errors: a validation error must never quote an INS, a name or an address
    model_config = ConfigDict(
        frozen=True, extra="forbid", str_strip_whitespace=True, hide_input_in_errors=True
    )

    def to_json(self) -> str:
        """Serialize to JSON (the inverse of :meth:`from_json`)."""
        return self.model_dump_json(exclude_defaults=True)

    @classmethod
    def from_json(cls, data: str | bytes) -> Self:
        """Validate untrusted JSON."""
        return cls.model_validate_json(data)


class Code(_Model):
    """A coded value with its label, e.g. profession ``10`` "Médecin" (TRE_G15)."""

    code: str = Field(min_length=1, max_length=64)
    label: str | None = None
    system: str | None = None


class Mailbox(_Model):
    """An MSSanté mailbox with its directory metadata."""

    address: Address
    type: Literal["PER", "ORG", "APP", "CAB"] | None = None
    liste_rouge: bool = False
    """Red-listed: the holder asked not to be published; do not display it to third parties."""


class KeyEntry(_Model):
    """A practitioner's public key with its validity and the signed statements that vouch for it."""

    public: PublicIdentityField
    not_before: AwareDatetime | None = None
    not_after: AwareDatetime | None = None
    statements: tuple[str, ...] = ()
    """Signed statements (base64 text, see docs/trust.md) binding or rotating this key."""

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint


#: Fields a known endpoint kind needs; other kinds are open (a transport that serves them
#: says so with ``Transport.kinds`` / ``Transport.accepts``).
ENDPOINT_FIELDS: dict[str, tuple[str, ...]] = {
    "relay": ("url", "mailbox"),
    "mail": ("address",),
    "drop": ("path",),
    "mssante": ("address",),
}


class Endpoint(_Model):
    """Where medsecure envelopes for a practitioner are delivered.

    ``kind`` is open: ``relay``, ``mail`` and ``drop`` are the kinds medsecure ships transports
    for (and checks the fields of); any other lowercase name is accepted for transports of
    one's own."""

    kind: str = Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")
    url: str | None = None
    """Relay base URL (``relay``)."""
    mailbox: str | None = None
    """Mailbox name on the relay (``relay``)."""
    address: Address | None = None
    """MSSanté mail address (``mail``)."""
    path: str | None = None
    """Drop folder (``drop``)."""
    priority: int = 0
    """Lower is tried first (see the client's transport selection)."""
    keys: tuple[str, ...] | None = None
    """Fingerprints of the keys of the directory entry that listed this endpoint, set when entries
    with different keys are merged (``merge_practitioners``); ``None`` for an entry never merged
    with another's, whose endpoints go with its own keys. An endpoint is only as trustworthy as
    the key it came with: a send uses it only if the trust policy accepts one of these keys
    (``()``: it came with no key, so it is not used while the practitioner has keys)."""

    @model_validator(mode="after")
    def _complete(self) -> Endpoint:
        needed = ENDPOINT_FIELDS.get(self.kind, ())
        missing = [f for f in needed if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a {self.kind} endpoint needs {', '.join(missing)}")
        return self


class OrganizationRef(_Model):
    """An organization a practitioner works in (from its PractitionerRoles)."""

    idnst: Annotated[str, AfterValidator(_structure_idnst)] | None = None
    name: str | None = None
    city: str | None = None


class Practitioner(_Model):
    """A health professional as a directory knows them."""

    idnps: Annotated[str, AfterValidator(_professional_idnps)]
    rpps: str | None = Field(default=None, pattern=r"^[0-9]{11}$")
    adeli: str | None = Field(default=None, pattern=r"^([0-9]{2}|2A|2B)[0-9]{7}$")
    family_name: str | None = None
    given_name: str | None = None
    profession: Code | None = None
    specialty: Code | None = None
    organizations: tuple[OrganizationRef, ...] = ()
    mailboxes: tuple[Mailbox, ...] = ()
    keys: tuple[KeyEntry, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    source: str | None = None
    """Which directory the entry came from (informational)."""
    stale: bool = False
    """Served from an expired cache entry because the directory was unavailable."""

    @model_validator(mode="after")
    def _consistent(self) -> Practitioner:
        ident = parse(self.idnps)
        if self.rpps is not None and ident.kind == "rpps" and ident.value != self.rpps:
            raise ValueError("rpps does not match the IDNPS")
        if self.adeli is not None and ident.kind == "adeli" and ident.value != self.adeli:
            raise ValueError("adeli does not match the IDNPS")
        return self

    @model_validator(mode="before")
    @classmethod
    def _derive_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("idnps"), str):
            try:
                ident = parse(data["idnps"])
            except ValueError:
                return data
            if ident.kind in ("rpps", "adeli") and data.get(ident.kind) is None:
                data = {**data, ident.kind: ident.value}
        return data

    @property
    def display_name(self) -> str:
        parts = [p for p in (self.given_name, self.family_name) if p]
        return " ".join(parts) if parts else self.idnps

    def refs(self) -> list[str]:
        """Every reference under which this practitioner can be looked up."""
        out = [f"idnps:{self.idnps}"]
        out += [f"mss:{m.address}" for m in self.mailboxes]
        out += [f"mss:{e.address}" for e in self.endpoints if e.address]
        return out


class Organization(_Model):
    """A health structure (FINESS or SIRET)."""

    idnst: Annotated[str, AfterValidator(_structure_idnst)]
    name: str | None = None
    finess: str | None = None
    siret: str | None = None
    city: str | None = None
    mailboxes: tuple[Mailbox, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _derive_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("idnst"), str):
            try:
                ident = parse(data["idnst"], structure=True)
            except ValueError:
                return data
            if ident.kind in ("finess", "siret") and data.get(ident.kind) is None:
                data = {**data, ident.kind: ident.value}
        return data


class Patient(_Model):
    """A patient, identified by their INS and its identity traits."""

    ins: INS
    family_name: str | None = None
    """Used name (nom utilisé), when it differs from the INS birth name."""
    given_name: str | None = None
    """Used first name (prénom utilisé)."""
