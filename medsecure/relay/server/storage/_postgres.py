"""PostgreSQL storage (extra ``postgres``): several stateless relay instances share one database.

Choices (docs/relay.md has the measurements and the reasoning):

* **Small bodies** (up to ``INLINE_MAX``, 64 KiB) live in their metadata row (``bytea``): they
  are read into memory (bounded) and committed with the row.
* **Commits are grouped**: the small uploads that arrive while one transaction is being
  committed share the next one (one ``COMMIT``, one WAL flush, with ``synchronous_commit`` on:
  each upload is answered only once the transaction holding it is durable). Under load a
  batch's leader waits ``GATHER`` (3 ms) once for more uploads before it commits: a
  transaction costs PostgreSQL's processes CPU of its own, so fewer, larger ones leave more of
  the cores to the uploads. Under light load (batches of one) nothing waits.
* **Large bodies** go, by choice of the operator, to **large objects** (the default: an instance
  needs nothing but the database URL) or to a **shared folder** (``bodies=DIR``, the same on
  every instance: a file written to ``DIR/tmp``, fsynced, renamed into ``DIR/objects`` and the
  folder fsynced, and only then recorded). Either way an upload holds **no connection while it
  waits for its sender**: a large object is written with ``lo_put`` in 1 MiB pieces, each a
  short autocommit statement on a connection taken for it alone (a stalled sender, or many,
  cannot take the pool from everyone else); a file needs no connection at all. A body, object
  or file, is registered (``relay_body_objects``, ``relay_body_files``) before its first byte
  is written and unregistered in the transaction that records its message; a failed upload
  removes its own; an acknowledgement or an expiry unlinks the object, or registers the file
  for deletion, in the transaction that retires its message. Every instance's sweep removes
  registered bodies older than a day (uploads whose instance died) and files due for deletion,
  claiming the rows with ``FOR UPDATE SKIP LOCKED``: nothing partial is ever listed and nothing
  is left behind, whichever instance dies when.
* Large-object downloads read with ``lo_get`` by range, in short autocommit statements (binary
  results), so a slow reader holds no transaction open.
* **Work queues** (the retention sweep, the body sweeps) claim rows with ``FOR UPDATE SKIP
  LOCKED``, so several instances sweep at once without waiting on each other. No state lives in
  an instance: rate limits are per instance (documented), nonces are in the database: a small
  upload's in the transaction of its batch (``nonces_in_commits``), the others with
  ``synchronous_commit`` off, on a small pool of their own, grouped (one statement for the
  nonces of the requests that arrive while the previous insert is on its way).
* A group-commit batch, an acknowledgement or a sweep's retirement is a constant number of
  statements in two round trips (psycopg's pipeline mode), however many envelopes it holds.
* Concurrent uploads to one mailbox serialise on a transaction-scoped advisory lock for the quota
  check (a batch takes the locks of its mailboxes in one global order, so batches of several
  instances cannot deadlock); the primary key (mailbox, message id) makes a message unique
  whatever the races.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from ...._errors import StorageError
from ._base import (
    COLLECTED,
    EXPIRED,
    WAITING,
    BodyReader,
    Conflict,
    FileUpload,
    GroupCommit,
    NewMessage,
    NonceReplayed,
    QuotaExceeded,
    RateLimited,
    SqlStorage,
    StoredMessage,
    Upload,
    admit,
    open_file_body,
    prepare_body_folders,
    sql_statements,
    stored_message,
)

__all__ = ["PostgresStorage"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS relay_messages (
    mailbox text NOT NULL, message_id text NOT NULL, sender text NOT NULL,
    size bigint NOT NULL, digest bytea NOT NULL, received_at bigint NOT NULL,
    state text NOT NULL, state_at bigint NOT NULL, object oid,
    PRIMARY KEY (mailbox, message_id)
);
CREATE INDEX IF NOT EXISTS relay_messages_box ON relay_messages (mailbox, state, received_at);
CREATE INDEX IF NOT EXISTS relay_messages_sender ON relay_messages (sender, message_id);
CREATE INDEX IF NOT EXISTS relay_messages_state ON relay_messages (state, received_at);
CREATE TABLE IF NOT EXISTS relay_keys (
    fingerprint text PRIMARY KEY, bundle bytea NOT NULL, published bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS relay_key_identifiers (
    identifier text NOT NULL, fingerprint text NOT NULL, PRIMARY KEY (identifier, fingerprint)
);
CREATE TABLE IF NOT EXISTS relay_nonces (
    keyid text NOT NULL, nonce text NOT NULL, expires bigint NOT NULL,
    PRIMARY KEY (keyid, nonce)
);
ALTER TABLE relay_messages ADD COLUMN IF NOT EXISTS body bytea;
ALTER TABLE relay_messages ADD COLUMN IF NOT EXISTS file text;
CREATE TABLE IF NOT EXISTS relay_body_files (
    name text PRIMARY KEY, since bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS relay_body_objects (
    object oid PRIMARY KEY, since bigint NOT NULL
);
ALTER TABLE relay_key_identifiers ADD COLUMN IF NOT EXISTS first_seen bigint NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS relay_key_identifiers_seen
    ON relay_key_identifiers (identifier, first_seen, fingerprint);
"""
#: A registered body file older than this is an upload that died (or a very slow one, which
#: then fails at its commit and is retried by its client).
ORPHAN_AGE = 86400
#: Under load, a batch leader waits this long once for more uploads before it commits (see
#: GroupCommit): each PostgreSQL transaction costs the database's processes ~1.5 ms of CPU
#: whatever it holds (docs/performance.md). Measured on 2 cores with 16 clients: batches of
#: 5 -> larger, PostgreSQL's CPU a message 0.43 -> 0.31 ms, throughput +14%.
GATHER = 0.003
_SCHEMA_LOCK = 0x6D65647365637572  # "medsecur": one instance creates the schema at a time

# The statements of a group-commit batch (constant strings: psycopg prepares each one on a
# connection after a few uses, so the server plans them once).
_LOCK_MAILBOXES = "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) k"
#: The batch's ids that exist (full records) and its mailboxes' totals (rows whose message id
#: is NULL: the mailbox, then the bytes waiting in it in the size column).
_LOOK_UP = (
    "SELECT mailbox, message_id, sender, size, digest, received_at, state, state_at"
    " FROM relay_messages WHERE (mailbox, message_id) IN"
    " (SELECT * FROM unnest(%s::text[], %s::text[]))"
    " UNION ALL SELECT mailbox, NULL, NULL, bytes, NULL, NULL, NULL, NULL"
    " FROM relay_mailbox_usage WHERE mailbox = ANY(%s::text[])"
)
#: Waiting records retired (collected or expired: their body gone), and their sizes taken off
#: their mailboxes' totals, in one statement.
_RETIRE = (
    "WITH gone AS (UPDATE relay_messages m SET state = %s, state_at = %s, object = NULL,"
    " body = NULL, file = NULL FROM unnest(%s::text[], %s::text[]) AS r(mailbox, message_id)"
    " WHERE m.mailbox = r.mailbox AND m.message_id = r.message_id RETURNING m.mailbox, m.size)"
    " UPDATE relay_mailbox_usage u SET bytes = u.bytes - g.bytes, count = u.count - g.n"
    " FROM (SELECT mailbox, SUM(size) AS bytes, COUNT(*) AS n FROM gone GROUP BY mailbox) g"
    " WHERE u.mailbox = g.mailbox"
)
#: The new records, and what they add to their mailboxes' totals, in one statement. The
#: bodies are sent in binary (as text, bytea is hex: twice the bytes, escaped one by one). A new
#: record is 'waiting' (WAITING).
_INSERT_MESSAGES = (
    "WITH added AS (INSERT INTO relay_messages (mailbox, message_id, sender, size, digest,"
    " received_at, state, state_at, body, file, object)"
    " SELECT m, i, s, z, d, t, 'waiting', t, b, f, o FROM unnest(%s::text[],"
    " %s::text[], %s::text[], %s::bigint[], %b::bytea[], %s::bigint[], %b::bytea[],"
    " %s::text[], %s::bigint[]::oid[]) AS n(m, i, s, z, d, t, b, f, o)"
    " RETURNING mailbox, size)"
    " INSERT INTO relay_mailbox_usage (mailbox, bytes, count)"
    " SELECT mailbox, SUM(size), COUNT(*) FROM added GROUP BY mailbox"
    " ON CONFLICT (mailbox) DO UPDATE SET bytes = relay_mailbox_usage.bytes + EXCLUDED.bytes,"
    " count = relay_mailbox_usage.count + EXCLUDED.count"
)


def _lock_key(mailbox: str) -> int:
    """The advisory lock of a mailbox (a signed 64-bit key; the same on every instance)."""
    return int.from_bytes(hashlib.sha256(mailbox.encode()).digest()[:8], "big", signed=True)


def _pool(
    url: str, min_size: int, max_size: int, *, synchronous: bool = True
) -> ConnectionPool[Any]:
    """A pool of autocommit connections, opened later; with ``synchronous=False`` their commits
    do not wait for the write-ahead log to be flushed (``synchronous_commit`` off)."""
    kwargs: dict[str, Any] = {"autocommit": True}
    if not synchronous:
        kwargs["options"] = "-c synchronous_commit=off"
    return ConnectionPool(
        url, min_size=min_size, max_size=max_size, kwargs=kwargs, open=False, timeout=30
    )


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:
        raise StorageError(f"relay database failure: {type(exc).__name__}") from exc
    except Exception as exc:  # psycopg_pool.PoolTimeout and friends
        if type(exc).__module__.startswith("psycopg"):
            raise StorageError(f"relay database unavailable: {type(exc).__name__}") from exc
        raise


class _LargeObjectUpload(Upload):
    """A large body written into a large object while it arrives, in short autocommit statements
    (one ``lo_put`` per piece, on a connection taken for that statement only): however slowly
    its sender sends, an upload holds no connection and no transaction while it waits for the
    network. The object is registered in ``relay_body_objects`` by the statement that creates
    it and unregistered by the transaction that records its message (as a shared-folder file
    is); an upload that fails unlinks it, and the sweep unlinks registered objects older than
    ``ORPHAN_AGE`` (uploads whose instance died).

    The pieces are written with ``synchronous_commit`` off (the body pool's setting): the
    transaction that records the message commits synchronously, and flushing its commit record
    flushes the whole write-ahead log before it, pieces included, so the answer still waits
    for the body to be durable."""

    def __init__(self, storage: PostgresStorage, pool: ConnectionPool[Any]) -> None:
        self.storage = storage
        self.pool = pool
        self.offset = 0
        self.oid: int | None = None
        with _guard(), pool.connection() as conn:
            row = conn.execute(
                "INSERT INTO relay_body_objects SELECT lo_create(0), %s RETURNING object",
                (int(time.time()),),
            ).fetchone()
        assert row is not None
        self.oid = int(row[0])

    def write(self, data: bytes) -> None:
        with _guard(), self.pool.connection() as conn:
            conn.execute("SELECT lo_put(%s, %s, %s)", (self.oid, self.offset, data))
        self.offset += len(data)

    def abort(self) -> None:
        if self.oid is not None:
            oid, self.oid = self.oid, None
            with contextlib.suppress(StorageError):
                self.storage._drop_objects([oid])


class _LargeObjectReader(BodyReader):
    def __init__(self, pool: ConnectionPool[Any], oid: int, size: int) -> None:
        self.pool = pool
        self.oid = oid
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        try:
            with self.pool.connection() as conn:
                # binary results: a text bytea would be hex, twice the bytes to decode
                row = conn.execute(
                    "SELECT lo_get(%s, %s, %s)", (self.oid, offset, length), binary=True
                ).fetchone()
        except psycopg.errors.UndefinedObject:
            return b""  # acknowledged (unlinked) meanwhile
        except psycopg.Error as exc:
            raise StorageError(f"relay database failure: {type(exc).__name__}") from exc
        return bytes(row[0]) if row and row[0] is not None else b""

    def close(self) -> None:
        pass


class _Outlived(Exception):
    """A shared-folder upload whose registration the sweep removed (it took over a day)."""


class _FolderUpload(FileUpload):
    """A large body written to the shared folder (registered before its first byte)."""

    def __init__(self, storage: PostgresStorage, root: Path) -> None:
        self.storage = storage
        name = os.urandom(16).hex()
        # registered first: if this instance dies from here on, a sweep removes the file
        storage._register_files([name], int(time.time()))
        try:
            super().__init__(root, name)
        except BaseException:
            storage._forget_files([name])
            raise

    def abort(self) -> None:
        super().abort()
        with contextlib.suppress(StorageError):
            self.storage._forget_files([self.name])


class PostgresStorage(SqlStorage):
    """Relay storage in PostgreSQL (see the module docstring). ``bodies`` is the shared folder
    for large bodies (the same on every instance); without it they are large objects."""

    _sql = sql_statements(
        mark="%s",
        location="file, object",
        messages="relay_messages",
        usage="relay_mailbox_usage",
        keys="relay_keys",
        key_identifiers="relay_key_identifiers",
    )

    def __init__(
        self,
        url: str,
        *,
        bodies: str | os.PathLike[str] | None = None,
        min_size: int = 2,
        max_size: int = 24,
    ) -> None:
        self.bodies = Path(bodies) if bodies is not None else None
        if self.bodies is not None:
            try:
                prepare_body_folders(self.bodies)
            except OSError as exc:
                raise StorageError(f"cannot use the bodies folder: {exc.strerror}") from exc
        try:
            self.pool = _pool(url, min_size, max_size)
            # Nonces live for the signature window only: losing the last few milliseconds of
            # them in a database crash is acceptable, waiting for a WAL flush on every request
            # is not. Their own pool, with synchronous_commit off for the session: one round
            # trip per nonce.
            self.nonce_pool = _pool(url, 1, 8, synchronous=False)
            # Large-object pieces (see _LargeObjectUpload): short statements on a pool of their
            # own, so that many large uploads arriving at once never take the connections that
            # listings, small uploads and commits use.
            self.body_pool = (
                None if self.bodies is not None else _pool(url, 1, 8, synchronous=False)
            )
            for pool in (self.pool, self.nonce_pool, self.body_pool):
                if pool is not None:
                    pool.open(wait=True, timeout=30)
        except Exception as exc:
            raise StorageError(
                f"cannot connect to the relay database: {type(exc).__name__}"
            ) from exc
        with _guard(), self.pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            conn.execute(_SCHEMA)
            # Per-mailbox totals kept by every transaction that adds or retires an envelope
            # (under the mailbox's lock), so that a quota check reads one row; a database from
            # before them gets them computed once.
            row = conn.execute("SELECT to_regclass('relay_mailbox_usage')").fetchone()
            if row is None or row[0] is None:
                conn.execute(
                    "CREATE TABLE relay_mailbox_usage (mailbox text PRIMARY KEY,"
                    " bytes bigint NOT NULL, count bigint NOT NULL)"
                )
                conn.execute(
                    "INSERT INTO relay_mailbox_usage SELECT mailbox, SUM(size), COUNT(*)"
                    " FROM relay_messages WHERE state = %s GROUP BY mailbox",
                    (WAITING,),
                )
        self.commits: GroupCommit[psycopg.Connection[Any]] = GroupCommit(
            self._run_batch,
            refusals=(Conflict, QuotaExceeded, NonceReplayed, RateLimited, _Outlived),
            gather=GATHER,
        )
        self.nonces: GroupCommit[Any] = GroupCommit(self._run_nonces)

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with _guard(), self.pool.connection() as conn:
            rows: list[Any] = conn.execute(sql, args).fetchall()
            return rows

    def _run_batch(
        self, batch: list[Any], execute: Callable[[psycopg.Connection[Any]], None]
    ) -> None:
        """One transaction for a batch of new envelopes, in two round trips to the database
        whatever the batch holds (psycopg's pipeline mode: statements are sent without waiting
        for each answer).

        1. ``BEGIN``; the mailboxes' quota locks, in one global order (so batches of several
           instances cannot deadlock); one look-up of the ids and the mailboxes' totals (and,
           for large bodies, their leaving the sweep's registers). The look-up is a statement
           of its own after the locks' statement: PostgreSQL (read committed) gives each
           statement a snapshot taken when it starts, so it sees every transaction that held a
           lock before this one took it. The pipeline only spares the wait between them.
        2. The decisions are made here (:func:`admit`); then one insert of the new records
           that also adds them to their mailboxes' totals (a data-modifying CTE), and
           ``COMMIT`` (``synchronous_commit`` on): the pipeline's end waits for its answer.
        """
        items: list[NewMessage] = [w.fn for w in batch]
        with _guard(), self.pool.connection() as conn, conn.pipeline(), conn.transaction():
            keys = sorted({_lock_key(m.mailbox) for m in items})
            # a function scan yields the array in order: the locks are taken in that order
            conn.execute(_LOCK_MAILBOXES, (keys,))
            boxes = sorted({m.mailbox for m in items})
            look_up = conn.execute(
                _LOOK_UP, ([m.mailbox for m in items], [m.message_id for m in items], boxes)
            )
            # the small uploads' nonces, recorded in this transaction (nonces_in_commits), in
            # one global order: two transactions inserting the same replayed nonces cannot
            # wait for each other in a cycle
            nonces = sorted(m.nonce for m in items if m.nonce is not None)
            remember = (
                conn.execute(
                    "INSERT INTO relay_nonces"
                    " SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[])"
                    " ON CONFLICT DO NOTHING RETURNING keyid, nonce",
                    ([n[0] for n in nonces], [n[1] for n in nonces], [n[2] for n in nonces]),
                )
                if nonces
                else None
            )
            files = [m.file for m in items if m.file is not None]
            objects = [m.object for m in items if m.object is not None]
            # the bodies leave the sweep's registers in the transaction that records them
            unregister_files = (
                conn.execute(
                    "DELETE FROM relay_body_files WHERE name = ANY(%s) RETURNING name", (files,)
                )
                if files
                else None
            )
            unregister_objects = (
                conn.execute(
                    "DELETE FROM relay_body_objects WHERE object = ANY(%s::bigint[]::oid[])"
                    " RETURNING object",
                    (objects,),
                )
                if objects
                else None
            )
            # the first fetch sends what is queued and waits for it: the first round trip
            existing: dict[tuple[str, str], StoredMessage] = {}
            used = dict.fromkeys(boxes, 0)
            for row in look_up.fetchall():
                if row[1] is None:  # a mailbox's total
                    used[row[0]] = int(row[3])
                else:
                    existing[(row[0], row[1])] = stored_message(row)
            kept = {r[0] for r in unregister_files.fetchall()} if unregister_files else set()
            kept_objects = (
                {int(r[0]) for r in unregister_objects.fetchall()} if unregister_objects else set()
            )
            fresh_nonces = {(r[0], r[1]) for r in remember.fetchall()} if remember else set()
            new: list[NewMessage] = []
            for w, m in zip(batch, items, strict=True):
                found = existing.get((m.mailbox, m.message_id))
                try:
                    if m.nonce is not None:
                        # a nonce seen before, or twice in this batch: the later is a replay
                        if (m.nonce[0], m.nonce[1]) not in fresh_nonces:
                            raise NonceReplayed
                        fresh_nonces.discard((m.nonce[0], m.nonce[1]))
                    # the rate, once the nonce is known fresh: a replay never takes a token
                    if m.charge is not None and (wait := m.charge()) > 0:
                        raise RateLimited(wait)
                    if found is None and (
                        (m.file is not None and m.file not in kept)
                        or (m.object is not None and m.object not in kept_objects)
                    ):
                        raise _Outlived  # swept as an orphan: the client retries
                    w.result = admit(m, found, functools.partial(used.__getitem__, m.mailbox))
                except (Conflict, QuotaExceeded, NonceReplayed, RateLimited, _Outlived) as exc:
                    w.error = exc
                    continue
                record, fresh = w.result
                if fresh:
                    used[m.mailbox] += m.size
                    existing[(m.mailbox, m.message_id)] = record
                    new.append(m)
            # files and objects of refused or replayed uploads: back in their register, for
            # the caller to delete (or the sweep, if the caller dies first)
            refused = [
                (m.file, m.object)
                for w, m in zip(batch, items, strict=True)
                if (m.file in kept or m.object in kept_objects) and not (w.result and w.result[1])
            ]
            refused_files = [f for f, _ in refused if f is not None]
            refused_objects = [o for _, o in refused if o is not None]
            if refused_files:
                conn.execute(
                    "INSERT INTO relay_body_files SELECT unnest(%s::text[]), %s",
                    (refused_files, int(time.time())),
                )
            if refused_objects:
                conn.execute(
                    "INSERT INTO relay_body_objects SELECT unnest(%s::bigint[]::oid[]), %s",
                    (refused_objects, int(time.time())),
                )
            if new:
                conn.execute(
                    _INSERT_MESSAGES,
                    (
                        [m.mailbox for m in new],
                        [m.message_id for m in new],
                        [m.sender for m in new],
                        [m.size for m in new],
                        [m.digest for m in new],
                        [m.now for m in new],
                        [m.body for m in new],
                        [m.file for m in new],
                        [m.object for m in new],
                    ),
                )
        # (leaving the transaction queued the COMMIT; leaving the pipeline sent it and waited
        # for its answer, raising if any statement of the batch failed)

    # -- body files (shared folder) ----------------------------------------------------------
    def _register_files(self, names: Sequence[str], since: int) -> None:
        with _guard(), self.pool.connection() as conn:
            conn.execute(
                "INSERT INTO relay_body_files SELECT unnest(%s::text[]), %s"
                " ON CONFLICT (name) DO UPDATE SET since = EXCLUDED.since",
                (list(names), since),
            )

    def _forget_files(self, names: Sequence[str]) -> None:
        with _guard(), self.pool.connection() as conn:
            conn.execute("DELETE FROM relay_body_files WHERE name = ANY(%s)", (list(names),))

    def _unlink_files(self, names: Sequence[str]) -> None:
        """Delete body files (registered for deletion by the caller's committed transaction),
        then unregister them; a crash in between leaves rows the sweep finishes."""
        if not names or self.bodies is None:
            return
        self._delete_files(names)
        self._forget_files(names)

    def _delete_files(self, names: Sequence[str]) -> None:
        """Remove body files wherever they are (``tmp/`` while written, then ``objects/``)."""
        assert self.bodies is not None
        for name in names:
            for path in (self.bodies / "objects" / name[:2] / name, self.bodies / "tmp" / name):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    # -- large objects being written -------------------------------------------------------
    def _drop_objects(self, oids: Sequence[int]) -> None:
        """Unlink registered large objects of uploads that failed, and unregister them."""
        with _guard(), self.pool.connection() as conn:
            conn.execute(
                "WITH gone AS (DELETE FROM relay_body_objects"
                " WHERE object = ANY(%s::bigint[]::oid[]) RETURNING object)"
                " SELECT lo_unlink(object) FROM gone",
                (list(oids),),
            )

    def sweep_objects(self, now: int, limit: int = 500) -> int:
        """Unlink the large objects of uploads that died (registered more than ``ORPHAN_AGE``
        ago); how many. Several instances sweep at once (SKIP LOCKED)."""

        def unlink(conn: psycopg.Connection[Any], oids: list[Any]) -> None:
            conn.execute(
                "SELECT lo_unlink(o.oid) FROM pg_largeobject_metadata o"
                " WHERE o.oid = ANY(%s::bigint[]::oid[])",
                (oids,),
            )

        return self._sweep(
            "SELECT object FROM relay_body_objects WHERE since < %s"
            " ORDER BY since LIMIT %s FOR UPDATE SKIP LOCKED",
            "DELETE FROM relay_body_objects WHERE object = ANY(%s::bigint[]::oid[])",
            now,
            limit,
            unlink,
        )

    def sweep_files(self, now: int, limit: int = 500) -> int:
        """Remove body files of uploads that died (registered more than ``ORPHAN_AGE`` ago) and
        files due for deletion; how many. Several instances sweep at once (SKIP LOCKED)."""
        if self.bodies is None:
            return 0
        return self._sweep(
            "SELECT name FROM relay_body_files WHERE since < %s"
            " ORDER BY since LIMIT %s FOR UPDATE SKIP LOCKED",
            "DELETE FROM relay_body_files WHERE name = ANY(%s)",
            now,
            limit,
            lambda conn, names: self._delete_files(names),
        )

    def _sweep(
        self,
        claim: str,
        unregister: str,
        now: int,
        limit: int,
        remove: Callable[[psycopg.Connection[Any], list[Any]], None],
    ) -> int:
        """Take (``claim``: a work queue, each instance takes the rows no other one holds) up to
        ``limit`` entries of a register of bodies older than ``ORPHAN_AGE``, ``remove`` them
        and ``unregister`` them, in one transaction; how many."""
        with _guard(), self.pool.connection() as conn, conn.transaction():
            found = [r[0] for r in conn.execute(claim, (now - ORPHAN_AGE, limit)).fetchall()]
            if found:
                remove(conn, found)
                conn.execute(unregister, (found,))
        return len(found)

    # -- keys ------------------------------------------------------------------------------
    def publish_key(
        self, fingerprint: str, bundle: bytes, identifiers: Sequence[str], published: int, seen: int
    ) -> None:
        claimed = sorted(set(identifiers))
        with _guard(), self.pool.connection() as conn, conn.transaction():
            cur = conn.execute(
                "INSERT INTO relay_keys VALUES (%s, %s, %s) ON CONFLICT (fingerprint) DO UPDATE"
                " SET bundle = EXCLUDED.bundle, published = EXCLUDED.published"
                " WHERE relay_keys.published <= EXCLUDED.published",
                (fingerprint, bundle, published),
            )
            if cur.rowcount:
                # a claim the bundle keeps keeps the time it was first seen
                conn.execute(
                    "DELETE FROM relay_key_identifiers WHERE fingerprint = %s"
                    " AND NOT (identifier = ANY(%s))",
                    (fingerprint, claimed),
                )
                conn.execute(
                    "INSERT INTO relay_key_identifiers (identifier, fingerprint, first_seen)"
                    " SELECT unnest(%s::text[]), %s, %s ON CONFLICT DO NOTHING",
                    (claimed, fingerprint, seen),
                )

    def _ids_in(self, ids: Sequence[str]) -> tuple[str, Sequence[Any]]:
        return "= ANY(%s)", [list(ids)]

    nonces_in_commits = True

    def remember_nonce(self, keyid: str, nonce: str, expires: int) -> bool:
        # grouped like the commits: the requests that arrive while one insert is on its way
        # share the next one (one round trip for many)
        fresh: bool = self.nonces.submit((keyid, nonce, expires))
        return fresh

    def _run_nonces(self, batch: list[Any], execute: Callable[[Any], None]) -> None:
        items: list[tuple[str, str, int]] = [w.fn for w in batch]
        ordered = sorted(items)  # in the commits' order (see _run_batch)
        with _guard(), self.nonce_pool.connection() as conn:
            inserted = {
                (r[0], r[1])
                for r in conn.execute(
                    "INSERT INTO relay_nonces"
                    " SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[])"
                    " ON CONFLICT DO NOTHING RETURNING keyid, nonce",
                    ([i[0] for i in ordered], [i[1] for i in ordered], [i[2] for i in ordered]),
                )
            }
        seen: set[tuple[str, str]] = set()
        for w, (keyid, nonce, _) in zip(batch, items, strict=True):
            w.result = (keyid, nonce) in inserted and (keyid, nonce) not in seen
            seen.add((keyid, nonce))

    # -- messages --------------------------------------------------------------------------
    def _begin_large(self) -> Upload:
        if self.bodies is not None:
            return _FolderUpload(self, self.bodies)
        assert self.body_pool is not None
        return _LargeObjectUpload(self, self.body_pool)

    def _place(self, upload: Upload) -> tuple[str | None, int | None]:
        if isinstance(upload, _LargeObjectUpload):
            assert upload.oid is not None
            return None, upload.oid
        assert isinstance(upload, _FolderUpload) and self.bodies is not None
        upload.finish(self.bodies / "objects")
        return upload.name, None

    def _record(self, upload: Upload, message: NewMessage) -> tuple[StoredMessage, bool]:
        try:
            stored, new = self.commits.submit(message, message.mailbox)
        except _Outlived:
            raise StorageError("the upload took longer than the orphan sweep allows") from None
        if new and isinstance(upload, _LargeObjectUpload):
            upload.oid = None  # recorded: its message owns the object now
        return stored, new

    def _open_large(self, size: int, location: Sequence[Any]) -> BodyReader | None:
        name, oid = location
        if name is not None and self.bodies is not None:
            return open_file_body(self.bodies / "objects" / name[:2] / name, size)
        if oid is None:
            return None
        return _LargeObjectReader(self.pool, int(oid), size)

    def _retire(
        self, conn: psycopg.Connection[Any], rows: list[Any], state: str, now: int
    ) -> list[str]:
        """Retire waiting messages (rows the caller locked) in a constant number of statements,
        however many: their large objects unlinked, their records marked and their mailboxes'
        totals reduced (one statement), their body files registered for deletion; returns the
        files to delete once committed."""
        if not rows:
            return []
        oids = [int(r[2]) for r in rows if r[2] is not None]
        files = [str(r[3]) for r in rows if r[3] is not None]
        if oids:
            conn.execute("SELECT lo_unlink(o) FROM unnest(%s::bigint[]::oid[]) o", (oids,))
        conn.execute(_RETIRE, (state, now, [r[0] for r in rows], [r[1] for r in rows]))
        if files:
            conn.execute(
                "INSERT INTO relay_body_files SELECT unnest(%s::text[]), 0"
                " ON CONFLICT (name) DO UPDATE SET since = 0",
                (files,),
            )
        return files

    def _retire_locked(self, select: str, args: Sequence[Any], state: str, now: int) -> int:
        """Retire the waiting messages ``select`` locks (rows of mailbox, message id, object,
        file, size) in one transaction, then delete their body files; how many. Two round
        trips (pipeline mode): the locking read, then the rest with the ``COMMIT``."""
        with _guard(), self.pool.connection() as conn, conn.pipeline(), conn.transaction():
            rows = conn.execute(select, args).fetchall()
            files = self._retire(conn, rows, state, now)
        self._unlink_files(files)
        return len(rows)

    def acknowledge(self, mailbox: str, message_id: str, now: int) -> bool:
        select = (
            "SELECT mailbox, message_id, object, file, size FROM relay_messages"
            " WHERE mailbox = %s AND message_id = %s AND state = %s FOR UPDATE"
        )
        return self._retire_locked(select, (mailbox, message_id, WAITING), COLLECTED, now) > 0

    # -- maintenance -----------------------------------------------------------------------
    def expire(self, received_before: int, now: int, limit: int = 500) -> int:
        # A work queue: each instance takes the rows no other instance holds.
        select = (
            "SELECT mailbox, message_id, object, file, size FROM relay_messages"
            " WHERE state = %s AND received_at < %s ORDER BY received_at LIMIT %s"
            " FOR UPDATE SKIP LOCKED"
        )
        return self._retire_locked(select, (WAITING, received_before, limit), EXPIRED, now)

    def purge(self, now: int, tombstones_before: int) -> None:
        while self.sweep_files(now) == 500:
            pass
        while self.sweep_objects(now) == 500:
            pass
        with _guard(), self.pool.connection() as conn:
            conn.execute("DELETE FROM relay_nonces WHERE expires < %s", (now,))
            conn.execute(self._sql["tombstones"], (COLLECTED, EXPIRED, tombstones_before))

    def close(self) -> None:
        if self.body_pool is not None:
            self.body_pool.close()
        self.nonce_pool.close()
        self.pool.close()
