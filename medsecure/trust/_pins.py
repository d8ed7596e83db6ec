"""Pin storage for key continuity: which keys were accepted for which practitioner, and when.

The only I/O of the trust package. The rules that decide when a pin may be added or moved live in
:mod:`medsecure.trust._policies`; this module only stores and reads rows, each change in one
SQLite transaction so that a crash never leaves a practitioner with no pin after a rotation.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

from .._sqlite import Database
from ._statements import _from_ts, _ts

__all__ = ["PinStore"]


def _v1(db: sqlite3.Connection) -> None:
    db.execute(
        "CREATE TABLE IF NOT EXISTS pins (idnps TEXT NOT NULL, fingerprint TEXT NOT NULL,"
        " pinned_at INTEGER NOT NULL, PRIMARY KEY (idnps, fingerprint))"
    )


class PinStore:
    """Pinned keys per practitioner (key continuity), in SQLite (or in memory with ``path=None``)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self._db = Database(
            Path(path) if path is not None else None, migrations=(_v1,), what="the pin store"
        )

    def pinned(self, idnps: str) -> dict[str, dt.datetime]:
        """Fingerprints pinned for ``idnps`` with the time each was pinned."""
        rows = self._db.query("SELECT fingerprint, pinned_at FROM pins WHERE idnps = ?", (idnps,))
        return {r["fingerprint"]: _from_ts(r["pinned_at"]) for r in rows}

    def pin(
        self, idnps: str, fingerprint: str, at: dt.datetime, *, replace: str | None = None
    ) -> None:
        """Pin ``fingerprint`` for ``idnps``; with ``replace``, unpin that key in the same commit."""
        with self._db.transaction() as db:
            if replace is not None:
                db.execute("DELETE FROM pins WHERE idnps = ? AND fingerprint = ?", (idnps, replace))
            db.execute(
                "INSERT OR REPLACE INTO pins VALUES (?, ?, ?)", (idnps, fingerprint, _ts(at))
            )

    def unpin(self, idnps: str, fingerprint: str | None = None) -> None:
        """Forget one pinned key (or all of a practitioner's), e.g. after checking a new key."""
        with self._db.transaction() as db:
            if fingerprint is None:
                db.execute("DELETE FROM pins WHERE idnps = ?", (idnps,))
            else:
                db.execute(
                    "DELETE FROM pins WHERE idnps = ? AND fingerprint = ?", (idnps, fingerprint)
                )

    def close(self) -> None:
        """Close the database (pins already written are durable)."""
        self._db.close()
