"""The relay's storage backends directly: group commit (batches, refusals inside a batch, a
failed transaction), per-mailbox totals, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time

import psycopg
import pytest
from relaykit import message_id

from medsecure import StorageError
from medsecure.relay.server.storage import SQLiteStorage
from medsecure.relay.server.storage._base import (
    INLINE_MAX,
    Conflict,
    NonceReplayed,
    QuotaExceeded,
    RateLimited,
)

BOX_A = "ms1" + "a" * 52
BOX_B = "ms1" + "b" * 52
SENDER = "ms1" + "s" * 52


def _upload(
    storage,
    body: bytes,
    *,
    mailbox=BOX_A,
    mid=None,
    sender=SENDER,
    quota=1 << 30,
    nonce=None,
    charge=None,
):
    pending = storage.begin_upload(len(body))
    pending.write(body)
    return storage.commit_upload(
        pending,
        mailbox=mailbox,
        message_id=mid or message_id(),
        sender=sender,
        digest=hashlib.sha256(body).digest(),
        size=len(body),
        now=int(time.time()),
        quota=quota,
        nonce=nonce,
        charge=charge,
    )


def _until(predicate, what: str) -> None:
    deadline = time.monotonic() + 60
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


def _in_parallel(jobs):
    """Run each job in its own thread; (results, errors) by job index."""
    results: dict[int, object] = {}
    errors: dict[int, BaseException] = {}

    def run(i, job):
        try:
            results[i] = job()
        except BaseException as exc:
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    return threads, results, errors


def _held_sqlite(storage):
    """Hold the writer: the first commit blocks in its transaction, the others queue behind."""
    return storage._lock


@pytest.fixture
def sqlite_storage(tmp_path):
    s = SQLiteStorage(tmp_path / "data")
    yield s
    s.close()


def test_concurrent_uploads_share_one_durable_transaction(tmp_path):
    storage = SQLiteStorage(tmp_path / "data")
    bodies = [bytes([i]) * 1000 for i in range(31)]
    with storage._lock:  # the first commit waits for the writer: the others queue meanwhile
        threads, results, errors = _in_parallel([lambda b=b: _upload(storage, b) for b in bodies])
        _until(lambda: len(storage.commits._queue) == 30, "30 uploads queued behind the first")
    for t in threads:
        t.join(60)
    assert errors == {} and all(new for _, new in results.values())
    assert (storage.commits.batches, storage.commits.items) == (2, 31)  # 1, then 30 at once
    storage.close()
    reopened = SQLiteStorage(tmp_path / "data")
    assert len(reopened.waiting(BOX_A, 100)) == 31
    assert reopened.usage(BOX_A) == 31 * 1000 and reopened.stats() == (31, 31 * 1000)
    reopened.close()


def _mixed_batch(storage, hold, release):
    """One batch holding a new upload, its identical replay, a conflicting reuse of its id, an
    upload over quota and another new one."""
    mid = message_id()
    body = b"first" * 100
    with hold:
        threads, _, errors = _in_parallel([lambda: _upload(storage, b"opener")])
        _until(lambda: storage.commits._leading, "a batch under way")
        jobs = [
            lambda: _upload(storage, body, mid=mid),
            lambda: _upload(storage, body, mid=mid),
            lambda: _upload(storage, body + b"!", mid=mid),
            lambda: _upload(storage, b"q" * 5000, mailbox=BOX_B, quota=4000),
            lambda: _upload(storage, b"fine" * 10, mailbox=BOX_B, quota=4000),
        ]
        more, got, failed = _in_parallel(jobs)
        _until(lambda: len(storage.commits._queue) == 5, "five uploads queued")
        release()
    for t in threads + more:
        t.join(60)
    assert errors == {}
    assert storage.commits.items - storage.commits.batches == 4  # the five shared one batch
    first, again = got[0], got[1]
    assert first[1] is True and again == (first[0], False)
    assert isinstance(failed[2], Conflict) and isinstance(failed[3], QuotaExceeded)
    assert got[4][1] is True and set(got) == {0, 1, 4}
    assert [m.message_id for m in storage.waiting(BOX_A, 10)].count(mid) == 1
    assert storage.usage(BOX_B) == 40


def test_refusals_inside_a_batch_touch_only_their_own_upload(sqlite_storage):
    _mixed_batch(sqlite_storage, sqlite_storage._lock, lambda: None)


def test_a_failed_transaction_fails_its_whole_batch_and_stores_nothing(sqlite_storage, tmp_path):
    storage = sqlite_storage
    real = storage._run_batch

    def failing(batch, execute):
        def then_fail(db):
            execute(db)
            raise sqlite3.OperationalError("disk I/O error")

        real(batch, then_fail)

    storage._run_batch = failing  # type: ignore[method-assign]
    storage.commits._run_batch = failing
    big = b"L" * (INLINE_MAX + 1)  # a body in a file: removed with its failed batch
    for body in (b"small", big):
        with pytest.raises(StorageError):
            _upload(storage, body)
    assert storage.waiting(BOX_A, 10) == [] and storage.usage(BOX_A) == 0
    leftovers = [
        p for p in (tmp_path / "data").rglob("*") if p.is_file() and p.parent.name != "data"
    ]
    assert leftovers == []


def test_totals_follow_acknowledgements_and_expiry_and_are_rebuilt_for_old_databases(tmp_path):
    storage = SQLiteStorage(tmp_path / "data")
    kept, acked, expired = message_id(), message_id(), message_id()
    for mid, size in ((kept, 100), (acked, 200), (expired, 300)):
        _upload(storage, b"x" * size, mid=mid)
    assert storage.acknowledge(BOX_A, acked, int(time.time()))
    storage._db.execute("UPDATE messages SET received_at = 0 WHERE message_id = ?", (expired,))
    assert storage.expire(1, int(time.time())) == 1
    assert storage.usage(BOX_A) == 100 and storage.stats() == (1, 100)
    # a database from before the totals: they are computed when it is opened
    storage._db.execute("DROP TABLE usage")
    storage.close()
    again = SQLiteStorage(tmp_path / "data")
    assert again.usage(BOX_A) == 100 and again.stats() == (1, 100)
    with pytest.raises(QuotaExceeded):
        _upload(again, b"y" * 50, quota=120)
    again.close()


# -- PostgreSQL -------------------------------------------------------------------------------


@pytest.fixture
def pg_storage(pg):
    from medsecure.relay.server.storage._postgres import PostgresStorage

    name = f"storage_{time.monotonic_ns()}"
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = pg.url.rsplit("/", 1)[0] + "/" + name
    storage = PostgresStorage(url)
    storage.url = url  # type: ignore[attr-defined]
    yield storage
    storage.close()


def test_postgres_batch_refusals_touch_only_their_own_upload(pg_storage):
    from medsecure.relay.server.storage._postgres import _lock_key

    # hold the opener's mailbox lock from outside: its batch waits, the others queue behind it
    holder = psycopg.connect(pg_storage.url)  # type: ignore[attr-defined]
    holder.execute("BEGIN")
    holder.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(BOX_A),))

    class Hold:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    try:
        _mixed_batch(pg_storage, Hold(), lambda: holder.execute("COMMIT"))
    finally:
        holder.close()
    # the totals match the envelopes
    with psycopg.connect(pg_storage.url) as conn:  # type: ignore[attr-defined]
        rows = conn.execute(
            "SELECT mailbox, SUM(size), COUNT(*) FROM relay_messages WHERE state = 'waiting'"
            " GROUP BY mailbox ORDER BY mailbox"
        ).fetchall()
        totals = conn.execute(
            "SELECT mailbox, bytes, count FROM relay_mailbox_usage ORDER BY mailbox"
        ).fetchall()
    assert [tuple(int(x) if not isinstance(x, str) else x for x in r) for r in rows] == [
        tuple(r) for r in totals
    ]


def test_postgres_batch_reads_ids_and_totals_only_once_it_holds_the_mailbox_lock(pg_storage):
    """The look-up a batch's decisions rest on (ids, totals) must see every transaction that
    held the mailbox's lock before the batch took it: another instance that records a message
    and fills the mailbox while this batch waits for the lock decides this batch's answers (a
    conflict, the quota), whichever way the batch's statements are sent."""
    from medsecure.relay.server.storage._postgres import _lock_key

    mid = message_id()
    holder = psycopg.connect(pg_storage.url)  # type: ignore[attr-defined]
    try:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(BOX_A),))
        # what another instance's batch writes under the lock: a message and the mailbox's total
        holder.execute(
            "INSERT INTO relay_messages (mailbox, message_id, sender, size, digest, received_at,"
            " state, state_at) VALUES (%s, %s, %s, 3990, %s, 0, 'waiting', 0)",
            (BOX_A, mid, "ms1" + "o" * 52, b"\0" * 32),
        )
        holder.execute("INSERT INTO relay_mailbox_usage VALUES (%s, 3990, 1)", (BOX_A,))
        threads, got, failed = _in_parallel(
            [
                lambda: _upload(pg_storage, b"mine", mid=mid, quota=4000),
                lambda: _upload(pg_storage, b"x" * 20, quota=4000),
            ]
        )

        def waiting_for_the_lock() -> bool:
            with psycopg.connect(pg_storage.url) as conn:  # type: ignore[attr-defined]
                row = conn.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                ).fetchone()
            return row is not None and row[0] > 0

        _until(waiting_for_the_lock, "a batch waiting for the mailbox's lock")
        holder.commit()
    finally:
        holder.close()
    for t in threads:
        t.join(60)
    assert got == {}
    assert isinstance(failed[0], Conflict) and isinstance(failed[1], QuotaExceeded)
    assert pg_storage.usage(BOX_A) == 3990
    assert [m.sender for m in pg_storage.waiting(BOX_A, 10)] == ["ms1" + "o" * 52]


def test_postgres_expiry_and_acknowledgement_retire_many_and_keep_the_totals(pg_storage):
    """One sweep retires several envelopes of several mailboxes at once (in-row bodies and
    large objects): each is marked, its object unlinked, and each mailbox's total reduced by
    what left it, no more."""
    big = b"L" * (INLINE_MAX + 1)
    mids = {}
    for box, sizes in ((BOX_A, (100, 200, len(big))), (BOX_B, (300, len(big), 50))):
        for size in sizes:
            mid = message_id()
            _upload(pg_storage, big if size == len(big) else b"x" * size, mailbox=box, mid=mid)
            mids[(box, size)] = mid
    with psycopg.connect(pg_storage.url, autocommit=True) as conn:  # type: ignore[attr-defined]
        objects = [
            r[0] for r in conn.execute("SELECT object FROM relay_messages WHERE object IS NOT NULL")
        ]
        assert len(objects) == 2
        assert pg_storage.acknowledge(BOX_A, mids[(BOX_A, 100)], int(time.time()))
        assert not pg_storage.acknowledge(BOX_A, mids[(BOX_A, 100)], int(time.time()))
        # all but BOX_B's 50 bytes are old
        conn.execute(
            "UPDATE relay_messages SET received_at = 0 WHERE message_id <> %s",
            (mids[(BOX_B, 50)],),
        )
        assert pg_storage.expire(1, int(time.time())) == 4
        assert pg_storage.expire(1, int(time.time())) == 0
        left = conn.execute(
            "SELECT count(*) FROM pg_largeobject_metadata WHERE oid = ANY(%s::bigint[]::oid[])",
            (objects,),
        ).fetchone()
    assert left == (0,)
    assert pg_storage.usage(BOX_A) == 0 and pg_storage.usage(BOX_B) == 50
    assert pg_storage.stats() == (1, 50)
    states = {m.message_id: m.state for m in pg_storage.uploads(SENDER, list(mids.values()))}
    assert states == {
        mid: ("waiting" if size == 50 else "collected" if size == 100 else "expired")
        for (_, size), mid in mids.items()
    }


def test_postgres_nonces_are_single_use_even_within_one_batch(pg_storage):
    jobs = [lambda: pg_storage.remember_nonce(SENDER, "n" * 22, 2**40) for _ in range(8)]
    threads, results, errors = _in_parallel(jobs)
    for t in threads:
        t.join(60)
    assert errors == {} and sorted(results.values()) == [False] * 7 + [True]
    assert pg_storage.remember_nonce(SENDER, "m" * 22, 2**40) is True


# -- key claims -------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def any_storage(request, tmp_path):
    if request.param == "sqlite":
        storage = SQLiteStorage(tmp_path / "data")
        yield storage
        storage.close()
    else:
        yield request.getfixturevalue("pg_storage")


def _waiting(storage, mailbox=BOX_A) -> list[str]:
    return sorted(m.message_id for m in storage.waiting(mailbox, 1000))


def test_a_nonce_given_with_an_upload_is_single_use_on_every_backend(any_storage):
    """commit_upload(nonce=...): recorded with the envelope on PostgreSQL (one transaction),
    first on its own elsewhere; either way shared with remember_nonce, single use, and a
    replay keeps nothing."""
    s = any_storage
    later = int(time.time()) + 120
    first = message_id()
    _upload(s, b"a" * 100, mid=first, nonce=(SENDER, "n1" * 11, later))
    # the same nonce again (another id, or the same upload byte for byte): refused, nothing kept
    with pytest.raises(NonceReplayed):
        _upload(s, b"b" * 100, nonce=(SENDER, "n1" * 11, later))
    with pytest.raises(NonceReplayed):
        _upload(s, b"a" * 100, mid=first, nonce=(SENDER, "n1" * 11, later))
    # one table for both ways of recording a nonce
    assert s.remember_nonce(SENDER, "n1" * 11, later) is False
    assert s.remember_nonce(SENDER, "n2" * 11, later) is True
    with pytest.raises(NonceReplayed):
        _upload(s, b"c" * 100, nonce=(SENDER, "n2" * 11, later))
    # a nonce is the caller's: the same value under another key is another nonce
    _upload(s, b"d" * 100, sender="ms1" + "t" * 52, nonce=("ms1" + "t" * 52, "n1" * 11, later))
    # a refused upload's nonce is spent all the same
    with pytest.raises(Conflict):
        _upload(s, b"e" * 100, mid=first, nonce=(SENDER, "n3" * 11, later))
    assert s.remember_nonce(SENDER, "n3" * 11, later) is False
    # eight uploads carrying one nonce at once: one recorded
    mids = [message_id() for _ in range(8)]
    jobs = [
        (lambda mid=mid: _upload(s, b"f" * 100, mid=mid, nonce=(SENDER, "n4" * 11, later)))
        for mid in mids
    ]
    threads, results, errors = _in_parallel(jobs)
    for t in threads:
        t.join(60)
    assert len(results) == 1 and all(isinstance(e, NonceReplayed) for e in errors.values())
    assert len(errors) == 7
    kept = [m for m in mids if m in _waiting(s)]
    assert len(kept) == 1
    assert len(_waiting(s)) == 3  # first, the other key's, and the one of the eight


def test_an_uploads_rate_is_charged_only_once_its_nonce_is_fresh(any_storage):
    """commit_upload(charge=...): called once the nonce is known fresh, never for a replay; a
    charge that finds the rate spent refuses the upload (RateLimited), keeps nothing and
    spends the nonce."""
    s = any_storage
    later = int(time.time()) + 120
    charged: list[int] = []

    def charge(wait: float):
        def take() -> float:
            charged.append(1)
            return wait

        return take

    _upload(s, b"a" * 100, nonce=(SENDER, "r1" * 11, later), charge=charge(0.0))
    assert charged == [1]
    with pytest.raises(NonceReplayed):
        _upload(s, b"a" * 100, nonce=(SENDER, "r1" * 11, later), charge=charge(0.0))
    assert charged == [1]  # the replay took no token
    with pytest.raises(RateLimited) as refused:
        _upload(s, b"b" * 100, nonce=(SENDER, "r2" * 11, later), charge=charge(2.5))
    assert refused.value.wait == 2.5 and charged == [1, 1]
    assert len(_waiting(s)) == 1
    assert s.remember_nonce(SENDER, "r2" * 11, later) is False  # spent all the same


def test_postgres_a_replayed_nonce_in_a_batch_touches_only_its_own_upload(pg_storage):
    """Uploads queued behind a held mailbox lock share one batch: the nonce replays in it are
    refused, the others recorded."""
    from medsecure.relay.server.storage._postgres import _lock_key

    later = int(time.time()) + 120
    assert pg_storage.remember_nonce(SENDER, "old" * 7 + "x", later)
    holder = psycopg.connect(pg_storage.url)  # type: ignore[attr-defined]
    holder.execute("BEGIN")
    holder.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(BOX_A),))
    try:
        # the first upload takes the lead and waits for the lock; the others queue behind it
        opener = _in_parallel([lambda: _upload(pg_storage, b"0" * 10, mailbox=BOX_A)])
        _until(lambda: pg_storage.commits._leading, "a batch holding the lead")
        nonces = ["old" * 7 + "x", "new" * 7 + "x", "new" * 7 + "x", "own" * 7 + "x"]
        jobs = [
            (lambda n=n: _upload(pg_storage, n.encode(), mailbox=BOX_B, nonce=(SENDER, n, later)))
            for n in nonces
        ]
        threads, results, errors = _in_parallel(jobs)
        _until(lambda: len(pg_storage.commits._queue) == 4, "four uploads queued")
        holder.execute("COMMIT")
        for t in [*opener[0], *threads]:
            t.join(60)
    finally:
        holder.close()
    assert opener[2] == {}
    assert sorted(type(e).__name__ for e in errors.values()) == ["NonceReplayed"] * 2
    assert 0 in errors  # the nonce recorded before
    assert sorted(results) in ([1, 3], [2, 3])  # one of the two carrying the same nonce
    assert len(_waiting(pg_storage, BOX_B)) == 2


def test_postgres_two_instances_replaying_nonces_in_opposite_orders_do_not_deadlock(pg_storage):
    """Two instances' batches carry the same two nonces, arrived in opposite orders, while a
    third transaction holds one of them: each batch inserts them in one global order, so one
    waits for the other instead of both waiting for each other (a deadlock would fail both
    batches, other senders' uploads with them)."""
    from medsecure.relay.server.storage._postgres import PostgresStorage, _lock_key

    box_c = "ms1" + "c" * 52
    later = int(time.time()) + 120
    first, second = (
        "b" * 22,
        "a" * 22,
    )  # arrive in this order at one instance, reversed at the other
    other = PostgresStorage(pg_storage.url)  # type: ignore[attr-defined]
    lock = psycopg.connect(pg_storage.url)  # type: ignore[attr-defined]
    nonce = psycopg.connect(pg_storage.url)  # type: ignore[attr-defined]

    def waits(kind: str) -> int:
        row = lock.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = %s AND NOT granted", (kind,)
        ).fetchone()
        return int(row[0]) if row else 0

    lock.execute("BEGIN")
    lock.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(BOX_A),))
    nonce.execute("BEGIN")
    nonce.execute("INSERT INTO relay_nonces VALUES (%s, %s, %s)", (SENDER, first, later))
    threads = []
    outcome: dict[tuple[int, str], object] = {}
    try:
        for s, box, order in (
            (pg_storage, BOX_B, (first, second)),
            (other, box_c, (second, first)),
        ):
            # an upload takes the lead and waits for BOX_A's lock; two queue behind it, in order
            threads += _in_parallel([lambda s=s: _upload(s, b"0" * 10, mailbox=BOX_A)])[0]
            _until(lambda s=s: s.commits._leading, "a batch holding the lead")
            for queued, n in enumerate(order, 1):

                def job(s=s, box=box, n=n):
                    try:
                        outcome[(id(s), n)] = _upload(
                            s, n.encode(), mailbox=box, nonce=(SENDER, n, later)
                        )[1]
                    except Exception as exc:
                        outcome[(id(s), n)] = type(exc).__name__

                threads += _in_parallel([job])[0]
                _until(lambda s=s, k=queued: len(s.commits._queue) == k, "queued")
        lock.execute("COMMIT")  # the openers commit; then each instance's batch of two
        _until(lambda: waits("transactionid") == 2, "both batches waiting on a nonce")
        nonce.execute("ROLLBACK")
        for t in threads:
            t.join(60)
    finally:
        lock.close()
        nonce.close()
        other.close()
    assert sorted(map(str, outcome.values())) == ["NonceReplayed", "NonceReplayed", "True", "True"]
    assert len(_waiting(pg_storage, BOX_B)) + len(_waiting(pg_storage, box_c)) == 2


FP = ["ms1" + c * 52 for c in "abcdef"]


def test_claims_are_listed_in_the_order_first_seen_a_page_at_a_time(any_storage):
    s = any_storage
    # published (the publisher's word) says nothing about the order: first seen does
    for i, fp in enumerate(FP[:5]):
        s.publish_key(fp, fp.encode(), ["810001"], published=10**12 - i, seen=1000 + i)
    # a republication (a newer bundle) keeps its claims' places and may add or drop claims
    s.publish_key(FP[0], b"newer", ["810001", "810002"], published=10**12 + 1, seen=5000)
    s.publish_key(FP[4], b"dropped", ["810002"], published=10**12 + 1, seen=5000)
    # an older bundle does not replace a newer one
    s.publish_key(FP[1], b"older", [], published=1, seen=6000)
    pages, after = [], None
    while True:
        page = s.keys_for("810001", after, 2)
        if not page:
            break
        pages.append(page)
        after = page[-1][:2]
    assert [[fp for _, fp, _ in page] for page in pages] == [FP[0:2], FP[2:4]]
    assert pages[0][0] == (1000, FP[0], b"newer") and pages[0][1][2] == FP[1].encode()
    assert [(seen, fp) for seen, fp, _ in s.keys_for("810002", None, 10)] == [
        (5000, FP[0]),
        (5000, FP[4]),
    ]


def test_sqlite_claims_from_before_first_seen_come_first(tmp_path):
    storage = SQLiteStorage(tmp_path / "data")
    storage.publish_key(FP[0], b"a", ["810001"], published=1, seen=1000)
    # a database from before the column: the claims it holds count as seen at time 0
    db = storage._db
    db.executescript(
        "DROP INDEX key_identifiers_seen;"
        " CREATE TABLE old (identifier TEXT NOT NULL, fingerprint TEXT NOT NULL,"
        " PRIMARY KEY (identifier, fingerprint));"
        " INSERT INTO old SELECT identifier, fingerprint FROM key_identifiers;"
        " DROP TABLE key_identifiers; ALTER TABLE old RENAME TO key_identifiers;"
    )
    storage.close()
    again = SQLiteStorage(tmp_path / "data")
    again.publish_key(FP[1], b"b", ["810001"], published=1, seen=10)
    assert [(seen, fp) for seen, fp, _ in again.keys_for("810001", None, 10)] == [
        (0, FP[0]),
        (10, FP[1]),
    ]
    again.close()


# -- PostgreSQL large objects -----------------------------------------------------------------


def _objects(url: str) -> tuple[int, int]:
    """(large objects, registered ones: bodies of uploads not recorded)."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM pg_largeobject_metadata),"
            " (SELECT count(*) FROM relay_body_objects)"
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])


def test_postgres_large_bodies_are_registered_until_recorded_and_removed_when_refused(pg_storage):
    url = pg_storage.url  # type: ignore[attr-defined]
    body = b"L" * (INLINE_MAX + 1)
    mid = message_id()
    assert _objects(url) == (0, 0)
    # while it arrives, a body is a registered object, and no connection is held for it
    pending = pg_storage.begin_upload(len(body))
    pending.write(body[:1000])
    assert _objects(url) == (1, 1)
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'"
        ).fetchone()
        assert row is not None and row[0] == 0
    pending.write(body[1000:])
    record, new = pg_storage.commit_upload(
        pending,
        mailbox=BOX_A,
        message_id=mid,
        sender=SENDER,
        digest=hashlib.sha256(body).digest(),
        size=len(body),
        now=int(time.time()),
        quota=1 << 30,
    )
    assert new and _objects(url) == (1, 0)
    reader = pg_storage.open_body(BOX_A, mid)
    assert reader.read(0, len(body)) == body
    # a replay, a conflict, a refusal by quota, an abandoned upload: their objects go
    assert _upload(pg_storage, body, mid=mid) == (record, False)
    with pytest.raises(Conflict):
        _upload(pg_storage, b"M" * len(body), mid=mid)
    with pytest.raises(QuotaExceeded):
        _upload(pg_storage, body, quota=len(body) + 1)
    abandoned = pg_storage.begin_upload(len(body))
    abandoned.write(b"x")
    abandoned.abort()
    assert _objects(url) == (1, 0)
    # an upload whose instance died is swept once it is older than a day, not before
    orphan = pg_storage.begin_upload(len(body))
    orphan.write(b"x")
    orphan.oid = None  # as if its instance died: nobody aborts it
    assert pg_storage.sweep_objects(int(time.time())) == 0
    assert pg_storage.sweep_objects(int(time.time()) + 2 * 86400) == 1
    assert _objects(url) == (1, 0)
    assert pg_storage.acknowledge(BOX_A, mid, int(time.time()))
    assert _objects(url) == (0, 0)


def test_the_group_commit_hands_the_lead_on_until_every_submitter_is_answered():
    """Many submitters, small batches: leads pass from submitter to submitter, each submitter is
    woken exactly once (to lead or with its result), and every one gets its own result."""
    from medsecure.relay.server.storage._base import GroupCommit

    held = threading.Lock()

    def run_batch(batch, execute):
        with held:  # one transaction at a time, as a database's writer lock
            execute(None)

    commits = GroupCommit(run_batch, max_batch=3)
    threads, results, errors = _in_parallel(
        [lambda i=i: commits.submit(lambda conn, i=i: i * i) for i in range(60)]
    )
    for t in threads:
        t.join(60)
    assert errors == {} and results == {i: i * i for i in range(60)}
    assert commits.items == 60 and commits.batches >= 20
    assert not commits._leading and commits._queue == []


def test_the_group_commit_gathers_only_under_load():
    """With ``gather``, a leader waits once for more items only when the previous batch held
    more than one (under load) and fewer than ``gather_until`` are queued; never under light
    load. The wait is observed through the primitive's sleep, not timed."""
    from medsecure.relay.server.storage._base import GroupCommit

    gate = threading.Event()
    started = threading.Event()
    held = {"first": True}

    def run_batch(batch, execute):
        if held["first"]:
            held["first"] = False
            started.set()
            gate.wait(60)  # the first batch waits: the others queue behind it
        execute(None)

    commits = GroupCommit(run_batch, gather=0.5, gather_until=4)
    slept: list[float] = []
    commits._sleep = slept.append  # record instead of sleeping

    # light load: one at a time, batches of one, never a wait
    held["first"] = False
    for i in range(5):
        assert commits.submit(lambda conn, i=i: i) == i
    assert slept == [] and commits.batches == 5

    # under load: a batch of three queues behind a held one; the leader after it gathers once
    held["first"] = True
    first = _in_parallel([lambda: commits.submit(lambda conn: "first")])
    started.wait(60)
    queued = _in_parallel([lambda i=i: commits.submit(lambda conn, i=i: i) for i in range(3)])
    _until(lambda: len(commits._queue) == 3, "three queued behind the held batch")
    gate.set()
    for t in [*first[0], *queued[0]]:
        t.join(60)
    assert first[1] == {0: "first"} and queued[1] == {0: 0, 1: 1, 2: 2}
    assert slept == []  # the batch after a batch of one does not wait
    assert commits._last == 3
    assert commits.submit(lambda conn: "next") == "next"
    assert slept == [0.5]  # after a batch of three, the next leader gathered once
    assert commits.submit(lambda conn: "alone") == "alone"
    assert slept == [0.5]  # the batch before held one item: no wait
    assert not commits._leading and commits._queue == []


@pytest.mark.parametrize(
    ("gather", "previous", "queued", "until", "waits"),
    [
        (0.0, 9, 1, 8, False),  # off
        (0.003, 0, 1, 8, False),  # first batch
        (0.003, 1, 1, 8, False),  # light load: the batch before held one item
        (0.003, 2, 1, 8, True),  # under load, few queued
        (0.003, 5, 7, 8, True),
        (0.003, 5, 8, 8, False),  # enough queued already
        (0.003, 5, 30, 8, False),
    ],
)
def test_when_a_group_commit_leader_gathers(gather, previous, queued, until, waits):
    from medsecure.relay.server.storage._base import should_gather

    assert should_gather(gather, previous, queued, until) is waits
