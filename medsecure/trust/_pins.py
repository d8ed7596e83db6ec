"""Pin storage for key continuity: which keys were accepted for which practitioner, and when.

The only I/O of the trust package. The rules that decide when a pin may be added or moved live in
:mod:`medsecure.trust._policies`; this module only stores and reads rows, each change in one
SQLite transaction so that a crash never leaves a practitioner with no pin after a rotation.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from .._errors import StorageError
from ._statements import _from_ts, _ts

__all__ = ["PinStore"]


class PinStore:
    """Pinned keys per practitioner (key continuity), in SQLite (or in memory with ``path=None``)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self._lock = threading.Lock()
        target = ":memory:" if path is None else str(path)
        try:
            self._db = sqlite3.connect(
                target, check_same_thread=False, timeout=10, isolation_level=None
            )
            if path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS pins (idnps TEXT NOT NULL, fingerprint TEXT NOT NULL,"
                " pinned_at INTEGER NOT NULL, PRIMARY KEY (idnps, fingerprint))"
            )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the pin store {target!r}: {exc}") from exc

    def pinned(self, idnps: str) -> dict[str, dt.datetime]:
        """Fingerprints pinned for ``idnps`` with the time each was pinned."""
        with self._lock, self._guard():
            rows = self._db.execute(
                "SELECT fingerprint, pinned_at FROM pins WHERE idnps = ?", (idnps,)
            ).fetchall()
        return {fp: _from_ts(at) for fp, at in rows}

    def pin(
        self, idnps: str, fingerprint: str, at: dt.datetime, *, replace: str | None = None
    ) -> None:
        """Pin ``fingerprint`` for ``idnps``; with ``replace``, unpin that key in the same commit."""
        with self._lock, self._guard():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if replace is not None:
                    self._db.execute(
                        "DELETE FROM pins WHERE idnps = ? AND fingerprint = ?", (idnps, replace)
                    )
                self._db.execute(
                    "INSERT OR REPLACE INTO pins VALUES (?, ?, ?)", (idnps, fingerprint, _ts(at))
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def unpin(self, idnps: str, fingerprint: str | None = None) -> None:
        """Forget one pinned key (or all of a practitioner's), e.g. after checking a new key."""
        with self._lock, self._guard():
            if fingerprint is None:
                self._db.execute("DELETE FROM pins WHERE idnps = ?", (idnps,))
            else:
                self._db.execute(
                    "DELETE FROM pins WHERE idnps = ? AND fingerprint = ?", (idnps, fingerprint)
                )

    def close(self) -> None:
        """Close the database (pins already written are durable)."""
        self._db.close()

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StorageError(f"pin store failure: {exc}") from exc
