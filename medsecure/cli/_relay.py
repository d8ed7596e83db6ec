"""``medsecure relay serve | sweep``: run the reference relay server (extra ``relay``)."""

from __future__ import annotations

import time
from typing import Any

import click

from ._app import CliError, cli, load_public


def _server() -> Any:
    try:
        from ..relay import server
    except ImportError as exc:
        raise CliError(
            "the relay server needs the 'relay' extra: pip install 'medsecure[relay]'"
            " (and 'medsecure[postgres]' for --database)"
        ) from exc
    return server


def _storage_options(f: Any) -> Any:
    f = click.option(
        "--bodies",
        type=click.Path(file_okay=False),
        help="With --database: a folder shared by every instance for large envelope bodies"
        " (default: PostgreSQL large objects).",
    )(f)
    f = click.option(
        "--database",
        metavar="URL",
        help="PostgreSQL URL (postgresql://…) for several stateless instances.",
    )(f)
    f = click.option(
        "--data",
        type=click.Path(file_okay=False),
        help="Data folder of the embedded storage (SQLite + envelope files).",
    )(f)
    return f


def _check_storage(data: str | None, database: str | None, bodies: str | None) -> None:
    if bool(data) == bool(database):
        raise CliError("give exactly one of --data DIR and --database URL")
    if bodies and not database:
        raise CliError("--bodies DIR goes with --database URL")


@cli.group()
def relay() -> None:
    """Run a medsecure relay (store-and-forward of envelopes)."""


@relay.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8443,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Port to listen on.",
)
@_storage_options
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="TLS certificate chain (PEM).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="TLS private key (PEM).")
@click.option(
    "--max-envelope-mib",
    default=2048,
    show_default=True,
    type=click.IntRange(1),
    help="Largest envelope.",
)
@click.option(
    "--mailbox-quota-mib",
    default=20480,
    show_default=True,
    type=click.IntRange(1),
    help="Bytes that may wait in one mailbox.",
)
@click.option("--rate", default=20.0, show_default=True, type=float, help="Requests/s per caller.")
@click.option(
    "--burst", default=200, show_default=True, type=click.IntRange(1), help="Burst per caller."
)
@click.option(
    "--retention-days",
    default=90,
    show_default=True,
    type=click.IntRange(1, 365),
    help="Days an envelope waits for collection before it is deleted.",
)
@click.option(
    "--signature-window",
    default=60,
    show_default=True,
    type=click.IntRange(1, 3600),
    help="Seconds a request's signature time may differ from the server's clock.",
)
@click.option(
    "--authority",
    "authorities",
    multiple=True,
    help="Accept only senders vouched for by this authority (public key or file); repeatable.",
)
@click.option(
    "--public-url",
    "public_urls",
    multiple=True,
    metavar="URL",
    help="A URL clients reach this relay by (https://relay.example); requests signed for any"
    " other host are refused. Repeatable. Default: the address it listens on (on loopback, also"
    " localhost). Required behind a reverse proxy or with --host 0.0.0.0.",
)
@click.option(
    "--forwarded-allow-ips",
    help="Trust X-Forwarded-* from these proxy addresses (behind a reverse proxy).",
)
@click.option(
    "--body-timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(0, 86400, min_open=True),
    help="Seconds an upload's body may send nothing before it is abandoned (408).",
)
@click.option("--sweep-interval", default=60.0, type=float, hidden=True)
def serve(
    host: str,
    port: int,
    data: str | None,
    database: str | None,
    bodies: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    max_envelope_mib: int,
    mailbox_quota_mib: int,
    rate: float,
    burst: int,
    retention_days: int,
    signature_window: int,
    authorities: tuple[str, ...],
    public_urls: tuple[str, ...],
    forwarded_allow_ips: str | None,
    body_timeout: float,
    sweep_interval: float,
) -> None:
    """Serve the relay until stopped (structured logs on stderr). SIGTERM or Ctrl-C stops it
    gracefully, giving open requests 10 s, and it exits with status 0."""
    _check_storage(data, database, bodies)
    if bool(tls_cert) != bool(tls_key):
        raise CliError("--tls-cert and --tls-key go together")
    server = _server()
    try:
        config = server.RelayConfig(
            max_envelope_bytes=max_envelope_mib << 20,
            mailbox_quota_bytes=mailbox_quota_mib << 20,
            rate_per_second=rate,
            rate_burst=burst,
            retention_days=retention_days,
            signature_window=signature_window,
            authorities=tuple(load_public(a, "--authority") for a in authorities),
            sweep_interval=sweep_interval,
            body_timeout=body_timeout,
            public_urls=public_urls
            or server.default_public_urls(host, port, tls=tls_cert is not None),
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    server.serve(
        host=host,
        port=port,
        data=data,
        database=database,
        bodies=bodies,
        config=config,
        tls_cert=tls_cert,
        tls_key=tls_key,
        forwarded_allow_ips=forwarded_allow_ips,
    )


@relay.command()
@_storage_options
@click.option("--retention-days", default=90, show_default=True, type=click.IntRange(1, 365))
@click.option(
    "--as-of",
    type=int,
    help="Unix time to sweep as of (default: now; for tests and catching up).",
)
def sweep(
    data: str | None,
    database: str | None,
    bodies: str | None,
    retention_days: int,
    as_of: int | None,
) -> None:
    """Expire envelopes not collected within the retention time, once (servers also do it
    periodically)."""
    import anyio

    _check_storage(data, database, bodies)
    server = _server()
    storage = server.open_storage(data=data, database=database, bodies=bodies)
    try:
        config = server.RelayConfig(retention_days=retention_days)
        count = anyio.run(
            lambda: server.sweep(
                storage, config, now=as_of if as_of is not None else int(time.time())
            )
        )
    finally:
        storage.close()
    click.echo(f"expired: {count}")
