"""FhirDirectory against a real HTTP server on loopback serving Annuaire-shaped FHIR JSON."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
from fhir_server import AnnuaireServer, sample_data

from medsecure import (
    AmbiguousPractitioner,
    DirectoryError,
    DirectoryUnavailable,
    FhirDirectory,
    PractitionerNotFound,
)
from medsecure.directory import CachedDirectory


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
    path, params, headers = server.requests[-1]
    assert path == "/fhir/v2/Practitioner"
    assert params["identifier"] == ["urn:oid:1.2.250.1.71.4.2.1|810000005479"]
    assert params["_revinclude"] == ["PractitionerRole:practitioner"]
    assert headers["ESANTE-API-KEY"] == "test-key"
    assert int(params["_count"][0]) <= 200


def test_adeli_only_professional(fhir: FhirDirectory) -> None:
    nurse = fhir.lookup("adeli:751004587")
    assert nurse.idnps == "0751004587" and nurse.rpps is None and nurse.adeli == "751004587"
    assert fhir.lookup("0751004587") == nurse
    assert nurse.mailboxes[0].liste_rouge is True
    assert nurse.profession is not None and nurse.profession.label == "Infirmier"


def test_lookup_by_mailbox(fhir: FhirDirectory) -> None:
    assert fhir.lookup("sophie.martin@medecin.mssante.fr").idnps == "810000005479"
    # a mailbox carried by a PractitionerRole only
    assert fhir.lookup("luc.petit@chu-nancy.mssante.fr").idnps == "810000000019"
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
        pages = [r for r in server.requests if r[0].endswith("/Practitioner")]
        assert len(pages) == 5  # 120 results / 25 per page, no `total` needed
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
