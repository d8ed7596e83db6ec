"""Local directories, the cache and the chain (the FHIR backend has its own file)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from medsecure import (
    AmbiguousPractitioner,
    CachedDirectory,
    ChainDirectory,
    Code,
    DirectoryError,
    DirectoryUnavailable,
    Identity,
    KeyEntry,
    Mailbox,
    MemoryDirectory,
    OrganizationRef,
    Practitioner,
    PractitionerNotFound,
)
from medsecure.directory import Directory, FileDirectory
from medsecure.identifiers import parse, parse_address


def people(key: Identity | None = None) -> list[Practitioner]:
    return [
        Practitioner(
            idnps="810000005479",
            family_name="MARTIN",
            given_name="Sophie",
            profession=Code(code="10", label="Médecin"),
            organizations=(OrganizationRef(name="CHU", city="Nancy"),),
            mailboxes=(Mailbox(address="sophie.martin@medecin.mssante.fr", type="PER"),),
            keys=(KeyEntry(public=key.public),) if key else (),
        ),
        Practitioner(
            idnps="0751004587",
            family_name="Durand",
            given_name="Élise",
            profession=Code(code="60", label="Infirmier"),
        ),
        Practitioner(
            idnps="810000000001",
            family_name="DUPONT",
            given_name="Jean",
            mailboxes=(Mailbox(address="cabinet@medecin.mssante.fr", type="CAB"),),
        ),
        Practitioner(
            idnps="810000000002",
            family_name="DUPONT",
            given_name="Marie",
            mailboxes=(Mailbox(address="cabinet@medecin.mssante.fr", type="CAB"),),
        ),
    ]


@pytest.fixture(params=["memory", "json", "cbor"])
def directory(request: pytest.FixtureRequest, tmp_path: Path, alice: Identity) -> Directory:
    if request.param == "memory":
        return MemoryDirectory(people(alice))
    d = FileDirectory(tmp_path / f"dir.{request.param}")
    d.add_many(people(alice))
    return d


def test_lookup_by_every_kind_of_ref(directory: Directory, alice: Identity) -> None:
    p = directory.lookup("rpps:10000005479")
    assert p.family_name == "MARTIN" and p.keys[0].public == alice.public
    assert directory.lookup("810000005479") == p
    assert directory.lookup(parse("rpps:10000005479")) == p
    assert directory.lookup("Sophie.Martin@medecin.mssante.fr") == p
    assert directory.lookup(parse_address("sophie.martin@medecin.mssante.fr")) == p
    nurse = directory.lookup("adeli:751004587")
    assert directory.lookup("0751004587") == nurse
    with pytest.raises(PractitionerNotFound):
        directory.lookup("rpps:10000000019")
    with pytest.raises(AmbiguousPractitioner):
        directory.lookup("cabinet@medecin.mssante.fr")
    with pytest.raises(ValueError):
        directory.lookup("finess:540000010")
    with pytest.raises(ValueError):
        directory.lookup("not an id")
    with pytest.raises(TypeError):
        directory.lookup(42)  # type: ignore[arg-type]
    found = directory.lookup_many(["rpps:10000005479", "adeli:751004587", "810000005479"])
    assert set(found) == {"idnps:810000005479", "idnps:0751004587"}


def test_search(directory: Directory) -> None:
    assert [p.given_name for p in directory.search(name="dupont")] == ["Jean", "Marie"]
    assert [p.family_name for p in directory.search(given="elise")] == ["Durand"]  # accents folded
    assert [p.idnps for p in directory.search(profession="infirmier")] == ["0751004587"]
    assert [p.idnps for p in directory.search(profession="10")] == ["810000005479"]
    assert [p.idnps for p in directory.search(city="nancy")] == ["810000005479"]
    assert directory.search(name="dupont", limit=1)[0].given_name == "Jean"
    assert directory.search(name="nobody") == []


def test_file_directory_persistence(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "practice.json"
    d = FileDirectory(path)
    assert len(d) == 0  # missing file: empty directory
    d.add_many(people(alice))
    doc = json.loads(path.read_text())
    assert doc["format"] == "medsecure-directory" and len(doc["practitioners"]) == 4
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    again = FileDirectory(path)
    assert again.lookup("rpps:10000005479").keys[0].public == alice.public
    again.remove("adeli:751004587")
    # the first instance sees the change made through the other one (re-read on change)
    with pytest.raises(PractitionerNotFound):
        d.lookup("adeli:751004587")
    # a hand edit is picked up too
    doc = json.loads(path.read_text())
    entry = next(e for e in doc["practitioners"] if e["idnps"] == "810000005479")
    entry["family_name"] = "MARTIN-LEROY"
    path.write_text(json.dumps(doc))
    os.utime(path, ns=(1, 1))
    assert d.lookup("rpps:10000005479").family_name == "MARTIN-LEROY"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["practice.json"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", r"not valid JSON \(line 1"),
        (b'{"format": "other"}', "not a medsecure directory file"),
        (b'{"format": "medsecure-directory", "version": 9}', "unsupported version"),
        (b'{"format": "medsecure-directory", "version": 1, "practitioners": {}}', "must be a list"),
        (
            b'{"format": "medsecure-directory", "version": 1, "practitioners": [{"idnps": "123"}]}',
            "practitioner #1 is invalid at idnps",
        ),
        (b"[1, 2]", "not a medsecure directory file"),
    ],
)
def test_file_directory_broken_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    with pytest.raises(DirectoryError, match=message):
        FileDirectory(path)
    bad_cbor = tmp_path / "broken.cbor"
    bad_cbor.write_bytes(b"\xff\x00")
    with pytest.raises(DirectoryError, match="not valid CBOR"):
        FileDirectory(bad_cbor)


class Flaky(Directory):
    """A directory whose availability the test switches (counts the calls it gets)."""

    def __init__(self, inner: Directory) -> None:
        self.inner = inner
        self.up = True
        self.calls = 0

    def lookup(self, ref):  # type: ignore[no-untyped-def]
        self.calls += 1
        if not self.up:
            raise DirectoryUnavailable("down")
        return self.inner.lookup(ref)

    def search(self, **kw):  # type: ignore[no-untyped-def]
        self.calls += 1
        if not self.up:
            raise DirectoryUnavailable("down")
        return self.inner.search(**kw)


def test_cached_directory_serves_stale_entries_offline(tmp_path: Path, alice: Identity) -> None:
    now = [1000.0]
    inner = Flaky(MemoryDirectory(people(alice)))
    cache = CachedDirectory(inner, path=tmp_path / "cache.sqlite", ttl=60, clock=lambda: now[0])
    p = cache.lookup("rpps:10000005479")
    assert not p.stale and inner.calls == 1
    # fresh: answered from memory, under every ref of the entry
    assert cache.lookup("sophie.martin@medecin.mssante.fr") == p
    assert inner.calls == 1
    # expired and the directory is down: stale entry, flagged
    now[0] += 120
    inner.up = False
    stale = cache.lookup("rpps:10000005479")
    assert stale.stale and stale.family_name == "MARTIN"
    assert inner.calls == 2
    # a new process with the same cache file keeps working offline
    cache2 = CachedDirectory(inner, path=tmp_path / "cache.sqlite", ttl=60, clock=lambda: now[0])
    assert cache2.lookup("810000005479").stale
    found = cache2.search(name="mart")
    assert [x.idnps for x in found] == ["810000005479"] and found[0].stale
    # never seen and offline: the error shows
    with pytest.raises(DirectoryUnavailable):
        cache2.lookup("adeli:751004587")
    # back online: refreshed, not stale
    inner.up = True
    assert not cache2.lookup("rpps:10000005479").stale
    assert not cache2.lookup_many(["rpps:10000005479"])["idnps:810000005479"].stale


def test_cached_directory_forgets_removed_practitioners(alice: Identity) -> None:
    now = [0.0]
    mem = MemoryDirectory(people(alice))
    cache = CachedDirectory(mem, ttl=10, clock=lambda: now[0])
    cache.lookup("rpps:10000005479")
    mem.remove("rpps:10000005479")
    now[0] = 100
    with pytest.raises(PractitionerNotFound):
        cache.lookup("rpps:10000005479")
    inner = Flaky(mem)
    inner.up = False
    cache2 = CachedDirectory(inner, ttl=10, clock=lambda: now[0])
    with pytest.raises(DirectoryUnavailable):
        cache2.lookup("rpps:10000005479")


def test_chain_merges_sources(alice: Identity) -> None:
    annuaire = MemoryDirectory([p.model_copy(update={"keys": ()}) for p in people()])
    keys = MemoryDirectory(
        [Practitioner(idnps="810000005479", keys=(KeyEntry(public=alice.public),), source="keys")]
    )
    chain = ChainDirectory([keys, annuaire])
    p = chain.lookup("sophie.martin@medecin.mssante.fr")  # the key directory has no mailbox
    assert p.family_name == "MARTIN" and p.keys[0].public == alice.public
    assert p.mailboxes[0].address == "sophie.martin@medecin.mssante.fr"
    assert chain.lookup("rpps:10000005479") == p
    assert chain.search(name="martin")[0].idnps == "810000005479"
    with pytest.raises(PractitionerNotFound):
        chain.lookup("rpps:10000000019")
    down = Flaky(annuaire)
    down.up = False
    chain2 = ChainDirectory([keys, down])
    assert chain2.lookup("rpps:10000005479").keys  # one source answered
    with pytest.raises(DirectoryUnavailable):
        ChainDirectory([down]).lookup("rpps:10000005479")
    with pytest.raises(AmbiguousPractitioner):
        chain.lookup("cabinet@medecin.mssante.fr")
    with pytest.raises(ValueError):
        ChainDirectory([])


def test_hostile_directory_files(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(DirectoryError, match="not valid JSON"):
        FileDirectory(deep)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"format": "medsecure-directory", "x": "\xe9"}')
    with pytest.raises(DirectoryError, match="not valid JSON"):
        FileDirectory(latin)
