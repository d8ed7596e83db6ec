"""Storage backends of the relay server: embedded SQLite + files, or PostgreSQL."""

from ._base import Storage, StoredMessage
from ._sqlite import SQLiteStorage

__all__ = ["SQLiteStorage", "Storage", "StoredMessage", "open_storage"]


def open_storage(*, data: str | None = None, database: str | None = None) -> Storage:
    """SQLite storage in the folder ``data``, or PostgreSQL at the ``database`` URL."""
    if database:
        from ._postgres import PostgresStorage

        return PostgresStorage(database)
    if not data:
        raise ValueError("give a data folder or a PostgreSQL URL")
    return SQLiteStorage(data)
