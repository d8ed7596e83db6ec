"""The reference relay server (extra ``relay``): a Starlette app served by uvicorn.

``medsecure relay serve --host 127.0.0.1 --port 8443 --data DIR`` runs it on the embedded
storage (SQLite + files); ``--database postgresql://…`` runs one of several stateless instances
over PostgreSQL. See docs/relay.md for the protocol, deployment, TLS and the PostgreSQL choices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

from ..._errors import ConfigError
from ..._fs import os_reason
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
    a reverse proxy, or listening on every interface, give the URL clients use.

    Raises :class:`~medsecure.ConfigError` before anything starts when the address cannot be
    listened on (the port taken, say) or a TLS file cannot be read. A SIGINT or SIGTERM stops
    it gracefully (open requests are given 10 s) and it returns normally."""
    cfg = config or RelayConfig()
    if not cfg.public_urls:
        cfg = dataclasses.replace(
            cfg, public_urls=default_public_urls(host, port, tls=tls_cert is not None)
        )
    for what, path in (("certificate", tls_cert), ("private key", tls_key)):
        if path is not None:
            try:
                with open(path, "rb") as fh:
                    fh.read(1)
            except OSError as exc:
                raise ConfigError(f"cannot read the TLS {what} file: {os_reason(exc)}") from None
    _check_listen(host, port)
    _logging(log_level)
    storage = open_storage(data=data, database=database, bodies=bodies)
    try:
        event("public-urls", urls=list(cfg.public_urls))
        app = create_app(storage, cfg)
        server = _server(
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
        try:
            server.run()
        except SystemExit:
            if server.started:
                raise
            # uvicorn logged why (the port taken since _check_listen, say) and exits
            raise ConfigError(f"the relay could not start on {host} port {port}") from None
        event("stopped", signals=[signal.Signals(sig).name for sig in server.stopped_by])
    finally:
        storage.close()


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _check_listen(host: str, port: int) -> None:
    """Refuse, with one clear line, an address the relay could not listen on (uvicorn would
    log it and exit once the storage is open)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"--host: cannot listen on {host!r}: unknown address") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                why = "the port is already in use"
            elif exc.errno == errno.EADDRNOTAVAIL:
                why = "no such address on this machine"
            elif exc.errno == errno.EACCES:
                why = "permission denied (ports below 1024 need privileges)"
            else:
                why = os_reason(exc)
            raise ConfigError(f"cannot listen on {host} port {port}: {why}") from None


def _server(config: Any) -> Any:
    """uvicorn's server, except for what a signal does at the end: uvicorn shuts down
    gracefully on SIGINT or SIGTERM, then raises the signal again for whatever handler was
    there before it. For the relay a stop that was asked for is a clean exit (status 0, what
    service managers expect of SIGTERM), so the signal is recorded in ``stopped_by``, not
    raised again."""
    import uvicorn

    class Server(uvicorn.Server):
        stopped_by: list[int]

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            self.stopped_by = []
            if threading.current_thread() is not threading.main_thread():
                yield  # signals reach the main thread only (a server run from a thread)
                return
            previous = {sig: signal.signal(sig, self._stop) for sig in _STOP_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def _stop(self, sig: int, frame: object) -> None:
            self.stopped_by.append(sig)
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for open requests
            self.should_exit = True

    return Server(config)


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
