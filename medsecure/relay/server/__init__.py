"""The reference relay server (extra ``relay``): a Starlette app served by uvicorn.

``medsecure relay serve --host 127.0.0.1 --port 8443 --data DIR`` runs it on the embedded
storage (SQLite + files); ``--database postgresql://…`` runs one of several stateless instances
over PostgreSQL. See docs/relay.md for the protocol, deployment, TLS and the PostgreSQL choices.
"""

from __future__ import annotations

import logging
import sys

from ._app import create_app, sweep
from ._config import RelayConfig
from ._observe import JsonFormatter
from .storage import SQLiteStorage, Storage, open_storage

__all__ = [
    "RelayConfig",
    "SQLiteStorage",
    "Storage",
    "create_app",
    "open_storage",
    "serve",
    "sweep",
]


def _logging(level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("medsecure.relay", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8443,
    data: str | None = None,
    database: str | None = None,
    config: RelayConfig | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    forwarded_allow_ips: str | None = None,
    log_level: int = logging.INFO,
) -> None:
    """Run a relay until interrupted (blocking)."""
    import uvicorn

    _logging(log_level)
    storage = open_storage(data=data, database=database)
    try:
        app = create_app(storage, config)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                ssl_certfile=tls_cert,
                ssl_keyfile=tls_key,
                log_config=None,
                access_log=False,
                proxy_headers=forwarded_allow_ips is not None,
                forwarded_allow_ips=forwarded_allow_ips,
                timeout_graceful_shutdown=10,
            )
        )
        server.run()
    finally:
        storage.close()
