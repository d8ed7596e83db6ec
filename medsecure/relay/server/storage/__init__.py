"""Storage backends of the relay server: embedded SQLite + files, or PostgreSQL (bodies in large
objects or in a shared folder)."""

from ...._errors import ConfigError
from ._base import Storage, StoredMessage
from ._sqlite import SQLiteStorage

__all__ = ["SQLiteStorage", "Storage", "StoredMessage", "open_storage"]


def open_storage(
    *, data: str | None = None, database: str | None = None, bodies: str | None = None
) -> Storage:
    """SQLite storage in the folder ``data``, or PostgreSQL at the ``database`` URL (large
    bodies in ``bodies``, a folder shared by every instance, or else in large objects)."""
    if database:
        try:
            from ._postgres import PostgresStorage
        except ImportError as exc:
            raise ConfigError(
                "a PostgreSQL database needs the 'postgres' extra:"
                " pip install 'medsecure[postgres]'"
            ) from exc
        return PostgresStorage(database, bodies=bodies)
    if bodies:
        raise ValueError("a bodies folder goes with a PostgreSQL database")
    if not data:
        raise ValueError("give a data folder or a PostgreSQL URL")
    return SQLiteStorage(data)
