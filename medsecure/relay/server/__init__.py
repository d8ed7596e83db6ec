"""The reference relay server (extra ``relay``): a Starlette app served by uvicorn.

``medsecure relay serve --host 127.0.0.1 --port 8443 --data DIR`` runs it on the embedded
storage (SQLite + files); ``--database postgresql://…`` runs one of several stateless instances
over PostgreSQL. See docs/relay.md for the protocol, deployment, TLS and the PostgreSQL choices.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

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
    "uvicorn_config",
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
    bodies: str | None = None,
    config: RelayConfig | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    forwarded_allow_ips: str | None = None,
    log_level: int = logging.INFO,
) -> None:
    """Run a relay until interrupted (blocking)."""
    import uvicorn

    _logging(log_level)
    storage = open_storage(data=data, database=database, bodies=bodies)
    try:
        app = create_app(storage, config)
        server = uvicorn.Server(
            uvicorn_config(
                app,
                host=host,
                port=port,
                ssl_certfile=tls_cert,
                ssl_keyfile=tls_key,
                proxy_headers=forwarded_allow_ips is not None,
                forwarded_allow_ips=forwarded_allow_ips,
            )
        )
        server.run()
    finally:
        storage.close()


def uvicorn_config(app: Any, *, host: str, port: int, **options: Any) -> Any:
    """The uvicorn settings the relay runs with (one process, uvicorn's default event loop and
    HTTP parser, no access log: the app logs each request itself). bench/bench_relay.py serves
    its baseline with the same settings."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        workers=1,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        **options,
    )
