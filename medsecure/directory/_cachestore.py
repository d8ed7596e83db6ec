"""Where :class:`CachedDirectory` keeps answers: dictionaries in memory, in front of an optional
SQLite file (opened, migrated and written through medsecure's one SQLite helper,
:class:`medsecure._sqlite.Database`).

What is kept, and why it is split this way:

* ``entries`` — the latest entry for each practitioner, by IDNPS, and when it was fetched;
* ``addresses`` — for an MSSanté address *that was looked up*, which practitioner the directory
  named and when. An entry's own list of mailboxes never creates such a row: the directory is
  the one that says who an address belongs to. (Filing every entry under each address it claims
  let an entry that also claimed someone else's mailbox take that address over.)
* ``claims`` — the addresses each kept entry lists, so that an address claimed by two kept
  practitioners is seen as such.

A store that cannot be read or written logs a warning and behaves as a miss: a cache never
makes a lookup fail.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .._errors import StorageError
from .._sqlite import Database
from ..models import Practitioner

__all__ = ["CacheStore"]

log = logging.getLogger("medsecure.directory")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries (idnps TEXT PRIMARY KEY, entry TEXT NOT NULL,"
    " fetched_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS addresses (address TEXT PRIMARY KEY, idnps TEXT NOT NULL,"
    " fetched_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS claims (address TEXT NOT NULL, idnps TEXT NOT NULL,"
    " PRIMARY KEY (address, idnps)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS claims_by_idnps ON claims (idnps)",
)


def _v1(db: sqlite3.Connection) -> None:
    for statement in _SCHEMA:
        db.execute(statement)
    old = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'cache'"
    ).fetchone()
    if old:
        # version 0 filed an entry under every address it claimed: keep only the rows filed
        # under the entry's own IDNPS (the address rows are the flaw)
        db.execute(
            "INSERT OR IGNORE INTO entries SELECT idnps, entry, fetched_at FROM cache"
            " WHERE key = 'idnps:' || idnps"
        )
        db.execute("DROP TABLE cache")
        for idnps, entry in db.execute("SELECT idnps, entry FROM entries").fetchall():
            with contextlib.suppress(ValidationError):
                p = Practitioner.model_validate_json(entry)
                db.executemany(
                    "INSERT OR IGNORE INTO claims VALUES (?, ?)",
                    [(a, idnps) for a in _claims(p)],
                )


def _claims(p: Practitioner) -> set[str]:
    return {ref[4:] for ref in p.refs() if ref.startswith("mss:")}


class CacheStore:
    """Practitioner entries by IDNPS, looked-up addresses, and who claims which address."""

    def __init__(self, path: str | Path | None = None) -> None:
        self._lock = threading.RLock()
        self._entries: dict[str, tuple[Practitioner, float]] = {}
        self._addresses: dict[str, tuple[str, float]] = {}
        self._claims: dict[str, set[str]] = {}  # address -> IDNPS, of the entries in memory
        self._db: Database | None = None
        if path is not None:
            # the cache is not worth a durable commit per answer: losing one only means asking
            # the directory again
            self._db = Database(Path(path), migrations=(_v1,), what="the directory cache")

    # -- reading ---------------------------------------------------------------------------
    def entry(self, idnps: str) -> tuple[Practitioner, float] | None:
        """The kept entry for ``idnps`` and when it was fetched, or None."""
        hit = self._entries.get(idnps)
        if hit is not None:
            return hit
        row = self._row("SELECT entry, fetched_at FROM entries WHERE idnps = ?", idnps)
        if row is None:
            return None
        try:
            p = Practitioner.model_validate_json(row[0])
        except ValidationError:
            return None
        if p.idnps != idnps:  # a row edited by hand: not the entry asked for
            return None
        with self._lock:
            if idnps not in self._entries:  # unless a newer answer came in meanwhile
                self._remember(p, row[1])
            return self._entries[idnps]

    def address(self, address: str) -> tuple[str, float] | None:
        """The IDNPS the directory named for ``address`` and when, or None."""
        hit = self._addresses.get(address)
        if hit is None:
            row = self._row("SELECT idnps, fetched_at FROM addresses WHERE address = ?", address)
            if row is not None:
                hit = self._addresses[address] = (row[0], row[1])
        return hit

    def claimants(self, address: str) -> set[str]:
        """The IDNPS of every kept entry that lists ``address``."""
        with self._lock:
            found = set(self._claims.get(address, ()))
        found.update(
            idnps for (idnps,) in self._rows("SELECT idnps FROM claims WHERE address = ?", address)
        )
        return found

    def everyone(self) -> list[Practitioner]:
        """Every kept entry (for searching offline)."""
        with self._lock:
            seen = {idnps: p for idnps, (p, _) in self._entries.items()}
        for idnps, entry in self._rows("SELECT idnps, entry FROM entries"):
            if idnps not in seen:
                with contextlib.suppress(ValidationError):
                    seen[idnps] = Practitioner.model_validate_json(entry)
        return list(seen.values())

    def _rows(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        if self._db is None:
            return []
        try:
            return [tuple(r) for r in self._db.query(sql, args)]
        except StorageError as exc:
            log.warning("directory cache unreadable: %s", exc)
            return []

    def _row(self, sql: str, *args: object) -> tuple[Any, ...] | None:
        rows = self._rows(sql, *args)
        return rows[0] if rows else None

    # -- writing ---------------------------------------------------------------------------
    def _remember(self, p: Practitioner, fetched_at: float) -> None:
        old = self._entries.get(p.idnps)
        if old is not None:
            for address in _claims(old[0]):
                self._claims.get(address, set()).discard(p.idnps)
        self._entries[p.idnps] = (p, fetched_at)
        for address in _claims(p):
            self._claims.setdefault(address, set()).add(p.idnps)

    def put(self, p: Practitioner, fetched_at: float, *, address: str | None = None) -> None:
        """Keep ``p`` as the latest entry for its IDNPS; with ``address``, also record that the
        directory named ``p`` when asked for that address."""
        with self._lock:
            self._remember(p, fetched_at)
            if address is not None:
                self._addresses[address] = (p.idnps, fetched_at)
            self._write(
                [
                    (
                        "INSERT OR REPLACE INTO entries VALUES (?, ?, ?)",
                        [(p.idnps, p.model_dump_json(), fetched_at)],
                    ),
                    ("DELETE FROM claims WHERE idnps = ?", [(p.idnps,)]),
                    (
                        "INSERT OR IGNORE INTO claims VALUES (?, ?)",
                        [(a, p.idnps) for a in _claims(p)],
                    ),
                    (
                        "INSERT OR REPLACE INTO addresses VALUES (?, ?, ?)",
                        [(address, p.idnps, fetched_at)] if address is not None else [],
                    ),
                ]
            )

    def forget_address(self, address: str) -> None:
        """Drop what the directory said about ``address`` (entries stay)."""
        with self._lock:
            self._addresses.pop(address, None)
            self._write([("DELETE FROM addresses WHERE address = ?", [(address,)])])

    def forget(self, idnps: str) -> None:
        """Drop the practitioner: its entry, its claims, the addresses that named it."""
        with self._lock:
            old = self._entries.pop(idnps, None)
            if old is not None:
                for address in _claims(old[0]):
                    self._claims.get(address, set()).discard(idnps)
            for address in [a for a, (i, _) in self._addresses.items() if i == idnps]:
                del self._addresses[address]
            self._write(
                [
                    ("DELETE FROM entries WHERE idnps = ?", [(idnps,)]),
                    ("DELETE FROM claims WHERE idnps = ?", [(idnps,)]),
                    ("DELETE FROM addresses WHERE idnps = ?", [(idnps,)]),
                ]
            )

    def _write(self, statements: list[tuple[str, list[tuple[object, ...]]]]) -> None:
        if self._db is None:
            return
        try:
            with self._db.transaction(durable=False) as db:
                for sql, rows in statements:
                    if rows:
                        db.executemany(sql, rows)
        except StorageError as exc:
            log.warning("directory cache not written: %s", exc)

    def close(self) -> None:
        """Close the SQLite file, if any."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
