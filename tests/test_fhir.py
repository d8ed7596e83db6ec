"""FhirDirectory against a real HTTP server on loopback serving Annuaire-shaped FHIR JSON."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fhir_server import (
    AnnuaireServer,
    drip,
    huge_body,
    loopback_tls,
    organization,
    practitioner,
    role,
    sample_data,
)

from medsecure import (
    AmbiguousPractitioner,
    ConfigError,
    DirectoryError,
    DirectoryUnavailable,
    PractitionerNotFound,
)
from medsecure.directory import CachedDirectory, FhirDirectory


class Sleeps:
    """Records the waits instead of sleeping (no timed assertions, no slow tests)."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
def server() -> Iterator[AnnuaireServer]:
    with AnnuaireServer(sample_data(extra_bernards=120)) as srv:
        yield srv


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def fhir(server: AnnuaireServer, sleeps: Sleeps) -> Iterator[FhirDirectory]:
    with FhirDirectory(server.base_url, api_key="test-key", sleep=sleeps) as d:
        yield d


def test_lookup_by_rpps_maps_v2_shapes(fhir: FhirDirectory, server: AnnuaireServer) -> None:
    p = fhir.lookup("rpps:10000005479")
    assert (p.idnps, p.rpps, p.family_name, p.given_name) == (
        "810000005479",
        "10000005479",
        "MARTIN",
        "Sophie",
    )
    assert p.profession is not None and (p.profession.code, p.profession.label) == ("10", "Médecin")
    assert p.specialty is not None and p.specialty.code == "SM26"
    addresses = [m.address for m in p.mailboxes]
    # Practitioner's and active role's MSSanté mailboxes only: no plain e-mail, no Apicrypt,
    # no inactive role, never the Organization's own ORG/APP mailboxes
    assert addresses == ["sophie.martin@medecin.mssante.fr", "cardio.martin@chu-nancy.mssante.fr"]
    assert p.mailboxes[0].type == "PER" and not p.mailboxes[0].liste_rouge
    assert [o.name for o in p.organizations] == ["CHU de Nancy"]
    assert p.organizations[0].city == "Nancy" and p.organizations[0].idnst == "1540000010"
    (params,) = server.searches("Practitioner")
    assert params["identifier"] == ["urn:oid:1.2.250.1.71.4.2.1|810000005479"]
    assert params["_revinclude"] == ["PractitionerRole:practitioner"]
    assert int(params["_count"][0]) <= 200
    # the organizations by a second request (the CapabilityStatement has no include on
    # Practitioner): only the active role's, not the inactive one's
    (orgs,) = server.searches("Organization")
    assert orgs["_id"] == ["o-chu"]
    assert all(h["ESANTE-API-KEY"] == "test-key" for _, _, h in server.requests)


def test_adeli_only_professional(fhir: FhirDirectory) -> None:
    nurse = fhir.lookup("adeli:751004587")
    assert nurse.idnps == "0751004587" and nurse.rpps is None and nurse.adeli == "751004587"
    assert fhir.lookup("0751004587") == nurse
    assert nurse.mailboxes[0].liste_rouge is True
    assert nurse.profession is not None and nurse.profession.label == "Infirmier"


def test_lookup_by_mailbox(fhir: FhirDirectory) -> None:
    assert fhir.lookup("sophie.martin@medecin.mssante.fr").idnps == "810000005479"
    # a mailbox carried by a PractitionerRole only
    assert fhir.lookup("luc.petit@chu-nancy.mssante.fr").idnps == "810000000017"
    with pytest.raises(AmbiguousPractitioner):
        fhir.lookup("cabinet.dupont@medecin.mssante.fr")
    with pytest.raises(PractitionerNotFound):
        fhir.lookup("secretariat@chu-nancy.mssante.fr")  # an Organization's mailbox
    with pytest.raises(PractitionerNotFound):
        fhir.lookup("rpps:19999999999")


def test_search_follows_next_links(server: AnnuaireServer, sleeps: Sleeps) -> None:
    server.page_size = 25
    with FhirDirectory(server.base_url, api_key="test-key", sleep=sleeps) as d:
        found = d.search(name="bernard")
        assert len(found) == 120
        assert len({p.idnps for p in found}) == 120
        # 120 results / 25 per page, no `total` needed: one search and four next pages
        assert len(server.searches("Practitioner")) == 1
        assert len([r for r in server.requests if "_getpages" in r[1]]) == 4
        assert d.search(name="bernard", limit=30)[29].family_name == "BERNARD"
        assert [p.given_name for p in d.search(name="martin", given="soph")] == ["Sophie"]
        assert [p.idnps for p in d.search(name="durand", profession="infirmier")] == ["0751004587"]
        assert [p.idnps for p in d.search(name="martin", city="nancy")] == ["810000005479"]
        with pytest.raises(ValueError):
            d.search()


def test_batched_lookup_of_100_recipients(server: AnnuaireServer, sleeps: Sleeps) -> None:
    refs = [f"rpps:2{i:010d}" for i in range(100)]
    with FhirDirectory(server.base_url, api_key="test-key", sleep=sleeps) as d:
        found = d.lookup_many(refs)
        assert len(found) == 100
        assert found["idnps:820000000042"].given_name == "Prénom042"
        assert d.requests_made <= 4  # two batches of 50 (+ organizations), not 100 requests
        with pytest.raises(PractitionerNotFound):
            d.lookup_many(["rpps:10000005479", "rpps:19999999999"])


def test_missing_api_key_is_401(server: AnnuaireServer, sleeps: Sleeps) -> None:
    with (
        FhirDirectory(server.base_url, sleep=sleeps) as d,
        pytest.raises(DirectoryError, match="HTTP 401"),
    ):
        d.lookup("rpps:10000005479")
    assert sleeps.waits == []  # not retried


def test_429_honours_retry_after(
    fhir: FhirDirectory, server: AnnuaireServer, sleeps: Sleeps
) -> None:
    server.inject(429, {"Retry-After": "3"})
    server.inject(429, {"Retry-After": "1"})
    assert fhir.lookup("rpps:10000005479").family_name == "MARTIN"
    assert sleeps.waits == [3.0, 1.0]


def test_a_retry_after_that_is_no_number_is_backoff_not_a_crash(
    fhir: FhirDirectory, server: AnnuaireServer, sleeps: Sleeps
) -> None:
    """A hostile directory (or anyone answering in its name) sends ``Retry-After: ²``: a digit
    to ``str.isdigit``, no number to ``float``. It used to escape lookup() as ValueError (which
    quarantines the envelope being verified instead of retrying it); it is ignored, and the
    ordinary backoff applies."""
    server.inject(429, {"Retry-After": "\u00b2"})
    assert fhir.lookup("rpps:10000005479").family_name == "MARTIN"
    assert len(sleeps.waits) == 1


def test_504_then_success_with_backoff(
    fhir: FhirDirectory, server: AnnuaireServer, sleeps: Sleeps
) -> None:
    server.inject(504)
    server.inject(502)
    server.inject(503)
    assert fhir.lookup("rpps:10000005479").family_name == "MARTIN"
    assert len(sleeps.waits) == 3
    # capped exponential backoff with jitter: each wait within [step/2, step]
    for i, w in enumerate(sleeps.waits):
        step = min(fhir.backoff_cap, fhir.backoff_base * 2**i)
        assert step / 2 <= w <= step


def test_persistent_failure_gives_up(server: AnnuaireServer, sleeps: Sleeps) -> None:
    for _ in range(10):
        server.inject(504)
    with (
        FhirDirectory(server.base_url, api_key="test-key", sleep=sleeps, max_attempts=4) as d,
        pytest.raises(DirectoryUnavailable, match="HTTP 504"),
    ):
        d.lookup("rpps:10000005479")
    assert len(sleeps.waits) == 3
    # a Retry-After longer than the time budget: give up at once
    server.faults.clear()
    server.inject(429, {"Retry-After": "3600"})
    with (
        FhirDirectory(server.base_url, api_key="test-key", sleep=sleeps, max_total_time=30) as d,
        pytest.raises(DirectoryUnavailable, match="429"),
    ):
        d.lookup("rpps:10000005479")


def test_dead_server(sleeps: Sleeps) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there any more
    with (
        FhirDirectory(f"http://127.0.0.1:{port}/fhir/v2", sleep=sleeps, max_attempts=3) as d,
        pytest.raises(DirectoryUnavailable, match="unreachable"),
    ):
        d.lookup("rpps:10000005479")
    assert len(sleeps.waits) == 2


def test_timeout(server: AnnuaireServer, sleeps: Sleeps) -> None:
    server.hang_seconds = 0.5
    with (
        FhirDirectory(
            server.base_url, api_key="test-key", sleep=sleeps, timeout=0.1, max_attempts=2
        ) as d,
        pytest.raises(DirectoryUnavailable, match="timed out"),
    ):
        d.lookup("rpps:10000005479")


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (200, b"<html>not json</html>", "not JSON"),
        (200, b'{"resourceType": "Patient"}', "not a Bundle"),
        (200, b'{"resourceType": "Bundle", "entry": {}}', "bad Bundle"),
        (200, b"[]", "not a Bundle"),
        (404, b"{}", "HTTP 404"),
        (400, b"{}", "HTTP 400"),
    ],
)
def test_broken_fhir_responses(
    fhir: FhirDirectory, server: AnnuaireServer, status: int, body: bytes, message: str
) -> None:
    server.inject(status, {}, body)
    with pytest.raises(DirectoryError, match=message):
        fhir.lookup("rpps:10000005479")


def test_broken_resources_are_skipped(sleeps: Sleeps) -> None:
    data = sample_data()
    data[0]["name"] = "not a list"  # wrong type
    data[0]["telecom"] = [
        {
            "system": "email",
            "value": "not-an-address",
            "extension": [
                {
                    "url": "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-contact-point-email-type",
                    "valueCoding": {"code": "MSSANTE"},
                }
            ],
        },
        5,
        None,
    ]
    data.append({"resourceType": "Practitioner", "id": "no-idnps", "name": [{"family": "SANSID"}]})
    data.append({"resourceType": "Practitioner"})
    with (
        AnnuaireServer(data) as srv,
        FhirDirectory(srv.base_url, api_key="test-key", sleep=sleeps) as d,
    ):
        p = d.lookup("rpps:10000005479")
        assert p.family_name is None and [m.address for m in p.mailboxes] == [
            "cardio.martin@chu-nancy.mssante.fr"
        ]
        assert d.search(name="sansid") == []


def test_next_link_to_another_host_is_refused(fhir: FhirDirectory, server: AnnuaireServer) -> None:
    server.inject(
        200,
        {},
        b'{"resourceType": "Bundle", "entry": [], "link": [{"relation": "next", "url": "http://127.0.0.2:9/steal"}]}',
    )
    with pytest.raises(DirectoryError, match="another host"):
        fhir.search(name="martin")


def test_httpx_errors_never_escape(server: AnnuaireServer, sleeps: Sleeps) -> None:
    def boom(request: httpx.Request) -> httpx.Response:
        raise httpx.DecodingError("bad", request=request)

    client = httpx.Client(transport=httpx.MockTransport(boom))
    with (
        FhirDirectory("http://127.0.0.1:1/fhir", client=client, sleep=sleeps) as d,
        pytest.raises(DirectoryError),
    ):
        d.lookup("rpps:10000005479")


@pytest.mark.parametrize(
    ("base_url", "problem"),
    [
        ("https://\u2026/fhir/v2", "host name"),  # the README's placeholder, pasted as is
        ("https://a_b..c/fhir", "host name"),  # an empty label: UnicodeError at connect time
        ("https://" + "a" * 70 + ".fr/fhir", "host name"),  # a label over 63 characters
        ("https://xn--a.fr/fhir", "host name"),  # a broken punycode label
        ("https://example.fr:abc/fhir", "port"),
        ("https://example.fr:99999/fhir", "port"),
        ("https://[::1/fhir", "not a valid URL"),
        ("https://exa\x00mple.fr/fhir", "not a valid URL"),
        ("ftp://example.fr/fhir", "http(s)"),
        ("https:///fhir", "http(s)"),
    ],
)
def test_malformed_base_url_is_a_config_error(base_url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)) as info:
        FhirDirectory(base_url)
    assert not isinstance(info.value.__cause__, ConfigError)


def test_base_url_credentials_never_in_the_error() -> None:
    with pytest.raises(ConfigError) as info:
        FhirDirectory("https://user:s3cret@a..b/fhir")
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize("api_key", ["cl\u00e9", "a\nb", "a\x00b", " "])
def test_api_key_an_http_header_cannot_carry(api_key: str) -> None:
    with pytest.raises(ConfigError, match="ESANTE-API-KEY") as info:
        FhirDirectory("http://127.0.0.1:1/fhir", api_key=api_key)
    assert api_key.strip() == "" or api_key not in str(info.value)


@pytest.mark.parametrize(
    "link",
    [
        "http://[::1/x",  # urljoin's ValueError
        "{base}?a=\u0000",  # httpx.InvalidURL: a control character
        "{base}?a=\u007f",
        "{base}?a=\ud800",  # a lone surrogate: UnicodeEncodeError
        "{base}/\ud800",
    ],
)
def test_malformed_next_link_is_a_directory_error(
    fhir: FhirDirectory, server: AnnuaireServer, link: str
) -> None:
    bundle = {"resourceType": "Bundle", "entry": [], "link": [{"relation": "next", "url": ""}]}
    bundle["link"][0]["url"] = link.format(base=server.base_url)
    server.inject(200, {}, json.dumps(bundle).encode())
    with pytest.raises(DirectoryError, match="next link"):
        fhir.search(name="martin")
    server.inject(200, {}, json.dumps(bundle).encode())
    with pytest.raises(DirectoryError, match="next link"):
        fhir.lookup("rpps:10000005479")


def test_search_criteria_that_are_not_text(fhir: FhirDirectory, server: AnnuaireServer) -> None:
    n = len(server.requests)
    for criteria in ({"name": "\udce9"}, {"given": "a\ud800"}):
        with pytest.raises(ValueError, match="not valid text") as info:
            fhir.search(**criteria)
        assert not isinstance(info.value, UnicodeError)
    assert len(server.requests) == n


def test_cached_fhir_directory_offline(server: AnnuaireServer, sleeps: Sleeps, tmp_path) -> None:  # type: ignore[no-untyped-def]
    now = [0.0]
    fhir = FhirDirectory(server.base_url, api_key="test-key", sleep=sleeps, max_attempts=2)
    cache = CachedDirectory(fhir, path=tmp_path / "c.sqlite", ttl=60, clock=lambda: now[0])
    assert not cache.lookup("rpps:10000005479").stale
    n = len(server.requests)
    assert cache.lookup("rpps:10000005479").family_name == "MARTIN"
    assert len(server.requests) == n  # served from the cache
    server.stop()
    now[0] = 3600
    p = cache.lookup("rpps:10000005479")
    assert p.stale and p.family_name == "MARTIN"
    cache.close()


def test_hostile_json_nesting(fhir: FhirDirectory, server: AnnuaireServer) -> None:
    server.inject(200, {}, b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(DirectoryError, match="not JSON"):
        fhir.lookup("rpps:10000005479")


# -- only what the ANS CapabilityStatement declares ------------------------------------------------


def test_the_test_server_refuses_what_the_capability_statement_does_not_declare(
    server: AnnuaireServer,
) -> None:
    key = {"ESANTE-API-KEY": "test-key"}
    ident = "urn:oid:1.2.250.1.71.4.2.1|810000005479"
    base = server.base_url
    refused = [
        f"{base}/Practitioner?identifier={ident}&_include:iterate=PractitionerRole:organization",
        f"{base}/Practitioner?identifier={ident}&_include=PractitionerRole:organization",
        f"{base}/Practitioner?identifier:exact={ident}",
        f"{base}/Practitioner?city=Nancy",
        f"{base}/Organization?_revinclude=PractitionerRole:practitioner",
    ]
    for url in refused:
        assert httpx.get(url, headers=key).status_code == 400, url
    accepted = f"{base}/Practitioner?identifier={ident}&_revinclude=PractitionerRole:practitioner"
    assert httpx.get(accepted, headers=key).status_code == 200


def test_every_kind_of_call_uses_declared_parameters_only(
    fhir: FhirDirectory, server: AnnuaireServer
) -> None:
    # the strict server answers 400 to anything undeclared: each of these would raise
    assert fhir.lookup("rpps:10000005479").organizations[0].name == "CHU de Nancy"
    assert fhir.lookup("sophie.martin@medecin.mssante.fr").idnps == "810000005479"
    petit = fhir.lookup("luc.petit@chu-nancy.mssante.fr")  # through PractitionerRole
    assert petit.idnps == "810000000017" and petit.organizations[0].city == "Nancy"
    found = fhir.lookup_many(["adeli:751004587", "luc.petit@chu-nancy.mssante.fr"])
    assert found["idnps:0751004587"].organizations[0].city == "Paris"
    assert [p.idnps for p in fhir.search(name="martin", city="nancy")] == ["810000005479"]
    assert all(
        ":" not in name for _, params, _ in server.requests for name in params
    )  # no modifier anywhere, `_include:iterate` least of all


def test_organizations_come_by_one_batched_request(sleeps: Sleeps) -> None:
    data = []
    for i in range(5):
        rpps = f"3{i:010d}"
        data.append(practitioner(f"p{i}", "8" + rpps, "ROBERT", f"P{i}", rpps=rpps))
        data.append(role(f"r{i}", f"p{i}", f"o{i}"))
        data.append(organization(f"o{i}", f"15400000{i}0", f"Clinique {i}", f"Ville{i}"))
    data.append(role("r-old", "p0", "o-closed", active=False))  # an inactive role's: not asked
    data.append(role("r-bad", "p1", "x,y"))  # not a FHIR id: would break the comma-OR batch
    data.append(organization("o-closed", "1540000990", "Fermée", "Toul"))
    with (
        AnnuaireServer(data) as srv,
        FhirDirectory(srv.base_url, api_key="test-key", sleep=sleeps) as d,
    ):
        found = d.lookup_many([f"rpps:3{i:010d}" for i in range(5)])
        assert [found[f"idnps:83{i:010d}"].organizations[0].city for i in range(5)] == [
            f"Ville{i}" for i in range(5)
        ]
        (orgs,) = srv.searches("Organization")
        assert orgs["_id"] == ["o0,o1,o2,o3,o4"]
        assert d.requests_made == 2  # one for the practitioners, one for their organizations


# -- bounds: pages, resources, time, size ----------------------------------------------------------


def test_endless_next_pages_are_capped(server: AnnuaireServer, sleeps: Sleeps) -> None:
    server.endless_pages = True  # same origin, a new URL each time: only a cap stops it
    with FhirDirectory(server.base_url, api_key="test-key", sleep=sleeps, max_pages=5) as d:
        with pytest.raises(DirectoryError, match="more than 5 pages"):
            d.lookup("rpps:10000005479")
        assert len(server.requests) == 5
        with pytest.raises(DirectoryError, match="more than 5 pages"):
            d.search(name="bernard", profession="infirmier")
        assert not isinstance(DirectoryError("x"), DirectoryUnavailable)  # not served stale


def test_resources_per_call_are_capped(server: AnnuaireServer, sleeps: Sleeps) -> None:
    with FhirDirectory(server.base_url, api_key="test-key", sleep=sleeps, max_resources=150) as d:
        with pytest.raises(DirectoryError, match="more than 150 resources"):
            d.search(name="bernard", profession="infirmier")  # 120 BERNARDs and their roles
        assert d.lookup("rpps:10000005479").family_name == "MARTIN"  # a fresh budget per call
        # lookup_many: the cap is per batch of 50 references, so a big batch is not refused
        refs = [f"rpps:2{i:010d}" for i in range(100)]
        assert len(d.lookup_many(refs)) == 100


@pytest.mark.parametrize(
    ("part", "own_client"), [("headers", False), ("body", False), ("body", True)]
)
def test_dripping_server_hits_the_call_deadline(
    server: AnnuaireServer, sleeps: Sleeps, part: str, own_client: bool
) -> None:
    # one byte every 50 ms never trips the 10 s per-read timeout; only the call's deadline
    # (real clock, 1 s here) ends it. With the caller's own httpx.Client, the body is still
    # bounded (checked as it streams); the header drip needs the deadline transport.
    server.respond = drip(part, interval=0.05)
    client = httpx.Client(timeout=10) if own_client else None
    with (
        FhirDirectory(
            server.base_url, api_key="test-key", sleep=sleeps, max_total_time=1.0, client=client
        ) as d,
        pytest.raises(DirectoryUnavailable, match="deadline"),
    ):
        d.lookup("rpps:10000005479")
    if client is not None:
        client.close()


@pytest.mark.parametrize("declared", [False, True])
def test_200_mb_body_is_refused_as_it_streams(
    server: AnnuaireServer, sleeps: Sleeps, declared: bool
) -> None:
    size = 200 * 1024 * 1024
    server.respond = huge_body(size, declared=declared)
    with (
        FhirDirectory(server.base_url, api_key="test-key", sleep=sleeps) as d,
        pytest.raises(DirectoryError, match="larger than the 8388608-byte limit"),
    ):
        d.lookup("rpps:10000005479")
    # the client hung up early: the server could only push a few socket buffers more
    assert server.bytes_sent < 64 * 1024 * 1024


def test_unoffered_content_encoding_is_refused(fhir: FhirDirectory, server: AnnuaireServer) -> None:
    # brotli/zstd can expand far beyond zlib's ~1000:1 per chunk: only gzip/deflate are offered
    server.inject(200, {"Content-Encoding": "br"}, b"\x00" * 16)
    with pytest.raises(DirectoryError, match="content encoding"):
        fhir.lookup("rpps:10000005479")
    (_, _, headers) = server.requests[0]
    assert headers["Accept-Encoding"] == "gzip, deflate"


def test_environment_proxy_is_still_honoured(
    server: AnnuaireServer, sleeps: Sleeps, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the deadline transport does not speak to proxies; with one set, httpx's client is used
    with AnnuaireServer() as proxy:  # serves absolute-URI requests as a proxy would receive them
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        with FhirDirectory(server.base_url, api_key="test-key", sleep=sleeps) as d:
            assert d.lookup("rpps:10000005479").family_name == "MARTIN"
        assert proxy.requests and not server.requests
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        with FhirDirectory(server.base_url, api_key="test-key", sleep=sleeps) as d:
            assert d.lookup("rpps:10000005479").family_name == "MARTIN"
        assert server.requests


def test_https_through_the_deadline_transport(
    tmp_path: Path, sleeps: Sleeps, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the API is HTTPS: certificates are verified (SSL_CERT_FILE honoured, as httpx does) and a
    # server dripping TLS records still meets the call's deadline
    context, ca_file = loopback_tls(tmp_path)
    with AnnuaireServer(tls=context) as srv:
        with (
            FhirDirectory(srv.base_url, api_key="test-key", sleep=sleeps, max_attempts=1) as d,
            pytest.raises(DirectoryUnavailable),  # our CA is not trusted yet
        ):
            d.lookup("rpps:10000005479")
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        with FhirDirectory(srv.base_url, api_key="test-key", sleep=sleeps) as d:
            assert d.lookup("rpps:10000005479").organizations[0].name == "CHU de Nancy"
            srv.respond = drip("headers", interval=0.05)
            with pytest.raises(DirectoryUnavailable, match="deadline"):
                FhirDirectory(srv.base_url, api_key="test-key", max_total_time=1.0).lookup(
                    "rpps:10000005479"
                )


def test_a_patient_mailbox_never_travels_to_the_directory(
    fhir: FhirDirectory, server: AnnuaireServer
) -> None:
    ins = "1800175123456"  # the local part of a patient's mailbox is the INS
    patient = f"{ins}{97 - int(ins) % 97:02d}@patient.mssante.fr"
    with pytest.raises(ValueError, match="patient"):
        fhir.lookup(patient)
    with pytest.raises(ValueError, match="patient"):
        fhir.lookup_many(["rpps:10000005479", patient])
    assert server.requests == []
