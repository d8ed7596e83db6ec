"""The durable state of a client (outbox, inbox, quarantine): SQLite in MEDSECURE_HOME.

Theory of operation
-------------------
*Accepted means on disk.* A send writes the sealed envelope to ``outbox/<id>.msec`` (temporary
name, fsync, rename, fsync of the folder), then commits the message row and its delivery plan in
one SQLite transaction with ``synchronous=FULL`` in WAL mode. Only then does ``send()`` return
(or attempt delivery). A crash before the commit leaves at most an orphan envelope file, which
the next start removes: the message was never promised. A crash after it leaves a queued
delivery, which ``flush()`` completes.

Status updates after a delivery attempt are committed with ``synchronous=NORMAL``: losing one
to a power cut only means the envelope is delivered again, which every transport makes
idempotent and every inbox deduplicates by message id.

The inbox stores a fetched envelope (durably) and commits its row *before* the transport copy is
acknowledged, then verifies it. An envelope whose id (SHA-256 of its framed header) matches an
already *verified* one is acknowledged and dropped; so is a second envelope with an already
received message id. Unverified look-alikes are kept and verified on their own, so a tampered
copy planted first cannot shadow the genuine envelope.

The database holds identifiers, statuses and hashes only: never subjects, file names or patient
data (those stay inside the envelopes and the verified message files).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._errors import StorageError

__all__ = ["Store"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    message_id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    envelope TEXT NOT NULL,
    size INTEGER NOT NULL,
    envelope_id TEXT NOT NULL,
    receipts TEXT NOT NULL DEFAULT '',
    deadline REAL,
    kind TEXT NOT NULL DEFAULT 'message'
);
CREATE TABLE IF NOT EXISTS deliveries (
    message_id TEXT NOT NULL REFERENCES outbox(message_id),
    recipient TEXT NOT NULL,
    endpoints TEXT NOT NULL,
    endpoint_index INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_error TEXT,
    updated REAL NOT NULL,
    PRIMARY KEY (message_id, recipient)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_attempt);
CREATE TABLE IF NOT EXISTS inbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    envelope_id TEXT NOT NULL,
    message_id TEXT UNIQUE,
    status TEXT NOT NULL,
    sender_idnps TEXT,
    received_at REAL NOT NULL,
    envelope TEXT,
    plaintext TEXT,
    sender TEXT,
    sender_key TEXT,
    reason TEXT,
    read_at REAL,
    receipts TEXT,
    claimer INTEGER,
    claimed_at REAL
);
CREATE TABLE IF NOT EXISTS receipts (
    message_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    status TEXT NOT NULL,
    at REAL NOT NULL,
    reason TEXT,
    late INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (message_id, recipient, status)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    status TEXT NOT NULL,
    at REAL NOT NULL,
    late INTEGER NOT NULL DEFAULT 0,
    detail TEXT
);
CREATE TABLE IF NOT EXISTS sent_receipts (
    message_id TEXT NOT NULL,
    status TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (message_id, status)
);
CREATE INDEX IF NOT EXISTS inbox_envelope ON inbox (envelope_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _read_only(path: Path) -> bool:
    try:
        if hasattr(os, "statvfs") and os.statvfs(path).f_flag & os.ST_RDONLY:
            return True
        return not os.access(path, os.W_OK)
    except OSError:
        return False


def _explain(exc: sqlite3.Error) -> str:
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return "the medsecure database is locked by another process (try again)"
    if "readonly" in text or "read-only" in text:
        return "the medsecure home is read-only"
    if "full" in text:
        return "the disk holding the medsecure home is full"
    if "disk i/o" in text:
        return "disk I/O error in the medsecure home (disk full or failing?)"
    if "unable to open" in text:
        return "cannot open the medsecure database (is the home missing or read-only?)"
    if "malformed" in text or "not a database" in text:
        return "the medsecure database is damaged"
    return f"database error: {exc}"


class Store:
    """SQLite state under ``home`` (``medsecure.sqlite``), plus its envelope folders."""

    def __init__(self, home: Path, *, busy_timeout: float = 10.0) -> None:
        self.home = home
        self.outbox_dir = home / "outbox"
        self.inbox_dir = home / "inbox"
        self.quarantine_dir = home / "quarantine"
        self._lock = threading.RLock()
        try:
            for d in (home, self.outbox_dir, self.inbox_dir, self.quarantine_dir):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create the medsecure home {str(home)!r}: {exc.strerror}"
            ) from exc
        if _read_only(home):
            raise StorageError(f"the medsecure home {str(home)!r} is read-only")
        try:
            self.db = sqlite3.connect(
                str(home / "medsecure.sqlite"),
                timeout=busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise StorageError(_explain(exc)) from exc
        with contextlib.suppress(OSError):
            os.chmod(home / "medsecure.sqlite", 0o600)

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction; ``durable=False`` commits with synchronous=NORMAL."""
        with self._lock:
            try:
                if not durable:
                    self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    yield self.db
                    self.db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        self.db.execute("ROLLBACK")
                    raise
                finally:
                    if not durable:
                        self.db.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                raise StorageError(_explain(exc)) from exc

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self.db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(_explain(exc)) from exc

    def recover(self, *, min_age: float = 600.0) -> int:
        """Remove what a crash may have left: temporary files and envelopes no row references,
        once older than ``min_age`` seconds (younger ones may belong to a send in progress in
        another process). Returns how many files were removed."""
        removed = 0
        cutoff = time.time() - min_age
        known_out = {r["envelope"] for r in self.query("SELECT envelope FROM outbox")}
        known_in: set[str] = set()
        for r in self.query("SELECT envelope, plaintext FROM inbox"):
            known_in.update(x for x in (r["envelope"], r["plaintext"]) if x)
        for folder, known in ((self.outbox_dir, known_out), (self.inbox_dir, known_in)):
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                if entry.name.startswith(".medsecure-") or entry.name not in known:
                    with contextlib.suppress(OSError):
                        if entry.stat().st_mtime < cutoff:
                            os.unlink(entry.path)
                            removed += 1
        return removed

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self.db.close()

    @staticmethod
    def now() -> float:
        return time.time()
