"""One SQLite helper for everything medsecure keeps in SQLite (the client's store, the trust
pins, the directory cache): how a database is opened, how a write transaction is run, how its
schema evolves, and how sqlite3's errors become a :class:`~medsecure.StorageError` that says
what to do.

Every database is in WAL mode with ``synchronous=FULL`` by default, so a committed transaction
survives a power cut; :meth:`Database.transaction` can commit one with ``synchronous=NORMAL``
where losing it only repeats idempotent work. Write transactions are ``BEGIN IMMEDIATE``: the
write lock is taken first, so two processes never both read a state and then both act on it.
The file is made 0600: what medsecure writes about messages is for its owner only.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ._errors import StorageError

__all__ = ["Database", "explain"]

Migration = Callable[[sqlite3.Connection], None]


def explain(exc: sqlite3.Error, what: str = "the medsecure database") -> str:
    """A message for a sqlite3 error that names the cause a user can act on."""
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return f"{what} is locked by another process (try again)"
    if "readonly" in text or "read-only" in text:
        return f"{what} is read-only"
    if "full" in text:
        return f"the disk holding {what} is full"
    if "disk i/o" in text:
        return f"disk I/O error on {what} (disk full or failing?)"
    if "unable to open" in text:
        return f"cannot open {what} (is its folder missing or read-only?)"
    if "malformed" in text or "not a database" in text:
        return f"{what} is damaged"
    return f"database error in {what}: {exc}"


class Database:
    """A SQLite database file with medsecure's settings and a versioned schema.

    ``migrations[i]`` brings the schema from version ``i`` to ``i + 1`` (version 0 is an empty
    file); they run in one transaction when the database is opened, so a newer medsecure
    upgrades an older home in place and an interrupted upgrade leaves the old version intact.
    ``path=None`` is a private in-memory database (for tests and throwaway policies).
    """

    def __init__(
        self,
        path: Path | None,
        *,
        migrations: Sequence[Migration] = (),
        busy_timeout: float = 10.0,
        what: str = "the medsecure database",
    ) -> None:
        self.path = path
        self.what = what
        self._lock = threading.RLock()
        try:
            self.db = sqlite3.connect(
                ":memory:" if path is None else str(path),
                timeout=busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            self.db.row_factory = sqlite3.Row
            if path is not None:
                self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise StorageError(explain(exc, what)) from exc
        if path is not None:
            with contextlib.suppress(OSError):
                os.chmod(path, 0o600)
        if migrations:
            self._migrate(migrations)

    def _migrate(self, migrations: Sequence[Migration]) -> None:
        with self.transaction() as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > len(migrations):
                raise StorageError(
                    f"{self.what} was written by a newer medsecure (schema {version}): upgrade"
                )
            for step in range(version, len(migrations)):
                migrations[step](db)
            if version != len(migrations):
                db.execute(f"PRAGMA user_version = {len(migrations)}")

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction; ``durable=False`` commits with ``synchronous=NORMAL``."""
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
                raise StorageError(explain(exc, self.what)) from exc

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Run a read query and return every row."""
        with self._lock:
            try:
                return self.db.execute(sql, tuple(args)).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(explain(exc, self.what)) from exc

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self.db.close()
