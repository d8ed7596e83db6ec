"""A small Annuaire-shaped FHIR server on loopback, for the directory tests and benchmarks.

It speaks real HTTP (``http.server`` on 127.0.0.1, a random port) and implements the part of the
ANS Annuaire Santé FHIR API medsecure uses: ``/Practitioner`` (``identifier`` with comma-OR,
``name``, ``given``, ``mailbox-mss``, ``_revinclude=PractitionerRole:practitioner``,
``_include:iterate=PractitionerRole:organization``, ``_count``), ``/PractitionerRole``
(``mailbox-mss``, ``_include=PractitionerRole:practitioner``), ``/Organization?_id=a,b``, paging
through ``Bundle.link[next]`` without ``total``, ``ESANTE-API-KEY`` checking (401), and
injected faults (429 with Retry-After, 5xx, hanging responses, garbage).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

IDNPS = "urn:oid:1.2.250.1.71.4.2.1"
IDNST = "urn:oid:1.2.250.1.71.4.2.2"
RPPS = "https://rpps.esante.gouv.fr"
EMAIL_TYPE = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-contact-point-email-type"
MSS_META = "https://interop.esante.gouv.fr/ig/fhir/annuaire/StructureDefinition/as-ext-mailbox-mss-metadata"
R256 = "https://mos.esante.gouv.fr/NOS/TRE_R256-TypeMessagerie/FHIR/TRE-R256-TypeMessagerie"
R257 = "https://mos.esante.gouv.fr/NOS/TRE_R257-TypeBAL/FHIR/TRE-R257-TypeBAL"
G15 = "https://mos.esante.gouv.fr/NOS/TRE_G15-ProfessionSante/FHIR/TRE-G15-ProfessionSante"
R38 = "https://mos.esante.gouv.fr/NOS/TRE_R38-SpecialiteOrdinale/FHIR/TRE-R38-SpecialiteOrdinale"


def mss(
    address: str, box_type: str = "PER", liste_rouge: bool = False, kind: str = "MSSANTE"
) -> dict[str, Any]:
    return {
        "system": "email",
        "value": address,
        "extension": [
            {"url": EMAIL_TYPE, "valueCoding": {"system": R256, "code": kind}},
            {
                "url": MSS_META,
                "extension": [
                    {
                        "url": "type",
                        "valueCodeableConcept": {"coding": [{"system": R257, "code": box_type}]},
                    },
                    {"url": "listeRouge", "valueBoolean": liste_rouge},
                ],
            },
        ],
    }


def practitioner(
    rid: str,
    idnps: str,
    family: str | None,
    given: str | None,
    *,
    rpps: str | None = None,
    telecom: list[dict[str, Any]] | None = None,
    profession: tuple[str, str] | None = ("10", "Médecin"),
    specialty: tuple[str, str] | None = None,
) -> dict[str, Any]:
    ids = [{"system": IDNPS, "value": idnps, "type": {"coding": [{"code": "IDNPS"}]}}]
    if rpps:
        ids.append({"system": RPPS, "value": rpps})
    res: dict[str, Any] = {
        "resourceType": "Practitioner",
        "id": rid,
        "active": True,
        "identifier": ids,
    }
    if family or given:
        res["name"] = [{"use": "usual", "family": family, "given": [given] if given else []}]
    if telecom:
        res["telecom"] = telecom
    quals = []
    if profession:
        quals.append(
            {"code": {"coding": [{"system": G15, "code": profession[0], "display": profession[1]}]}}
        )
    if specialty:
        quals.append(
            {"code": {"coding": [{"system": R38, "code": specialty[0], "display": specialty[1]}]}}
        )
    if quals:
        res["qualification"] = quals
    return res


def role(
    rid: str,
    prac: str,
    org: str | None,
    *,
    active: bool = True,
    telecom: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "PractitionerRole",
        "id": rid,
        "active": active,
        "practitioner": {"reference": f"Practitioner/{prac}"},
    }
    if org:
        res["organization"] = {"reference": f"Organization/{org}"}
    if telecom:
        res["telecom"] = telecom
    return res


def organization(
    rid: str, idnst: str, name: str, city: str, *, telecom: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Organization",
        "id": rid,
        "identifier": [{"system": IDNST, "value": idnst}],
        "name": name,
        "address": [{"city": city}],
    }
    if telecom:
        res["telecom"] = telecom
    return res


def sample_data(extra_bernards: int = 0) -> list[dict[str, Any]]:
    """Fictitious practitioners in Annuaire v2 shapes (names are the ANS documentation's)."""
    data = [
        practitioner(
            "p-martin",
            "810000005479",
            "MARTIN",
            "Sophie",
            rpps="10000005479",
            telecom=[
                mss("sophie.martin@medecin.mssante.fr"),
                {"system": "email", "value": "sophie.martin@example.org"},  # plain e-mail: ignored
                mss("smartin@apicrypt.org", kind="APICRYPT"),  # another messaging: ignored
                {"system": "phone", "value": "0600000000"},
            ],
            specialty=("SM26", "Cardiologie"),
        ),
        role(
            "r-martin-1", "p-martin", "o-chu", telecom=[mss("cardio.martin@chu-nancy.mssante.fr")]
        ),
        role(
            "r-martin-old",
            "p-martin",
            "o-old",
            active=False,
            telecom=[mss("old.martin@ancien.mssante.fr")],
        ),
        organization(
            "o-chu",
            "1540000010",
            "CHU de Nancy",
            "Nancy",
            telecom=[
                mss("secretariat@chu-nancy.mssante.fr", "ORG"),
                mss("dmp@chu-nancy.mssante.fr", "APP"),
            ],
        ),
        organization("o-old", "1540000028", "Clinique fermée", "Toul"),
        practitioner(
            "p-nurse",
            "0751004587",
            "DURAND",
            "Élise",
            telecom=[mss("elise.durand@infirmier.mssante.fr", liste_rouge=True)],
            profession=("60", "Infirmier"),
        ),
        role("r-nurse", "p-nurse", "o-cab"),
        organization("o-cab", "1750000016", "Cabinet infirmier", "Paris"),
        practitioner(
            "p-dup1",
            "810000000001",
            "DUPONT",
            "Jean",
            rpps="10000000001",
            telecom=[mss("cabinet.dupont@medecin.mssante.fr", "CAB")],
        ),
        practitioner(
            "p-dup2",
            "810000000002",
            "DUPONT",
            "Marie",
            rpps="10000000002",
            telecom=[mss("cabinet.dupont@medecin.mssante.fr", "CAB")],
        ),
        practitioner("p-roleonly", "810000000019", "PETIT", "Luc", rpps="10000000019"),
        role("r-roleonly", "p-roleonly", "o-chu", telecom=[mss("luc.petit@chu-nancy.mssante.fr")]),
    ]
    for i in range(extra_bernards):
        rpps = f"2{i:010d}"
        data.append(
            practitioner(
                f"p-b{i}",
                "8" + rpps,
                "BERNARD",
                f"Prénom{i:03d}",
                rpps=rpps,
                telecom=[mss(f"bernard.{i}@medecin.mssante.fr")],
            )
        )
        data.append(role(f"r-b{i}", f"p-b{i}", "o-chu"))
    return data


def _names(resource: dict[str, Any]) -> list[dict[str, Any]]:
    names = resource.get("name")
    return [n for n in names if isinstance(n, dict)] if isinstance(names, list) else []


def _fold(s: str) -> str:
    import unicodedata

    return "".join(
        c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c)
    ).casefold()


class AnnuaireServer:
    """Run with ``with AnnuaireServer() as srv: srv.base_url``."""

    def __init__(
        self,
        data: list[dict[str, Any]] | None = None,
        *,
        api_key: str | None = "test-key",
        page_size: int | None = None,
    ) -> None:
        self.data = data if data is not None else sample_data()
        self.api_key = api_key
        self.page_size = page_size
        self.faults: deque[tuple[int, dict[str, str], bytes]] = deque()
        self.hang_seconds = 0.0
        self.requests: list[tuple[str, dict[str, list[str]], dict[str, str]]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/fhir/v2"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> AnnuaireServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def inject(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self.faults.append((status, headers or {}, body))

    # -- request handling -------------------------------------------------------------------
    def _send(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
    ) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/fhir+json")
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        params = parse_qs(parts.query)
        with self._lock:
            self.requests.append((parts.path, params, dict(h.headers.items())))
            fault = self.faults.popleft() if self.faults else None
        if self.hang_seconds:
            time.sleep(self.hang_seconds)
        if fault is not None:
            self._send(h, fault[0], fault[2], fault[1])
            return
        if self.api_key is not None and h.headers.get("ESANTE-API-KEY") != self.api_key:
            self._send(
                h,
                401,
                json.dumps(
                    {
                        "resourceType": "OperationOutcome",
                        "issue": [{"severity": "error", "code": "security"}],
                    }
                ).encode(),
            )
            return
        prefix = "/fhir/v2/"
        if not parts.path.startswith(prefix):
            self._send(h, 404, b"{}")
            return
        kind = parts.path[len(prefix) :]
        try:
            matches, included = self._search(kind, params)
        except KeyError:
            self._send(h, 400, b'{"resourceType":"OperationOutcome"}')
            return
        count = min(int(params.get("_count", ["20"])[0]), 200)
        if self.page_size:
            count = min(count, self.page_size)
        page = int(params.get("_page", ["0"])[0])
        chunk = matches[page * count : (page + 1) * count]
        ids = {(r["resourceType"], r["id"]) for r in chunk}
        entries = [{"resource": r, "search": {"mode": "match"}} for r in chunk]
        for r in self._includes(chunk, params):
            if (r["resourceType"], r["id"]) not in ids:
                ids.add((r["resourceType"], r["id"]))
                entries.append({"resource": r, "search": {"mode": "include"}})
        del included
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": entries,
            "link": [],
        }
        if (page + 1) * count < len(matches):
            nxt = {k: v for k, v in params.items()}
            nxt["_page"] = [str(page + 1)]
            bundle["link"].append(
                {"relation": "next", "url": f"{self.base_url}/{kind}?{urlencode(nxt, doseq=True)}"}
            )
        self._send(h, 200, json.dumps(bundle).encode())

    def _of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.data if r["resourceType"] == kind]

    def _search(
        self, kind: str, params: dict[str, list[str]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        items = [r for r in self._of(kind) if "id" in r]
        if kind not in ("Practitioner", "PractitionerRole", "Organization"):
            raise KeyError(kind)
        if "identifier" in params:
            wanted = set()
            for value in params["identifier"][0].split(","):
                system, _, v = value.partition("|")
                wanted.add((system, v))
            items = [
                r
                for r in items
                if any((i.get("system"), i.get("value")) in wanted for i in r.get("identifier", []))
            ]
        if "_id" in params:
            ids = set(params["_id"][0].split(","))
            items = [r for r in items if r["id"] in ids]
        if "mailbox-mss" in params:
            wanted_mail = {a.lower() for a in params["mailbox-mss"][0].split(",")}
            items = [
                r
                for r in items
                if any(
                    isinstance(t, dict) and t.get("value", "").lower() in wanted_mail
                    for t in r.get("telecom", [])
                )
            ]
        if "name" in params:
            n = _fold(params["name"][0])
            items = [
                r
                for r in items
                if any(
                    _fold(x.get("family") or "").startswith(n)
                    or any(_fold(g).startswith(n) for g in x.get("given", []))
                    for x in _names(r)
                )
            ]
        if "given" in params:
            g = _fold(params["given"][0])
            items = [
                r
                for r in items
                if any(any(_fold(x).startswith(g) for x in nm.get("given", [])) for nm in _names(r))
            ]
        return items, []

    def _includes(
        self, chunk: list[dict[str, Any]], params: dict[str, list[str]]
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        roles: list[dict[str, Any]] = []
        if "PractitionerRole:practitioner" in params.get("_revinclude", []):
            ids = {f"Practitioner/{r['id']}" for r in chunk if r["resourceType"] == "Practitioner"}
            roles = [
                r for r in self._of("PractitionerRole") if r["practitioner"]["reference"] in ids
            ]
            out += roles
        if "PractitionerRole:practitioner" in params.get("_include", []):
            refs = {
                r["practitioner"]["reference"]
                for r in chunk
                if r["resourceType"] == "PractitionerRole"
            }
            out += [p for p in self._of("Practitioner") if f"Practitioner/{p['id']}" in refs]
            roles = [r for r in chunk if r["resourceType"] == "PractitionerRole"]
        if "PractitionerRole:organization" in params.get("_include:iterate", []):
            refs = {r["organization"]["reference"] for r in roles if "organization" in r}
            out += [o for o in self._of("Organization") if f"Organization/{o['id']}" in refs]
        return out
