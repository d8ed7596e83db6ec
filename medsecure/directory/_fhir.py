"""The ANS Annuaire Santé FHIR API (v2 shapes) as a medsecure directory.

Theory of operation
-------------------
A lookup by identifier asks ``/Practitioner?identifier=urn:oid:1.2.250.1.71.4.2.1|<IDNPS>`` with
``_revinclude=PractitionerRole:practitioner``; the IDNPS system covers RPPS (``8``+RPPS) and
ADELI-only (``0``+ADELI) professionals alike. The organizations the active roles point to are then
fetched in one batched request, ``/Organization?_id=a,b,c``. A lookup by MSSanté address uses
``mailbox-mss`` on Practitioner, then on PractitionerRole (``_include`` of its practitioner and
organization). Several lookups are batched (``identifier=a,b,c``, comma = OR) so 100 recipients
cost a handful of requests. Searches follow ``Bundle.link[next]`` (name searches return no
``total``), only to the same origin as the base URL so the API key never leaves for another host.

Only the search parameters the API's CapabilityStatement declares are sent (see
``SEARCH_PARAMETERS`` below): a strict FHIR server answers 400 to any other, which would fail
every lookup. In particular there is no ``_include:iterate``.

Mapping (ANS IG ``ansforge/IG-fhir-annuaire``, guide version 2): the practising name and the
profession (TRE_G15) and specialty (TRE_R38) are read on Practitioner; MSSanté mailboxes are the
``telecom`` entries typed ``MSSANTE`` (TRE_R256, extension ``fr-core-contact-point-email-type``) of
the Practitioner and of its *active* PractitionerRoles, with their ``as-ext-mailbox-mss-metadata``
(type PER/ORG/APP/CAB, liste rouge). An Organization's own mailboxes are never attributed to a
practitioner.

Bounds and failures
-------------------
The server is not trusted to be well-behaved. Each call (``lookup``, ``lookup_many``, ``search``)
has one deadline, ``max_total_time``, that covers connecting, retries and their waits, the status
line, the headers and the body (see ``_http.py``: httpx's own timeouts are per read, so a server
dripping one byte a second would never trip them); each search reads at most ``max_pages`` pages;
each call keeps at most ``max_resources`` resources (per 50 references for ``lookup_many``); each
response body is streamed and refused beyond ``max_response_bytes``.

Two errors, by what the caller can do about them:

* :class:`DirectoryUnavailable` — try again later (the cache serves stale entries meanwhile): the
  server is unreachable, times out, keeps answering 429/5xx through the bounded retries, or the
  call's deadline passes (however far the answer had got).
* :class:`DirectoryError` — the same call would fail the same way: HTTP 401/403 and other 4xx
  (400 included), an answer that is not a JSON Bundle, a body beyond ``max_response_bytes``, a
  search running over more than ``max_pages`` pages, more than ``max_resources`` resources, a
  ``next`` link to another origin, a content encoding that was not asked for.

429 waits for ``Retry-After``; 5xx, timeouts and connection errors are retried with capped
exponential backoff and jitter. No httpx exception escapes, nor the ``UnicodeError`` that
``idna`` and the socket layer raise for a host name they cannot encode: a base URL or API key
that no request could carry is :class:`ConfigError` at construction (checked there, with the
codec the socket layer will use, rather than discovered at the first lookup), and a ``next``
link that is not a usable URL is :class:`DirectoryError`.
"""

from __future__ import annotations

import dataclasses
import email.utils
import ipaddress
import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
from pydantic import ValidationError

from .._errors import ConfigError, DirectoryError, DirectoryUnavailable
from ..identifiers import IDNPS_SYSTEM, IDNST_SYSTEM, RPPS_SYSTEM, Identifier, MSSanteAddress
from ..models import Code, Mailbox, OrganizationRef, Practitioner
from ._base import Directory, Ref, normalize_ref, search_matches, unique
from ._http import DeadlineTransport, deadline, uses_env_proxy

__all__ = ["FhirDirectory", "practitioners_from_bundle"]

log = logging.getLogger("medsecure.directory")

EMAIL_TYPE_EXT = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-contact-point-email-type"
MSS_METADATA_EXT = "https://interop.esante.gouv.fr/ig/fhir/annuaire/StructureDefinition/as-ext-mailbox-mss-metadata"
PROFESSION_SYSTEM_MARK = "TRE_G15-ProfessionSante"
SPECIALTY_SYSTEM_MARK = "TRE_R38-SpecialiteOrdinale"
MAX_COUNT = 200  # the API's _count ceiling
BATCH = 50  # identifiers per request (keeps URLs short)
RETRY_STATUS = {500, 502, 503, 504}
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # FHIR R4 `id`: never a comma, so safe to batch

# The search parameters this module sends, each declared by the ANS API v2 CapabilityStatement,
# ansforge/IG-fhir-annuaire, input/fsh/CapabilityStatement/AsServerDPCapabilityStatementv2.fsh
# (searchParam, searchInclude and searchRevInclude of each resource). `_count` is a result
# parameter the API documents (ansforge/annuaire-sante-fhir-documentation,
# docs/pages/documentation/starters/api-basics.md). The statement declares no include on
# Practitioner at all, hence no `_include:iterate=PractitionerRole:organization`: organizations
# come from a second, batched `Organization?_id=a,b,c`. tests/fhir_server.py answers 400 to
# anything else, as a strict server does.
SEARCH_PARAMETERS = {
    "Practitioner": {
        "identifier",
        "mailbox-mss",
        "name",
        "given",
        "_revinclude=PractitionerRole:practitioner",
    },
    "PractitionerRole": {
        "mailbox-mss",
        "_include=PractitionerRole:practitioner",
        "_include=PractitionerRole:organization",
    },
    "Organization": {"_id"},
}


# ----------------------------------------------------------------------------------------------
# parsing (pure functions over decoded JSON; anything unexpected is skipped, never raised raw)
# ----------------------------------------------------------------------------------------------


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _ext(node: dict[str, Any], url: str) -> dict[str, Any] | None:
    for e in _list(node.get("extension")):
        if isinstance(e, dict) and e.get("url") == url:
            return e
    return None


def _mailboxes(resource: dict[str, Any]) -> list[Mailbox]:
    out = []
    for t in _list(resource.get("telecom")):
        t = _dict(t)
        if t.get("system") != "email" or not _str(t.get("value")):
            continue
        etype = _ext(t, EMAIL_TYPE_EXT)
        coding = _dict(etype.get("valueCoding")) if etype else {}
        if coding.get("code") != "MSSANTE":
            continue  # a plain e-mail, Apicrypt, … : not an MSSanté mailbox
        box_type = None
        liste_rouge = False
        meta = _ext(t, MSS_METADATA_EXT)
        if meta:
            for sub in _list(meta.get("extension")):
                sub = _dict(sub)
                if sub.get("url") == "type":
                    codings = _list(_dict(sub.get("valueCodeableConcept")).get("coding"))
                    code = _dict(codings[0]).get("code") if codings else None
                    box_type = code if code in ("PER", "ORG", "APP", "CAB") else None
                elif sub.get("url") == "listeRouge" and isinstance(sub.get("valueBoolean"), bool):
                    liste_rouge = sub["valueBoolean"]
        try:
            out.append(Mailbox(address=t["value"], type=box_type, liste_rouge=liste_rouge))
        except ValidationError:
            log.warning("skipping a malformed MSSanté address in the directory")
    return out


def _code(resource: dict[str, Any], mark: str) -> Code | None:
    for q in _list(resource.get("qualification")):
        for c in _list(_dict(_dict(q).get("code")).get("coding")):
            c = _dict(c)
            if mark in (_str(c.get("system")) or "") and _str(c.get("code")):
                return Code(code=c["code"], label=_str(c.get("display")), system=c["system"])
    return None


def _role_code(role: dict[str, Any], mark: str) -> Code | None:
    for cc in _list(role.get("code")) + _list(role.get("specialty")):
        for c in _list(_dict(cc).get("coding")):
            c = _dict(c)
            if mark in (_str(c.get("system")) or "") and _str(c.get("code")):
                return Code(code=c["code"], label=_str(c.get("display")), system=c["system"])
    return None


def _name(resource: dict[str, Any]) -> tuple[str | None, str | None]:
    names = [_dict(n) for n in _list(resource.get("name"))]
    names.sort(key=lambda n: {"usual": 0, "official": 1}.get(_str(n.get("use")) or "", 2))
    for n in names:
        family = _str(n.get("family"))
        given = [g for g in _list(n.get("given")) if isinstance(g, str)]
        if family or given:
            return family, (given[0] if given else None)
    return None, None


def _identifier(resource: dict[str, Any], system: str) -> str | None:
    for ident in _list(resource.get("identifier")):
        ident = _dict(ident)
        if ident.get("system") == system and _str(ident.get("value")):
            return str(ident["value"]).strip()
    return None


def _organization(resource: dict[str, Any]) -> OrganizationRef:
    idnst = _identifier(resource, IDNST_SYSTEM)
    city = None
    for addr in _list(resource.get("address")):
        city = _str(_dict(addr).get("city"))
        if city:
            break
    try:
        return OrganizationRef(idnst=idnst, name=_str(resource.get("name")), city=city)
    except ValidationError:
        return OrganizationRef(name=_str(resource.get("name")), city=city)


def _ref_id(reference: Any, kind: str) -> str | None:
    ref = _str(_dict(reference).get("reference"))
    if not ref:
        return None
    parts = ref.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == kind:
        return parts[-1]
    return None


def practitioners_from_bundle(
    resources: Iterable[dict[str, Any]], *, source: str = "fhir"
) -> list[Practitioner]:
    """Assemble Practitioner models from Annuaire resources (Practitioner, PractitionerRole,
    Organization) collected over one or more Bundle pages."""
    pracs: dict[str, dict[str, Any]] = {}
    roles: dict[str, list[dict[str, Any]]] = {}
    orgs: dict[str, dict[str, Any]] = {}
    for r in resources:
        rid = _str(r.get("id"))
        kind = r.get("resourceType")
        if not rid:
            continue
        if kind == "Practitioner":
            pracs[rid] = r
        elif kind == "PractitionerRole":
            pid = _ref_id(r.get("practitioner"), "Practitioner")
            if pid and r.get("active") is not False:
                roles.setdefault(pid, []).append(r)
        elif kind == "Organization":
            orgs[rid] = r
    out = []
    for pid, res in pracs.items():
        idnps = _identifier(res, IDNPS_SYSTEM)
        if idnps is None:
            log.warning("skipping Practitioner/%s: no IDNPS identifier", pid)
            continue
        family, given = _name(res)
        profession = _code(res, PROFESSION_SYSTEM_MARK)
        specialty = _code(res, SPECIALTY_SYSTEM_MARK)
        mailboxes = _mailboxes(res)
        organizations = []
        for role in roles.get(pid, []):
            if family is None and given is None:  # v1 servers put the practising name on roles
                family, given = _name(role)
            profession = profession or _role_code(role, PROFESSION_SYSTEM_MARK)
            specialty = specialty or _role_code(role, SPECIALTY_SYSTEM_MARK)
            for m in _mailboxes(role):
                if m not in mailboxes:
                    mailboxes.append(m)
            oid = _ref_id(role.get("organization"), "Organization")
            if oid and oid in orgs:
                org = _organization(orgs[oid])
                if org not in organizations:
                    organizations.append(org)
        try:
            out.append(
                Practitioner(
                    idnps=idnps,
                    rpps=_identifier(res, RPPS_SYSTEM),
                    family_name=family,
                    given_name=given,
                    profession=profession,
                    specialty=specialty,
                    organizations=tuple(organizations),
                    mailboxes=tuple(mailboxes),
                    source=source,
                )
            )
        except ValidationError as exc:
            log.warning("skipping Practitioner/%s: %s", pid, exc.errors()[0].get("msg"))
    return out


def _missing_organizations(resources: Sequence[dict[str, Any]]) -> list[str]:
    have = {r.get("id") for r in resources if r.get("resourceType") == "Organization"}
    want = []
    for r in resources:
        if r.get("resourceType") == "PractitionerRole" and r.get("active") is not False:
            oid = _ref_id(r.get("organization"), "Organization")
            if oid and oid not in have and oid not in want:
                want.append(oid)
    return want


def _declared(kind: str, params: dict[str, str | list[str]]) -> bool:
    allowed = SEARCH_PARAMETERS.get(kind, set())
    for name, value in params.items():
        if name == "_count":
            continue
        if name.startswith("_") and name != "_id":  # _include/_revinclude: the value is declared
            values = value if isinstance(value, list) else [value]
            if any(f"{name}={v}" not in allowed for v in values):
                return False
        elif name not in allowed:
            return False
    return True


# ----------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------


def _retry_after(value: str | None, now: float) -> float | None:
    if not value:
        return None
    value = value.strip()
    # ASCII digits only: "²" is a digit to str.isdigit but no number to float()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def _host_ok(host: str) -> bool:
    """Whether a request can reach ``host``: an IP literal, or a name that httpx (IDNA 2008,
    punycode labels decoded) and then the socket layer (Python's ``idna`` codec: no empty label,
    none over 63 characters) both accept. Otherwise the error would surface at the first
    request, as a bare ``httpx.InvalidURL`` or ``UnicodeError``."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        url = httpx.URL(f"http://{host}/")
        url.host  # noqa: B018 - decodes xn-- labels, as every request does
        url.raw_host.decode("ascii").encode("idna")
    except (httpx.InvalidURL, UnicodeError):
        return False
    return len(url.raw_host) <= 253


def _base_url(base_url: str) -> tuple[str, str]:
    """``base_url``'s scheme and netloc, or :class:`ConfigError` naming what is wrong. The
    message never repeats the URL: it may carry credentials (``https://user:secret@host``)."""
    what = "the FHIR base URL"
    if not isinstance(base_url, str):
        raise TypeError(f"{what} is a str")
    try:
        parts = urlsplit(base_url)
    except ValueError as exc:  # "Invalid IPv6 URL"
        raise ConfigError(f"{what} is not a valid URL") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what} must be http(s)://host/path")
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number in 0-65535
    except ValueError as exc:
        raise ConfigError(f"{what} has an invalid port") from exc
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in base_url):
        raise ConfigError(f"{what} is not a valid URL: it contains control characters")
    if not _host_ok(parts.hostname):
        shown = parts.hostname if len(parts.hostname) <= 64 else parts.hostname[:61] + "..."
        raise ConfigError(
            f"{what} has an invalid host name {shown!r} (a placeholder left in the URL?)"
        )
    try:
        httpx.URL(base_url)
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise ConfigError(f"{what} is not a valid URL") from exc
    return parts.scheme, parts.netloc


def _next_link(url: str, link: str) -> str:
    """The absolute URL of a ``next`` link, or :class:`DirectoryError` if no request could
    carry it (the server is not trusted to send one that can)."""
    try:
        nxt = urljoin(url, link)
        httpx.URL(nxt)
    except (ValueError, httpx.InvalidURL) as exc:  # UnicodeError is a ValueError
        raise DirectoryError("the directory's next link is not a usable URL") from exc
    return nxt


@dataclasses.dataclass
class _Budget:
    """What one call (``lookup``, ``lookup_many``, ``search``) may still spend."""

    deadline: float
    resources: int
    resource_cap: int


Params = dict[str, str | list[str]]


class FhirDirectory(Directory):
    """The Annuaire Santé FHIR API v2 (or any server with its shapes) as a directory.

    ``base_url`` is the FHIR base (e.g. ``https://gateway.api.esante.gouv.fr/fhir/v2``);
    ``api_key`` is sent as ``ESANTE-API-KEY``; ``client`` lets callers bring their own
    ``httpx.Client`` (proxies, certificates; the call's deadline then bounds each read and the
    body as it streams, but not a status line and headers sent a byte at a time).

    Bounds, per call (see the module docstring for which error each ends in):

    * ``max_total_time`` seconds, one deadline for everything the call does: connecting,
      retrying (``max_attempts``, backoff from ``backoff_base`` up to ``backoff_cap``), waiting,
      reading headers and bodies; past it, :class:`DirectoryUnavailable`;
    * ``timeout`` seconds for each network operation within it;
    * ``max_pages`` pages per search (a first request and the ``next`` links it leads to);
    * ``max_resources`` resources in all (per 50 references for ``lookup_many``);
    * ``max_response_bytes`` per response body, counted as it streams (after decompression);
      past the last three, :class:`DirectoryError`.

    ``sleep`` and ``clock`` are injectable for tests. A ``base_url`` or ``api_key`` that no request
    could carry (not http(s), a bad port or host name, control characters) is
    :class:`~medsecure.ConfigError` here, not an httpx error at the first lookup.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        client: httpx.Client | None = None,
        timeout: float = 10.0,
        max_attempts: int = 6,
        max_total_time: float = 60.0,
        max_pages: int = 20,
        max_resources: int = 10_000,
        max_response_bytes: int = 8 * 1024 * 1024,
        backoff_base: float = 0.5,
        backoff_cap: float = 8.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._origin = _base_url(base_url)
        if api_key is not None and not (
            api_key.strip() and all(0x20 <= ord(c) < 0x7F for c in api_key)
        ):  # never quoted: it is a secret
            raise ConfigError(
                "the ESANTE-API-KEY is blank or holds characters an HTTP header cannot carry"
            )
        for name, value in (
            ("timeout", timeout),
            ("max_total_time", max_total_time),
            ("max_attempts", max_attempts),
            ("max_pages", max_pages),
            ("max_resources", max_resources),
            ("max_response_bytes", max_response_bytes),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive")
        self.base_url = base_url.rstrip("/") + "/"
        parts = urlsplit(base_url)
        if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "FhirDirectory over plain http to %s: the API key and answers travel unencrypted",
                parts.hostname,
            )
        self._api_key = api_key
        self._own_client = client is None
        if client is None:
            if uses_env_proxy(self.base_url):
                # the deadline transport does not speak to proxies: keep httpx's, which does
                log.info("FhirDirectory through the environment's proxy")
                client = httpx.Client(timeout=timeout)
            else:
                client = httpx.Client(timeout=timeout, transport=DeadlineTransport())
        self._client = client
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.max_total_time = max_total_time
        self.max_pages = max_pages
        self.max_resources = max_resources
        self.max_response_bytes = max_response_bytes
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._sleep = sleep
        self._clock = clock
        self.requests_made = 0
        """Requests sent so far (retries included): lets callers and benchmarks check batching."""

    def __repr__(self) -> str:
        return f"<FhirDirectory {self.base_url}>"

    def close(self) -> None:
        if self._own_client:
            self._client.close()

    # -- transport --------------------------------------------------------------------------
    def _budget(self, units: int = 1) -> _Budget:
        cap = self.max_resources * max(1, units)
        return _Budget(
            deadline=self._clock() + self.max_total_time, resources=cap, resource_cap=cap
        )

    def _headers(self) -> dict[str, str]:
        # no br/zstd: only encodings whose expansion per chunk is bounded (zlib: about 1000:1)
        headers = {
            "Accept": "application/fhir+json, application/json",
            "Accept-Encoding": "gzip, deflate",
        }
        if self._api_key:
            headers["ESANTE-API-KEY"] = self._api_key
        return headers

    def _expired(self) -> DirectoryUnavailable:
        return DirectoryUnavailable(
            f"the directory did not answer within the call's deadline ({self.max_total_time:g} s)"
        )

    def _get(self, url: str, params: Params | None, budget: _Budget) -> dict[str, Any]:
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise DirectoryError("the directory's next link is not a usable URL") from exc
        if (parts.scheme, parts.netloc) != self._origin:
            raise DirectoryError("refusing to follow a link to another host than the directory's")
        attempt = 0
        while True:
            remaining = budget.deadline - self._clock()
            if remaining <= 0:
                raise self._expired()
            attempt += 1
            self.requests_made += 1
            wait: float | None = None
            try:
                with deadline(budget.deadline, self._clock):
                    status, retry_after, body = self._fetch(url, params, budget, remaining)
            except httpx.TimeoutException:
                problem = "timed out"
            except httpx.TransportError as exc:
                problem = f"unreachable ({type(exc).__name__})"
            except httpx.HTTPError as exc:
                raise DirectoryError(f"directory request failed: {type(exc).__name__}") from exc
            except (httpx.InvalidURL, UnicodeError) as exc:
                # checked before (base URL, API key, next links, search criteria): a last net,
                # so that no request httpx or the socket layer cannot form escapes as theirs
                raise DirectoryError(
                    f"directory request could not be formed: {type(exc).__name__}"
                ) from exc
            else:
                if status == 200:
                    return self._bundle(body)
                if status in (401, 403):
                    raise DirectoryError(
                        f"the directory refused the request (HTTP {status}): check the ESANTE-API-KEY"
                    )
                if status == 429:
                    problem = "throttling requests (HTTP 429)"
                    wait = _retry_after(retry_after, time.time())
                elif status in RETRY_STATUS:
                    problem = f"failing (HTTP {status})"
                else:
                    raise DirectoryError(f"the directory answered HTTP {status}")
            if wait is None:
                ceiling = min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1))
                wait = random.uniform(ceiling / 2, ceiling)  # jitter, never below half the step
            remaining = budget.deadline - self._clock()
            if remaining <= 0:  # what ended this attempt was the deadline: say so
                raise self._expired()
            if attempt >= self.max_attempts or wait > remaining:
                raise DirectoryUnavailable(
                    f"the directory is {problem}; gave up after {attempt} attempt(s)"
                )
            log.info("directory %s, retrying in %.1fs (attempt %d)", problem, wait, attempt)
            self._sleep(wait)

    def _fetch(
        self, url: str, params: Params | None, budget: _Budget, remaining: float
    ) -> tuple[int, str | None, bytes]:
        """One GET: the status, its Retry-After, and the body of a 200 read within bounds."""
        timeout = httpx.Timeout(min(self.timeout, remaining))
        with self._client.stream(
            "GET", url, params=params, headers=self._headers(), timeout=timeout
        ) as resp:
            if resp.status_code != 200:
                return resp.status_code, resp.headers.get("Retry-After"), b""
            return 200, None, self._read(resp, budget)

    def _read(self, resp: httpx.Response, budget: _Budget) -> bytes:
        """The body, streamed: refused past ``max_response_bytes``, abandoned at the deadline."""
        limit = self.max_response_bytes
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip", "deflate"):
            raise DirectoryError("the directory answered in a content encoding it was not offered")
        too_big = f"the directory's answer is larger than the {limit}-byte limit per response"
        declared = resp.headers.get("Content-Length", "").strip()
        if (
            encoding == "identity"
            and declared.isascii()
            and declared.isdigit()
            and int(declared) > limit
        ):
            raise DirectoryError(too_big)
        body = bytearray()
        for chunk in resp.iter_bytes():
            body += chunk
            if len(body) > limit:
                raise DirectoryError(too_big)
            if self._clock() >= budget.deadline:
                raise self._expired()
        return bytes(body)

    def _bundle(self, body: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as exc:  # invalid JSON, bad encoding, hostile nesting
            raise DirectoryError("malformed FHIR response: not JSON") from exc
        if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle":
            raise DirectoryError("malformed FHIR response: not a Bundle")
        if not isinstance(doc.get("entry", []), list) or not isinstance(doc.get("link", []), list):
            raise DirectoryError("malformed FHIR response: bad Bundle structure")
        return doc

    def _collect(
        self,
        kind: str,
        params: Params,
        budget: _Budget,
        *,
        max_matches: int | None = None,
    ) -> list[dict[str, Any]]:
        """GET a search of ``kind`` and its ``next`` pages; return the resources of all pages."""
        if not _declared(kind, params):  # a bug here, not the server's doing
            raise RuntimeError(f"undeclared search parameter in {kind}?{sorted(params)}")
        url = urljoin(self.base_url, kind)
        out: list[dict[str, Any]] = []
        matches = 0
        current: Params | None = params
        seen: set[str] = set()
        pages = 0
        while True:
            bundle = self._get(url, current, budget)
            pages += 1
            for entry in bundle.get("entry", []):
                res = _dict(_dict(entry).get("resource"))
                if not res:
                    continue
                budget.resources -= 1
                if budget.resources < 0:
                    raise DirectoryError(
                        f"the directory's answer holds more than {budget.resource_cap} resources"
                    )
                out.append(res)
                matches += res.get("resourceType") == kind
            nxt = None
            for link in bundle.get("link", []):
                link = _dict(link)
                if link.get("relation") == "next" and _str(link.get("url")):
                    nxt = _next_link(url, link["url"])
            if nxt is None or nxt in seen or (max_matches is not None and matches >= max_matches):
                return out
            if pages >= self.max_pages:
                raise DirectoryError(
                    f"the directory's answer runs over more than {self.max_pages} pages"
                    " (narrow the search)"
                )
            seen.add(nxt)
            url, current = nxt, None

    def _with_organizations(
        self, resources: list[dict[str, Any]], budget: _Budget
    ) -> list[dict[str, Any]]:
        """Add the organizations the active roles point to, fetched by batches of ``_id``."""
        missing = [oid for oid in _missing_organizations(resources) if FHIR_ID.fullmatch(oid)]
        for i in range(0, len(missing), BATCH):
            batch = missing[i : i + BATCH]
            wanted = set(batch)
            found = self._collect(
                "Organization", {"_id": ",".join(batch), "_count": str(MAX_COUNT)}, budget
            )
            # only what was asked for: a stray Practitioner here would join the answer
            resources = resources + [
                r
                for r in found
                if r.get("resourceType") == "Organization" and r.get("id") in wanted
            ]
        return resources

    def _practitioners(
        self, params: Params, budget: _Budget, *, max_matches: int | None = None
    ) -> list[Practitioner]:
        params = {
            **params,
            "_count": str(MAX_COUNT),
            "_revinclude": "PractitionerRole:practitioner",
        }
        resources = self._collect("Practitioner", params, budget, max_matches=max_matches)
        return practitioners_from_bundle(
            self._with_organizations(resources, budget), source=self.base_url
        )

    # -- Directory --------------------------------------------------------------------------
    def lookup(self, ref: Ref) -> Practitioner:
        _key, parsed = normalize_ref(ref)
        budget = self._budget()
        if isinstance(parsed, MSSanteAddress):
            found = self._by_mailbox([str(parsed)], budget)
            matches = [p for p in found if any(m.address == str(parsed) for m in p.mailboxes)]
        else:
            found = self._practitioners({"identifier": f"{IDNPS_SYSTEM}|{parsed.idnps}"}, budget)
            matches = [p for p in found if p.idnps == parsed.idnps]
        return unique(matches, ref)

    def _by_mailbox(self, addresses: Sequence[str], budget: _Budget) -> list[Practitioner]:
        joined = ",".join(addresses)
        found = self._practitioners({"mailbox-mss": joined}, budget)
        wanted = set(addresses)
        if not any(m.address in wanted for p in found for m in p.mailboxes) or len(addresses) > 1:
            # the mailbox may sit on a PractitionerRole only
            roles = self._collect(
                "PractitionerRole",
                {
                    "mailbox-mss": joined,
                    "_count": str(MAX_COUNT),
                    "_include": ["PractitionerRole:practitioner", "PractitionerRole:organization"],
                },
                budget,
            )
            found += practitioners_from_bundle(
                self._with_organizations(roles, budget), source=self.base_url
            )
        return found

    def lookup_many(self, refs: Sequence[Ref]) -> dict[str, Practitioner]:
        """Resolve many references in few requests: identifiers by batches of 50 with
        ``identifier=a,b,c``, addresses with ``mailbox-mss=a,b``. The resource cap is
        ``max_resources`` per batch; the deadline is the call's, whatever its size."""
        keys: dict[str, Identifier | MSSanteAddress] = {}
        for ref in refs:
            key, parsed = normalize_ref(ref)
            keys.setdefault(key, parsed)
        idents = [p for p in keys.values() if isinstance(p, Identifier)]
        addresses = [str(p) for p in keys.values() if isinstance(p, MSSanteAddress)]
        batches = -(-len(idents) // BATCH) + -(-len(addresses) // BATCH)
        budget = self._budget(batches)
        found: list[Practitioner] = []
        for i in range(0, len(idents), BATCH):
            batch = idents[i : i + BATCH]
            value = ",".join(f"{IDNPS_SYSTEM}|{ident.idnps}" for ident in batch)
            found += self._practitioners({"identifier": value}, budget)
        for i in range(0, len(addresses), BATCH):
            found += self._by_mailbox(addresses[i : i + BATCH], budget)
        out: dict[str, Practitioner] = {}
        for key, parsed in keys.items():
            if isinstance(parsed, MSSanteAddress):
                matches = [p for p in found if any(m.address == str(parsed) for m in p.mailboxes)]
            else:
                matches = [p for p in found if p.idnps == parsed.idnps]
            out[key] = unique(matches, key.split(":", 1)[1])
        return out

    def search(
        self,
        *,
        name: str | None = None,
        given: str | None = None,
        profession: str | None = None,
        city: str | None = None,
        limit: int = 200,
    ) -> list[Practitioner]:
        if not any((name, given, profession, city)):
            raise ValueError("give at least one search criterion")
        for label, value in (("name", name), ("given", given)):
            try:
                (value or "").encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate, as undecodable bytes in argv become
                raise ValueError(f"the search criterion {label} is not valid text") from None
        params: Params = {}
        if name:
            params["name"] = name
        if given:
            params["given"] = given
        # profession and city are filtered here: the API has no reliable parameter for them.
        found = self._practitioners(
            params, self._budget(), max_matches=limit if not (profession or city) else None
        )
        result = [
            p
            for p in found
            if search_matches(p, name=name, given=given, profession=profession, city=city)
        ]
        return result[:limit]
