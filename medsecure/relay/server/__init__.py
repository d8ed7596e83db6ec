"""The reference relay server (extra ``relay``): a Starlette app served by uvicorn.

``medsecure relay serve --host 127.0.0.1 --port 8443 --data DIR`` runs it on the embedded
storage (SQLite + files); ``--database postgresql://…`` runs one of several stateless instances
over PostgreSQL. See docs/relay.md for the protocol, deployment, TLS and the PostgreSQL choices.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any

from ._app import create_app, sweep
from ._config import RelayConfig, default_public_urls
from ._observe import JsonFormatter, event
from .storage import SQLiteStorage, Storage, open_storage

__all__ = [
    "RelayConfig",
    "SQLiteStorage",
    "Storage",
    "create_app",
    "default_public_urls",
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
    """Run a relay until interrupted (blocking).

    Without ``config.public_urls`` the relay answers for the address it listens on (and, on
    loopback, for every loopback name of it: see :func:`._config.default_public_urls`); behind
    a reverse proxy, or listening on every interface, give the URL clients use."""
    import uvicorn

    cfg = config or RelayConfig()
    if not cfg.public_urls:
        cfg = dataclasses.replace(
            cfg, public_urls=default_public_urls(host, port, tls=tls_cert is not None)
        )
    _logging(log_level)
    event("public-urls", urls=list(cfg.public_urls))
    storage = open_storage(data=data, database=database, bodies=bodies)
    try:
        app = create_app(storage, cfg)
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
