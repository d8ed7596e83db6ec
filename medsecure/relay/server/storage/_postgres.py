"""PostgreSQL storage (extra ``postgres``): several stateless relay instances share one database.

Choices (docs/relay.md has the measurements and the reasoning):

* **Bodies in large objects**, not in a shared folder: an instance needs nothing but the database
  URL (no network file system to mount, back up and keep consistent with the tables), and one
  commit makes the body and its row durable together. A body is written with ``lo_put`` in 1 MiB
  pieces inside the upload's transaction; if the upload fails, is refused, or the instance dies,
  the transaction rolls back and the large object vanishes with it — nothing partial is ever
  visible. Downloads read with ``lo_get`` by range, in short autocommit statements, so a slow
  reader holds no transaction open.
* The price: an upload holds a connection and a transaction for its duration (pool size bounds
  concurrent uploads per instance) and large objects are ~2x the disk writes of a plain file
  (WAL + table). Benchmarks in bench/bench_relay.py compare it with the embedded storage.
* **Work queues** (the retention sweep) claim rows with ``FOR UPDATE SKIP LOCKED``, so several
  instances sweep at once without waiting on each other. No state lives in an instance: rate
  limits are per instance (documented), nonces are in the database.
* Concurrent uploads to one mailbox serialise on a transaction-scoped advisory lock for the quota
  check; the primary key (mailbox, message id) makes a message unique whatever the races.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
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
    QuotaExceeded,
    Storage,
    StoredMessage,
    Upload,
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
"""
_COLUMNS = "mailbox, message_id, sender, size, digest, received_at, state, state_at"
_SCHEMA_LOCK = 0x6D65647365637572  # "medsecur": one instance creates the schema at a time


def _row(r: Any) -> StoredMessage:
    return StoredMessage(r[0], r[1], r[2], int(r[3]), bytes(r[4]), int(r[5]), r[6], int(r[7]))


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
    def __init__(self, pool: ConnectionPool[Any]) -> None:
        self.pool = pool
        self.conn: psycopg.Connection[Any] | None = pool.getconn()
        self.offset = 0
        try:
            with _guard():
                self.conn.execute("BEGIN")
                row = self.conn.execute("SELECT lo_create(0)").fetchone()
                assert row is not None
                self.oid = int(row[0])
        except BaseException:
            self.abort()
            raise

    def write(self, data: bytes) -> None:
        assert self.conn is not None
        with _guard():
            self.conn.execute("SELECT lo_put(%s, %s, %s)", (self.oid, self.offset, data))
        self.offset += len(data)

    def release(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            self.pool.putconn(conn)

    def abort(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                self.conn.execute("ROLLBACK")
            self.release()


class _LargeObjectReader(BodyReader):
    def __init__(self, pool: ConnectionPool[Any], oid: int, size: int) -> None:
        self.pool = pool
        self.oid = oid
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        try:
            with self.pool.connection() as conn:
                row = conn.execute(
                    "SELECT lo_get(%s, %s, %s)", (self.oid, offset, length)
                ).fetchone()
        except psycopg.errors.UndefinedObject:
            return b""  # acknowledged (unlinked) meanwhile
        except psycopg.Error as exc:
            raise StorageError(f"relay database failure: {type(exc).__name__}") from exc
        return bytes(row[0]) if row and row[0] is not None else b""

    def close(self) -> None:
        pass


class PostgresStorage(Storage):
    """Relay storage in PostgreSQL (see the module docstring)."""

    def __init__(self, url: str, *, min_size: int = 2, max_size: int = 24) -> None:
        try:
            self.pool: ConnectionPool[Any] = ConnectionPool(
                url,
                min_size=min_size,
                max_size=max_size,
                kwargs={"autocommit": True},
                open=False,
                timeout=30,
            )
            self.pool.open(wait=True, timeout=30)
        except Exception as exc:
            raise StorageError(
                f"cannot connect to the relay database: {type(exc).__name__}"
            ) from exc
        with _guard(), self.pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            conn.execute(_SCHEMA)

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with _guard(), self.pool.connection() as conn:
            rows: list[Any] = conn.execute(sql, args).fetchall()
            return rows

    # -- keys ------------------------------------------------------------------------------
    def publish_key(
        self, fingerprint: str, bundle: bytes, identifiers: Sequence[str], published: int
    ) -> None:
        with _guard(), self.pool.connection() as conn, conn.transaction():
            cur = conn.execute(
                "INSERT INTO relay_keys VALUES (%s, %s, %s) ON CONFLICT (fingerprint) DO UPDATE"
                " SET bundle = EXCLUDED.bundle, published = EXCLUDED.published"
                " WHERE relay_keys.published <= EXCLUDED.published",
                (fingerprint, bundle, published),
            )
            if cur.rowcount:
                conn.execute(
                    "DELETE FROM relay_key_identifiers WHERE fingerprint = %s", (fingerprint,)
                )
                for ident in identifiers:
                    conn.execute(
                        "INSERT INTO relay_key_identifiers VALUES (%s, %s) ON CONFLICT DO NOTHING",
                        (ident, fingerprint),
                    )

    def key(self, fingerprint: str) -> bytes | None:
        rows = self._all("SELECT bundle FROM relay_keys WHERE fingerprint = %s", (fingerprint,))
        return bytes(rows[0][0]) if rows else None

    def keys_for(self, identifier: str) -> list[bytes]:
        rows = self._all(
            "SELECT k.bundle FROM relay_key_identifiers i JOIN relay_keys k"
            " ON k.fingerprint = i.fingerprint WHERE i.identifier = %s"
            " ORDER BY k.published DESC LIMIT 20",
            (identifier,),
        )
        return [bytes(r[0]) for r in rows]

    def remember_nonce(self, keyid: str, nonce: str, expires: int) -> bool:
        with _guard(), self.pool.connection() as conn, conn.transaction():
            # A nonce lives for the signature window only: losing the last few milliseconds of
            # them in a database crash is acceptable, waiting for an fsync on every request is not.
            conn.execute("SET LOCAL synchronous_commit TO OFF")
            cur = conn.execute(
                "INSERT INTO relay_nonces VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (keyid, nonce, expires),
            )
            return bool(cur.rowcount == 1)

    # -- messages --------------------------------------------------------------------------
    def find(self, mailbox: str, message_id: str) -> StoredMessage | None:
        rows = self._all(
            "SELECT mailbox, message_id, sender, size, digest, received_at, state, state_at"
            " FROM relay_messages WHERE mailbox = %s AND message_id = %s",
            (mailbox, message_id),
        )
        return _row(rows[0]) if rows else None

    def begin_upload(self) -> Upload:
        with _guard():
            return _LargeObjectUpload(self.pool)

    def commit_upload(
        self,
        upload: Upload,
        *,
        mailbox: str,
        message_id: str,
        sender: str,
        digest: bytes,
        size: int,
        now: int,
        quota: int,
    ) -> tuple[StoredMessage, bool]:
        assert isinstance(upload, _LargeObjectUpload) and upload.conn is not None
        conn = upload.conn
        try:
            with _guard():
                conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (mailbox,))
                row = conn.execute(
                    "SELECT mailbox, message_id, sender, size, digest, received_at, state,"
                    " state_at FROM relay_messages WHERE mailbox = %s AND message_id = %s",
                    (mailbox, message_id),
                ).fetchone()
                if row is not None:
                    existing = _row(row)
                    if existing.sender == sender and existing.digest == digest:
                        upload.abort()
                        return existing, False
                    raise Conflict
                used = conn.execute(
                    "SELECT COALESCE(SUM(size), 0) FROM relay_messages"
                    " WHERE mailbox = %s AND state = %s",
                    (mailbox, WAITING),
                ).fetchone()
                if used is not None and int(used[0]) + size > quota:
                    raise QuotaExceeded
                conn.execute(
                    "INSERT INTO relay_messages VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (mailbox, message_id, sender, size, digest, now, WAITING, now, upload.oid),
                )
                conn.execute("COMMIT")  # synchronous_commit on: durable when this returns
            upload.release()
            return StoredMessage(mailbox, message_id, sender, size, digest, now, WAITING, now), True
        except BaseException:
            upload.abort()
            raise

    def usage(self, mailbox: str) -> int:
        rows = self._all(
            "SELECT COALESCE(SUM(size), 0) FROM relay_messages WHERE mailbox = %s AND state = %s",
            (mailbox, WAITING),
        )
        return int(rows[0][0])

    def waiting(self, mailbox: str, limit: int) -> list[StoredMessage]:
        rows = self._all(
            "SELECT mailbox, message_id, sender, size, digest, received_at, state, state_at"
            " FROM relay_messages WHERE mailbox = %s AND state = %s"
            " ORDER BY received_at, message_id LIMIT %s",
            (mailbox, WAITING, limit),
        )
        return [_row(r) for r in rows]

    def open_body(self, mailbox: str, message_id: str) -> BodyReader | None:
        rows = self._all(
            "SELECT object, size FROM relay_messages"
            " WHERE mailbox = %s AND message_id = %s AND state = %s",
            (mailbox, message_id, WAITING),
        )
        if not rows or rows[0][0] is None:
            return None
        return _LargeObjectReader(self.pool, int(rows[0][0]), int(rows[0][1]))

    def _retire(self, conn: psycopg.Connection[Any], rows: list[Any], state: str, now: int) -> None:
        for mailbox, message_id, oid in rows:
            if oid is not None:
                conn.execute("SELECT lo_unlink(%s)", (oid,))
            conn.execute(
                "UPDATE relay_messages SET state = %s, state_at = %s, object = NULL"
                " WHERE mailbox = %s AND message_id = %s",
                (state, now, mailbox, message_id),
            )

    def acknowledge(self, mailbox: str, message_id: str, now: int) -> bool:
        with _guard(), self.pool.connection() as conn, conn.transaction():
            rows = conn.execute(
                "SELECT mailbox, message_id, object FROM relay_messages"
                " WHERE mailbox = %s AND message_id = %s AND state = %s FOR UPDATE",
                (mailbox, message_id, WAITING),
            ).fetchall()
            self._retire(conn, rows, COLLECTED, now)
        return bool(rows)

    def uploads(self, sender: str, message_ids: Sequence[str]) -> list[StoredMessage]:
        if not message_ids:
            return []
        rows = self._all(
            "SELECT mailbox, message_id, sender, size, digest, received_at, state, state_at"
            " FROM relay_messages WHERE sender = %s AND message_id = ANY(%s)"
            " ORDER BY message_id, mailbox",
            (sender, list(message_ids)),
        )
        return [_row(r) for r in rows]

    # -- maintenance -----------------------------------------------------------------------
    def expire(self, received_before: int, now: int, limit: int = 500) -> int:
        with _guard(), self.pool.connection() as conn, conn.transaction():
            # A work queue: each instance takes the rows no other instance holds.
            rows = conn.execute(
                "SELECT mailbox, message_id, object FROM relay_messages"
                " WHERE state = %s AND received_at < %s ORDER BY received_at LIMIT %s"
                " FOR UPDATE SKIP LOCKED",
                (WAITING, received_before, limit),
            ).fetchall()
            self._retire(conn, rows, EXPIRED, now)
        return len(rows)

    def purge(self, now: int, tombstones_before: int) -> None:
        with _guard(), self.pool.connection() as conn:
            conn.execute("DELETE FROM relay_nonces WHERE expires < %s", (now,))
            conn.execute(
                "DELETE FROM relay_messages WHERE state IN (%s, %s) AND state_at < %s",
                (COLLECTED, EXPIRED, tombstones_before),
            )

    def stats(self) -> tuple[int, int]:
        rows = self._all(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM relay_messages WHERE state = %s",
            (WAITING,),
        )
        return int(rows[0][0]), int(rows[0][1])

    def close(self) -> None:
        self.pool.close()
