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
import sys
import time
from pathlib import Path
from typing import Any

from ._errors import StorageError
from ._sqlite import Database

__all__ = ["Store", "default_home"]


def default_home() -> Path:
    """``$MEDSECURE_HOME``, else the per-user data folder of the platform."""
    env = os.environ.get("MEDSECURE_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":  # pragma: no cover - platform specific
        return Path(os.environ.get("APPDATA", Path.home())) / "medsecure"
    if sys.platform == "darwin":  # pragma: no cover - platform specific
        return Path.home() / "Library" / "Application Support" / "medsecure"
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "medsecure"


# Version 1: the tables as the first releases created them.
SCHEMA_V1 = """
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

# Version 2: a message is identified by its verified sender *and* its message id (a sender
# cannot make another sender's message vanish by reusing its id), so the inbox loses its
# UNIQUE(message_id); verification attempts are counted (a transient failure is retried a
# bounded number of times); receipts to send are queued durably per received message
# (receipts_out), and what a transport offered that is not an envelope is reported once.
INBOX_V2 = """
CREATE TABLE inbox_v2 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    envelope_id TEXT NOT NULL,
    message_id TEXT,
    kind TEXT,
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
    claimed_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0
);
INSERT INTO inbox_v2 (id, envelope_id, message_id, kind, status, sender_idnps, received_at,
    envelope, plaintext, sender, sender_key, reason, read_at, receipts, claimer, claimed_at)
  SELECT id, envelope_id, message_id,
    CASE WHEN status IN ('receipt', 'receipt-ignored') THEN 'receipt' ELSE 'message' END,
    status, sender_idnps, received_at, envelope, plaintext, sender, sender_key, reason,
    read_at, receipts, claimer, claimed_at FROM inbox;
DROP TABLE inbox;
ALTER TABLE inbox_v2 RENAME TO inbox;
CREATE INDEX inbox_envelope ON inbox (envelope_id);
CREATE INDEX inbox_message ON inbox (sender_idnps, message_id);
CREATE INDEX inbox_status ON inbox (status);
CREATE TABLE receipts_out (
    inbox_id INTEGER NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    state TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (inbox_id, status)
);
INSERT OR IGNORE INTO receipts_out (inbox_id, status, reason, state, at)
  SELECT i.id, s.status, NULL, 'sent', s.at FROM sent_receipts s
  JOIN inbox i ON i.message_id = s.message_id;
DROP TABLE sent_receipts;
CREATE TABLE ignored (
    source TEXT NOT NULL,
    handle TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (source, handle)
);
ALTER TABLE receipts ADD COLUMN source TEXT NOT NULL DEFAULT 'signed';
"""


def _script(sql: str) -> Any:
    def step(db: sqlite3.Connection) -> None:
        for statement in sql.split(";"):
            if statement.strip():
                db.execute(statement)

    return step


# Version 3: a delivery may carry its own payload file instead of the message's envelope (an
# MSSanté message for a recipient without a medsecure key, sent over TLS only).
PAYLOAD_V3 = """
ALTER TABLE deliveries ADD COLUMN payload TEXT;
"""

# Version 4: what ended a delivery, when an unsigned report did (a mail DSN/MDN, a relay's
# "expired"): a signed receipt from the recipient outranks it.
ENDED_BY_V4 = """
ALTER TABLE deliveries ADD COLUMN ended_by TEXT;
"""

# Version 5: why endpoints were skipped for the next one (a JSON list of one-line reasons, one
# per refusal: a wrong relay URL...), kept when a later endpoint takes the message.
SKIPPED_V5 = """
ALTER TABLE deliveries ADD COLUMN skipped TEXT;
"""

MIGRATIONS = (
    _script(SCHEMA_V1),
    _script(INBOX_V2),
    _script(PAYLOAD_V3),
    _script(ENDED_BY_V4),
    _script(SKIPPED_V5),
)


def _read_only(path: Path) -> bool:
    try:
        if hasattr(os, "statvfs") and os.statvfs(path).f_flag & os.ST_RDONLY:
            return True
        return not os.access(path, os.W_OK)
    except OSError:
        return False


class Store(Database):
    """SQLite state under ``home`` (``medsecure.sqlite``), plus its envelope folders."""

    def __init__(self, home: Path, *, busy_timeout: float = 10.0) -> None:
        self.home = home
        self.outbox_dir = home / "outbox"
        self.inbox_dir = home / "inbox"
        self.quarantine_dir = home / "quarantine"
        try:
            for d in (home, self.outbox_dir, self.inbox_dir, self.quarantine_dir):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create the medsecure home {str(home)!r}: {exc.strerror}"
            ) from exc
        if _read_only(home):
            raise StorageError(f"the medsecure home {str(home)!r} is read-only")
        super().__init__(
            home / "medsecure.sqlite",
            migrations=MIGRATIONS,
            busy_timeout=busy_timeout,
            what="the medsecure database",
        )

    def recover(self, *, min_age: float = 600.0) -> int:
        """Remove what a crash may have left: temporary files and envelopes no row references,
        once older than ``min_age`` seconds (younger ones may belong to a send in progress in
        another process). Returns how many files were removed."""
        removed = 0
        cutoff = time.time() - min_age
        known_out = {r["envelope"] for r in self.query("SELECT envelope FROM outbox")}
        known_out.update(
            r["payload"]
            for r in self.query("SELECT payload FROM deliveries WHERE payload IS NOT NULL")
        )
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
                        if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                            os.unlink(entry.path)
                            removed += 1
        return removed

    @staticmethod
    def now() -> float:
        return time.time()
