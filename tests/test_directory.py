"""Local directories, the cache and the chain (the FHIR backend has its own file)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from clientkit import client, entry, party

from medsecure import (
    AmbiguousPractitioner,
    DirectoryError,
    DirectoryUnavailable,
    Document,
    Identity,
    PractitionerNotFound,
)
from medsecure.directory import (
    CachedDirectory,
    ChainDirectory,
    Directory,
    FileDirectory,
    MemoryDirectory,
)
from medsecure.identifiers import parse, parse_address
from medsecure.models import Code, KeyEntry, Mailbox, OrganizationRef, Practitioner


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
        directory.lookup("rpps:10000000017")
    with pytest.raises(AmbiguousPractitioner):
        directory.lookup("cabinet@medecin.mssante.fr")
    with pytest.raises(ValueError):
        directory.lookup("finess:540000010")
    ins = "1800175123456"  # a patient's mailbox: its local part is the INS, never shown
    with pytest.raises(ValueError, match="patient") as refused:
        directory.lookup(f"{ins}{97 - int(ins) % 97:02d}@patient.mssante.fr")
    assert ins not in str(refused.value)
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
    # fresh: answered from memory under the reference asked and the IDNPS, not under the
    # addresses the entry lists (only the directory says who an address belongs to)
    assert cache.lookup("810000005479") == p
    assert inner.calls == 1
    assert cache.lookup("sophie.martin@medecin.mssante.fr") == p
    assert inner.calls == 2
    assert cache.lookup("Sophie.Martin@medecin.mssante.fr") == p  # now asked: kept
    assert inner.calls == 2
    # expired and the directory is down: stale entry, flagged
    now[0] += 120
    inner.up = False
    stale = cache.lookup("rpps:10000005479")
    assert stale.stale and stale.family_name == "MARTIN"
    assert inner.calls == 3
    assert cache.lookup("sophie.martin@medecin.mssante.fr").stale
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
        chain.lookup("rpps:10000000017")
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


# -- an address belongs to whom the directory says, never to an entry that lists it ---------------

BOB = "bob@medecin.mssante.fr"


def bob_and_mallory() -> tuple[Practitioner, Practitioner]:
    bob = Practitioner(idnps="810000000017", family_name="BOB", mailboxes=(Mailbox(address=BOB),))
    mallory = Practitioner(
        idnps="810000000025",
        family_name="MALLORY",
        mailboxes=(Mailbox(address="mallory@medecin.mssante.fr"), Mailbox(address=BOB)),
    )
    return bob, mallory


def test_an_entry_listing_bobs_address_does_not_take_it_over_in_the_cache(
    tmp_path: Path,
) -> None:
    bob, mallory = bob_and_mallory()
    inner = Flaky(MemoryDirectory([bob]))
    cache = CachedDirectory(inner, path=tmp_path / "cache.sqlite", ttl=3600)
    assert cache.lookup(BOB).idnps == bob.idnps  # Bob's alone, for now: kept
    # Mallory's entry now also lists Bob's mailbox; the cache learns it by her IDNPS
    inner.inner = MemoryDirectory([bob, mallory])
    with pytest.raises(AmbiguousPractitioner):
        inner.inner.lookup(BOB)  # what the uncached directory says
    assert cache.lookup("rpps:10000000025").family_name == "MALLORY"
    with pytest.raises(AmbiguousPractitioner):  # not Mallory from the cache, nor a stale Bob
        cache.lookup(BOB)
    with pytest.raises(AmbiguousPractitioner):
        cache.lookup_many([BOB])
    inner.up = False  # offline: the cache cannot tell, and says so
    with pytest.raises(DirectoryUnavailable):
        cache.lookup(BOB)
    # the same in a cache that only ever saw Mallory
    cache2 = CachedDirectory(Flaky(MemoryDirectory([bob, mallory])), ttl=3600)
    cache2.lookup("rpps:10000000025")
    with pytest.raises(AmbiguousPractitioner):
        cache2.lookup(BOB)
    # and in a new process on the first cache's file
    cache3 = CachedDirectory(inner, path=tmp_path / "cache.sqlite", ttl=3600)
    with pytest.raises(DirectoryUnavailable):
        cache3.lookup(BOB)
    assert cache3.lookup("rpps:10000000025").family_name == "MALLORY"  # entries still served


def test_send_to_an_address_never_seals_to_another_entry_listing_it(tmp_path: Path) -> None:
    authority = Identity.generate()
    alice = party(tmp_path, "alice", "810000005479")
    bob = party(tmp_path, "bob", "810000000017")
    mallory = party(tmp_path, "mallory", "810000000025")
    mallory_entry = entry(authority, mallory)
    mallory_entry = mallory_entry.model_copy(
        update={"mailboxes": (*mallory_entry.mailboxes, Mailbox(address=BOB))}
    )
    cache = CachedDirectory(
        MemoryDirectory([entry(authority, alice), entry(authority, bob), mallory_entry])
    )
    cache.lookup(mallory.ref)  # say Alice once received a message from Mallory
    sender = client(alice, cache, authority)
    with pytest.raises(AmbiguousPractitioner):
        sender.send(Document(content=b"for Bob only", filename="letter.pdf"), to=BOB)
    assert not [p for p in mallory.box.rglob("*") if p.is_file()]
    sender.close()


def test_an_address_the_directory_now_calls_ambiguous_is_forgotten(tmp_path: Path) -> None:
    bob, mallory = bob_and_mallory()
    now = [0.0]
    inner = Flaky(MemoryDirectory([bob]))
    cache = CachedDirectory(inner, path=tmp_path / "c.sqlite", ttl=60, clock=lambda: now[0])
    assert cache.lookup(BOB).idnps == bob.idnps
    inner.inner = MemoryDirectory([bob, mallory])
    now[0] = 120  # expired: asked again, and the directory says ambiguous
    with pytest.raises(AmbiguousPractitioner):
        cache.lookup(BOB)
    inner.up = False  # offline afterwards: no stale Bob either
    with pytest.raises(DirectoryUnavailable):
        cache.lookup(BOB)
    assert cache.lookup("rpps:10000000017").stale  # Bob himself, by IDNPS, still is


def test_a_refreshed_entry_no_longer_listing_the_address_is_not_its_answer() -> None:
    bob, _ = bob_and_mallory()
    moved = bob.model_copy(update={"mailboxes": (Mailbox(address="bob2@medecin.mssante.fr"),)})
    inner = Flaky(MemoryDirectory([bob]))
    cache = CachedDirectory(inner, ttl=3600)
    assert cache.lookup(BOB).idnps == bob.idnps
    inner.inner = MemoryDirectory([moved])
    assert cache.search(name="bob") == [moved]  # refreshes Bob's entry, by IDNPS
    with pytest.raises(PractitionerNotFound):  # within the TTL, yet asked again
        cache.lookup(BOB)


def test_old_cache_files_lose_their_address_rows(tmp_path: Path) -> None:
    bob, mallory = bob_and_mallory()
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE cache (key TEXT PRIMARY KEY, idnps TEXT NOT NULL,"
        " entry TEXT NOT NULL, fetched_at REAL NOT NULL)"
    )
    rows = [(k, mallory.idnps, mallory.model_dump_json(), 1e12) for k in mallory.refs()]
    db.executemany("INSERT INTO cache VALUES (?, ?, ?, ?)", rows)
    db.commit()
    db.close()
    inner = Flaky(MemoryDirectory([bob, mallory]))
    inner.up = False
    cache = CachedDirectory(inner, path=path, ttl=3600, clock=lambda: 1e12)
    assert cache.lookup("rpps:10000000025").family_name == "MALLORY"  # kept, by IDNPS
    with pytest.raises(DirectoryUnavailable):  # the version 0 row under mss:bob is gone
        cache.lookup(BOB)


def test_chain_resolves_an_address_only_when_every_source_answers() -> None:
    bob, mallory = bob_and_mallory()
    annuaire = MemoryDirectory([bob])
    practice = Flaky(MemoryDirectory([mallory]))  # a second source lists Bob's address too
    chain = ChainDirectory([annuaire, practice])
    with pytest.raises(AmbiguousPractitioner):
        chain.lookup(BOB)
    practice.up = False  # it cannot say whether someone else claims the address
    with pytest.raises(DirectoryUnavailable):
        chain.lookup(BOB)
    with pytest.raises(DirectoryUnavailable):
        chain.lookup_many([BOB])
    assert chain.lookup("rpps:10000000017").idnps == bob.idnps  # by IDNPS: merged as before
    # merging by IDNPS never brings an address lookup to the entry of another practitioner
    practice.up = True
    assert chain.lookup("mallory@medecin.mssante.fr").idnps == mallory.idnps


def test_merge_records_which_keys_each_endpoint_came_with() -> None:
    from medsecure import Identity
    from medsecure.directory import merge_practitioners
    from medsecure.models import Endpoint, KeyEntry, Practitioner

    bob, mallory = Identity.generate().public, Identity.generate().public
    shared = Endpoint(kind="drop", path="/srv/shared")
    mine = Practitioner(
        idnps="810000005479",
        keys=(KeyEntry(public=bob),),
        endpoints=(Endpoint(kind="drop", path="/srv/bob"), shared),
    )
    theirs = Practitioner(
        idnps="810000005479",
        keys=(KeyEntry(public=mallory),),
        endpoints=(Endpoint(kind="drop", path="/srv/mallory"), shared),
    )
    keyless = Practitioner(idnps="810000005479", endpoints=(Endpoint(kind="drop", path="/tmp/x"),))
    merged = merge_practitioners([theirs, mine, keyless])
    assert [(e.path, e.keys) for e in merged.endpoints] == [
        ("/srv/mallory", (mallory.fingerprint,)),
        ("/srv/shared", (mallory.fingerprint, bob.fingerprint)),  # one place, both keys
        ("/srv/bob", (bob.fingerprint,)),
        ("/tmp/x", ()),  # came with no key
    ]
    # the same keys everywhere: nothing to record, nothing changes
    assert merge_practitioners([mine, mine]).endpoints == mine.endpoints
