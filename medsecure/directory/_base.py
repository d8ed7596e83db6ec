"""The directory protocol and reference normalisation."""

from __future__ import annotations

import abc
import unicodedata
from collections.abc import Iterable, Sequence

from .._closing import Closing
from .._errors import AmbiguousPractitioner, PractitionerNotFound
from ..identifiers import Identifier, MSSanteAddress, parse, parse_address
from ..models import Endpoint, Practitioner

__all__ = ["Directory", "Ref", "merge_practitioners", "normalize_ref", "search_matches"]

Ref = str | Identifier | MSSanteAddress
"""A practitioner reference: ``rpps:…``/``adeli:…``/bare IDNPS, an Identifier, or an MSSanté address."""


def normalize_ref(ref: Ref) -> tuple[str, Identifier | MSSanteAddress]:
    """Return the canonical key (``idnps:8…`` or ``mss:addr``) and the parsed reference.

    Raises ValueError for a malformed reference or one that names no practitioner (a
    structure, a patient's mailbox), TypeError for a wrong type.
    """
    if isinstance(ref, Identifier):
        parsed: Identifier | MSSanteAddress = ref
    elif isinstance(ref, MSSanteAddress):
        parsed = ref
    elif isinstance(ref, str):
        parsed = parse_address(ref) if "@" in ref else parse(ref)
    else:
        raise TypeError("a practitioner reference is a str, an Identifier or an MSSanteAddress")
    if isinstance(parsed, MSSanteAddress):
        if parsed.is_patient:
            # its local part is the patient's INS: it is no directory's to look up (it would
            # travel to the Annuaire in a query) and it must not appear in error messages
            raise ValueError("a patient's MSSanté address names no practitioner")
        return f"mss:{parsed}", parsed
    if not parsed.is_professional:
        raise ValueError(f"{ref!s} identifies a structure, not a practitioner")
    return f"idnps:{parsed.idnps}", parsed


def _fold(text: str | None) -> str:
    if not text:
        return ""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold().strip()


def search_matches(
    p: Practitioner,
    *,
    name: str | None = None,
    given: str | None = None,
    profession: str | None = None,
    city: str | None = None,
) -> bool:
    """Case- and accent-insensitive prefix match used by the local backends and as a filter."""
    if name and not _fold(p.family_name).startswith(_fold(name)):
        return False
    if given and not _fold(p.given_name).startswith(_fold(given)):
        return False
    if profession:
        want = _fold(profession)
        codes = [_fold(c.code) for c in (p.profession, p.specialty) if c]
        labels = [_fold(c.label) for c in (p.profession, p.specialty) if c and c.label]
        if want not in codes and not any(want in label for label in labels):
            return False
    if city:
        want = _fold(city)
        if not any(_fold(o.city) == want for o in p.organizations):
            return False
    return True


def _endpoints_with_keys(p: Practitioner) -> Practitioner:
    """``p`` with each endpoint that does not say yet which keys it came with tagged with ``p``'s."""
    own = tuple(k.fingerprint for k in p.keys)
    endpoints = tuple(
        e if e.keys is not None else e.model_copy(update={"keys": own}) for e in p.endpoints
    )
    return p.model_copy(update={"endpoints": endpoints})


def _union_endpoints(endpoints: Iterable[Endpoint]) -> list[Endpoint]:
    """One endpoint per place (its fields but ``keys``), in order, the keys it came with unioned."""
    out: dict[str, Endpoint] = {}
    for e in endpoints:
        place = e.model_copy(update={"keys": None}).model_dump_json()
        seen = out.get(place)
        if seen is None:
            out[place] = e
        elif seen.keys is not None:
            keys = None if e.keys is None else tuple(dict.fromkeys((*seen.keys, *e.keys)))
            out[place] = seen.model_copy(update={"keys": keys})
    return list(out.values())


def merge_practitioners(entries: Sequence[Practitioner]) -> Practitioner:
    """Merge entries for one IDNPS: the first non-empty scalar wins, lists are unioned in order.

    An endpoint is only as trustworthy as the key its entry came with: when the entries do not
    all list the same keys, each endpoint records the keys of the entry it came from
    (:attr:`Endpoint.keys`), and a send uses it only if the trust policy accepts one of them.
    Otherwise an entry anyone wrote for a practitioner (an imported file, a second directory),
    with a key the policy refuses, would still bring its drop folder or relay mailbox first.
    """
    if len({frozenset(k.fingerprint for k in e.keys) for e in entries}) > 1:
        entries = [_endpoints_with_keys(e) for e in entries]
    first = entries[0]
    data = first.model_dump()
    for other in entries[1:]:
        if other.idnps != first.idnps:
            raise ValueError("cannot merge different practitioners")
        extra = other.model_dump()
        for field_name, value in extra.items():
            current = data.get(field_name)
            if isinstance(current, (list, tuple)):
                merged = list(current)
                for item in value:
                    if item not in merged:
                        merged.append(item)
                data[field_name] = merged
            elif current in (None, "") and value not in (None, ""):
                data[field_name] = value
    data["stale"] = any(e.stale for e in entries)
    data["endpoints"] = _union_endpoints(e for p in entries for e in p.endpoints)
    return Practitioner.model_validate(data)


def unique(matches: Iterable[Practitioner], ref: object) -> Practitioner:
    """The single practitioner among ``matches`` (merged by IDNPS) or a directory error."""
    by_id: dict[str, list[Practitioner]] = {}
    for p in matches:
        by_id.setdefault(p.idnps, []).append(p)
    if not by_id:
        raise PractitionerNotFound(f"no practitioner matches {ref!s}")
    if len(by_id) > 1:
        raise AmbiguousPractitioner(
            f"{len(by_id)} practitioners match {ref!s}: {', '.join(sorted(by_id))}"
        )
    (entries,) = by_id.values()
    return entries[0] if len(entries) == 1 else merge_practitioners(entries)


class Directory(Closing, abc.ABC):
    """Where practitioners are found. Two methods, and a context manager.

    ``lookup(ref)`` returns exactly one :class:`~medsecure.Practitioner` or raises
    :class:`~medsecure.PractitionerNotFound` / :class:`~medsecure.AmbiguousPractitioner` /
    :class:`~medsecure.DirectoryUnavailable`; ``search(...)`` returns a (possibly empty) list.
    """

    @abc.abstractmethod
    def lookup(self, ref: Ref) -> Practitioner:
        """The practitioner ``ref`` names."""

    @abc.abstractmethod
    def search(
        self,
        *,
        name: str | None = None,
        given: str | None = None,
        profession: str | None = None,
        city: str | None = None,
        limit: int = 200,
    ) -> list[Practitioner]:
        """Practitioners matching every criterion given (family-name and given-name prefixes,
        profession code or label, city of one of their organizations)."""

    def lookup_many(self, refs: Sequence[Ref]) -> dict[str, Practitioner]:
        """Resolve several references at once, keyed by each reference's canonical form
        (``idnps:…`` / ``mss:…``). Backends that can batch (FHIR) override this.

        Raises the first error met.
        """
        out: dict[str, Practitioner] = {}
        for ref in refs:
            key, _ = normalize_ref(ref)
            if key not in out:
                out[key] = self.lookup(ref)
        return out

    def close(self) -> None:  # optional hook: most backends hold nothing
        """Release resources (HTTP clients, database handles)."""
