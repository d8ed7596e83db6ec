"""A small Annuaire-shaped FHIR server on loopback, for the directory tests and benchmarks.

It speaks real HTTP (``http.server`` on 127.0.0.1, a random port) and implements the part of the
ANS Annuaire Santé FHIR API medsecure uses: ``/Practitioner`` (``identifier`` with comma-OR,
``name``, ``given``, ``mailbox-mss``, ``_revinclude=PractitionerRole:practitioner``, ``_count``),
``/PractitionerRole`` (``mailbox-mss``, ``_include=PractitionerRole:practitioner`` and
``PractitionerRole:organization``), ``/Organization?_id=a,b``, paging through
``Bundle.link[next]`` without ``total`` (HAPI-style ``[base]?_getpages=…`` links, as the ANS
server sends), ``ESANTE-API-KEY`` checking (401), and injected faults (429 with Retry-After, 5xx,
hanging responses, garbage).

Like a strict FHIR server, it answers 400 to any search parameter, ``_include`` or
``_revinclude`` the ANS CapabilityStatement does not declare (``DECLARED``), modifiers such as
``_include:iterate`` included. Hostile behaviours for the bounds tests: ``endless_pages`` (a
``next`` link on every page, each to a new URL), and ``respond`` (a callable taking over the
whole response: see :func:`drip` and :func:`huge_body`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import itertools
import json
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

IDNPS = "urn:oid:1.2.250.1.71.4.2.1"
IDNST = "urn:oid:1.2.250.1.71.4.2.2"
RPPS = "https://rpps.esante.gouv.fr"
EMAIL_TYPE = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-contact-point-email-type"
MSS_META = "https://interop.esante.gouv.fr/ig/fhir/annuaire/StructureDefinition/as-ext-mailbox-mss-metadata"
R256 = "https://mos.esante.gouv.fr/NOS/TRE_R256-TypeMessagerie/FHIR/TRE-R256-TypeMessagerie"
R257 = "https://mos.esante.gouv.fr/NOS/TRE_R257-TypeBAL/FHIR/TRE-R257-TypeBAL"
G15 = "https://mos.esante.gouv.fr/NOS/TRE_G15-ProfessionSante/FHIR/TRE-G15-ProfessionSante"
R38 = "https://mos.esante.gouv.fr/NOS/TRE_R38-SpecialiteOrdinale/FHIR/TRE-R38-SpecialiteOrdinale"

# What the ANS API v2 CapabilityStatement declares for the three resources medsecure reads:
# ansforge/IG-fhir-annuaire, input/fsh/CapabilityStatement/AsServerDPCapabilityStatementv2.fsh
# (rest.resource[].searchParam[].name, searchInclude, searchRevInclude). `_count` is a result
# parameter the API documentation lists as supported (ansforge/annuaire-sante-fhir-documentation,
# docs/pages/documentation/starters/api-basics.md). Everything else is a 400 here.
DECLARED: dict[str, dict[str, set[str]]] = {
    "Practitioner": {
        "params": {
            "_id",
            "_lastUpdated",
            "active",
            "data-information-system",
            "data-registration-authority",
            "family",
            "given",
            "identifier",
            "identifier-type",
            "mailbox-mss",
            "name",
            "number-smartcard",
            "qualification-code",
            "type-smartcard",
        },
        "_include": set(),
        "_revinclude": {"PractitionerRole:practitioner"},
    },
    "PractitionerRole": {
        "params": {
            "_id",
            "_lastUpdated",
            "active",
            "data-information-system",
            "data-registration-authority",
            "identifier",
            "mailbox-mss",
            "organization",
            "practitioner",
            "role",
        },
        "_include": {"*", "PractitionerRole:organization", "PractitionerRole:practitioner"},
        "_revinclude": set(),
    },
    "Organization": {
        "params": {
            "_id",
            "_lastUpdated",
            "active",
            "address",
            "address-city",
            "address-line",
            "address-postalcode",
            "data-information-system",
            "data-registration-authority",
            "identifier",
            "identifier-type",
            "mailbox-mss",
            "name",
            "partof",
            "pharmacy-licence",
            "type",
        },
        "_include": {"*", "Organization:partof"},
        "_revinclude": {
            "Device:organization",
            "HealthcareService:organization",
            "PractitionerRole:organization",
        },
    },
}
RESULT_PARAMETERS = {"_count"}
IMPLEMENTED = {"_id", "identifier", "mailbox-mss", "name", "given"}  # filters this server applies


def undeclared(kind: str, params: dict[str, list[str]]) -> list[str]:
    """The parameters (or include values) of a search the CapabilityStatement does not declare."""
    declared = DECLARED[kind]
    bad = []
    for name, values in params.items():
        if name in RESULT_PARAMETERS:
            continue
        if name in ("_include", "_revinclude"):
            bad += [f"{name}={v}" for v in values if v not in declared[name]]
        elif name not in declared["params"]:  # modifiers (`:iterate`, `:exact`) included
            bad.append(name)
    return bad


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
        practitioner("p-roleonly", "810000000017", "PETIT", "Luc", rpps="10000000017"),
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


def loopback_tls(folder: Path) -> tuple[ssl.SSLContext, Path]:
    """A throw-away CA and a certificate for 127.0.0.1 signed by it: the server's TLS context,
    and the CA file a client trusts (``SSL_CERT_FILE``)."""
    now = dt.datetime.now(dt.UTC)

    def cert(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None, signer: Any
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
        )
        if issuer is None:
            builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        else:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("medsecure test CA", ca_key, None, ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = cert("127.0.0.1", key, ca.subject, ca_key)
    ca_file, chain, key_file = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain, key_file)
    return context, ca_file


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
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.data = data if data is not None else sample_data()
        self.api_key = api_key
        self.page_size = page_size
        self.faults: deque[tuple[int, dict[str, str], bytes]] = deque()
        self.hang_seconds = 0.0
        self.endless_pages = False
        """Every searchset page links to a next one, each at a new URL."""
        self.respond: Callable[[AnnuaireServer, BaseHTTPRequestHandler], None] | None = None
        """Takes over every response (after the request is recorded)."""
        self.requests: list[tuple[str, dict[str, list[str]], dict[str, str]]] = []
        self.bytes_sent = 0
        """Body bytes written by :func:`huge_body` (what a client made the server send)."""
        self.closing = threading.Event()
        self._pages: dict[str, tuple[str, dict[str, list[str]]]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:  # HTTPS, as the real API: `tls` holds the server's certificate
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        scheme = "https" if tls is not None else "http"
        self.base_url = f"{scheme}://127.0.0.1:{self.port}/fhir/v2"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> AnnuaireServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.closing.set()  # ends drips still running
        self.httpd.shutdown()
        self.httpd.server_close()

    def inject(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self.faults.append((status, headers or {}, body))

    def searches(self, kind: str) -> list[dict[str, list[str]]]:
        """The parameters of every search of ``kind`` received so far (not the next pages)."""
        return [params for path, params, _ in self.requests if path == f"/fhir/v2/{kind}"]

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

    def _outcome(self, h: BaseHTTPRequestHandler, status: int, code: str, text: str) -> None:
        issue = {"severity": "error", "code": code, "diagnostics": text}
        body = {"resourceType": "OperationOutcome", "issue": [issue]}
        self._send(h, status, json.dumps(body).encode())

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        params = parse_qs(parts.query)
        with self._lock:
            self.requests.append((parts.path, params, dict(h.headers.items())))
            fault = self.faults.popleft() if self.faults else None
        if self.respond is not None:
            self.respond(self, h)
            return
        if self.hang_seconds:
            time.sleep(self.hang_seconds)
        if fault is not None:
            self._send(h, fault[0], fault[2], fault[1])
            return
        if self.api_key is not None and h.headers.get("ESANTE-API-KEY") != self.api_key:
            self._outcome(h, 401, "security", "missing or wrong ESANTE-API-KEY")
            return
        base = "/fhir/v2"
        if parts.path == base and "_getpages" in params:  # a next link this server made
            with self._lock:
                stored = self._pages.get(params["_getpages"][0])
            if stored is None:
                self._outcome(h, 410, "not-found", "unknown or expired page set")
                return
            kind, search = stored
            offset = int(params.get("_getpagesoffset", ["0"])[0])
        elif parts.path.startswith(base + "/") and parts.path[len(base) + 1 :] in DECLARED:
            kind, search, offset = parts.path[len(base) + 1 :], params, 0
            bad = undeclared(kind, search)
            if bad:
                self._outcome(h, 400, "not-supported", f"unknown search parameter(s): {bad}")
                return
            unsupported = (
                set(search) - IMPLEMENTED - RESULT_PARAMETERS - {"_include", "_revinclude"}
            )
            if unsupported:  # declared by the ANS, not implemented by this test server
                self._outcome(h, 501, "not-supported", f"not implemented here: {unsupported}")
                return
        else:
            self._outcome(h, 404, "not-found", "no such endpoint")
            return
        self._send(h, 200, json.dumps(self._page(kind, search, offset)).encode())

    def _page(self, kind: str, search: dict[str, list[str]], offset: int) -> dict[str, Any]:
        matches = self._search(kind, search)
        count = min(int(search.get("_count", ["20"])[0]), 200)
        if self.page_size:
            count = min(count, self.page_size)
        chunk = matches[offset : offset + count]
        ids = {(r["resourceType"], r["id"]) for r in chunk}
        entries = [{"resource": r, "search": {"mode": "match"}} for r in chunk]
        for r in self._includes(chunk, search):
            if (r["resourceType"], r["id"]) not in ids:
                ids.add((r["resourceType"], r["id"]))
                entries.append({"resource": r, "search": {"mode": "include"}})
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": entries,
            "link": [],
        }
        if offset + count < len(matches) or self.endless_pages:
            with self._lock:
                token = f"p{next(self._ids)}"  # endless: a new URL every time
                self._pages[token] = (kind, search)
            query = {"_getpages": token, "_getpagesoffset": offset + count, "_count": count}
            bundle["link"].append(
                {"relation": "next", "url": f"{self.base_url}?{urlencode(query)}"}
            )
        return bundle

    def _of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.data if r["resourceType"] == kind]

    def _search(self, kind: str, params: dict[str, list[str]]) -> list[dict[str, Any]]:
        items = [r for r in self._of(kind) if "id" in r]
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
        return items

    def _includes(
        self, chunk: list[dict[str, Any]], params: dict[str, list[str]]
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if "PractitionerRole:practitioner" in params.get("_revinclude", []):
            ids = {f"Practitioner/{r['id']}" for r in chunk if r["resourceType"] == "Practitioner"}
            out += [
                r for r in self._of("PractitionerRole") if r["practitioner"]["reference"] in ids
            ]
        roles = [r for r in chunk if r["resourceType"] == "PractitionerRole"]
        if "PractitionerRole:practitioner" in params.get("_include", []):
            refs = {r["practitioner"]["reference"] for r in roles}
            out += [p for p in self._of("Practitioner") if f"Practitioner/{p['id']}" in refs]
        if "PractitionerRole:organization" in params.get("_include", []):
            refs = {r["organization"]["reference"] for r in roles if "organization" in r}
            out += [o for o in self._of("Organization") if f"Organization/{o['id']}" in refs]
        return out


# -- hostile responses (set as ``server.respond``) ------------------------------------------------


def drip(
    part: str, interval: float = 0.05
) -> Callable[[AnnuaireServer, BaseHTTPRequestHandler], None]:
    """Answer 200 and then send one byte every ``interval`` seconds, for ever: in the headers
    (``part="headers"``, an endless header line) or in the body (``"body"``). Stops when the
    client hangs up or the server closes."""

    def respond(server: AnnuaireServer, h: BaseHTTPRequestHandler) -> None:
        try:
            h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n")
            if part == "body":
                h.wfile.write(b"\r\n" + b'{"resourceType": "Bundle", "entry": [')
            else:
                h.wfile.write(b"X-Drip: ")
            while not server.closing.wait(interval):
                h.wfile.write(b" " if part == "body" else b"x")
        except OSError:
            return  # the client gave up: what the test expects

    return respond


def huge_body(
    size: int, *, declared: bool
) -> Callable[[AnnuaireServer, BaseHTTPRequestHandler], None]:
    """Answer 200 with a valid ``size``-byte Bundle made lazily (64 KiB at a time, never held in
    memory): whitespace between its first and last members. With ``declared`` the length is in
    Content-Length, else the body ends when the connection closes. Counts what it sends."""
    head = b'{"resourceType": "Bundle", "type": "searchset",'
    tail = b'"entry": []}'
    pad = b" " * 65536

    def respond(server: AnnuaireServer, h: BaseHTTPRequestHandler) -> None:
        try:
            h.send_response(200)
            h.send_header("Content-Type", "application/fhir+json")
            if declared:
                h.send_header("Content-Length", str(size))
            h.end_headers()
            h.wfile.write(head)
            left = size - len(head) - len(tail)
            while left > 0 and not server.closing.is_set():
                n = h.wfile.write(pad[: min(left, len(pad))])
                left -= n
                server.bytes_sent += n
            h.wfile.write(tail)
        except OSError:
            return

    return respond
