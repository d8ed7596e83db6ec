"""An httpx transport whose every socket operation respects one deadline per directory call.

Why this exists: httpx timeouts apply to each socket operation separately, so a server that sends
one byte a second never trips a 10-second read timeout, and a response (its status line and
headers as much as its body) can take hours. :class:`FhirDirectory` sets a deadline for a whole
call (:func:`deadline`); this transport gives each connect, TLS handshake, read and write at most
the time left before it, and fails the operation once it has passed. Bodies are also checked
against the deadline while they stream, in ``_fhir.py``, so that a caller-supplied
``httpx.Client`` (without this transport) still gets a bounded call, only more coarsely: there,
the status line and headers are bounded by the per-read timeout alone.

httpcore does the HTTP work; this module only wraps its network streams (public httpcore API:
``NetworkBackend``, ``NetworkStream``, ``ConnectionPool(network_backend=…)``) and turns httpcore
errors into the httpx ones :class:`FhirDirectory` already translates.
"""

from __future__ import annotations

import contextlib
import contextvars
import ssl
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpcore
import httpx

__all__ = ["DeadlineTransport", "deadline", "uses_env_proxy"]

_DEADLINE: contextvars.ContextVar[tuple[float, Callable[[], float]] | None] = (
    contextvars.ContextVar("medsecure_directory_deadline", default=None)
)


@contextlib.contextmanager
def deadline(at: float, clock: Callable[[], float]) -> Iterator[None]:
    """Within this block, network operations of a :class:`DeadlineTransport` on this thread
    (or task) end by ``at`` on ``clock``."""
    token = _DEADLINE.set((at, clock))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _bounded(timeout: float | None, expired: type[httpcore.TimeoutException]) -> float | None:
    limit = _DEADLINE.get()
    if limit is None:
        return timeout
    at, clock = limit
    remaining = at - clock()
    if remaining <= 0:
        raise expired("the directory call's deadline has passed")
    return remaining if timeout is None else min(timeout, remaining)


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(
            ssl_context, server_hostname, _bounded(timeout, httpcore.ConnectTimeout)
        )
        return _Stream(inner)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(
            host,
            port,
            _bounded(timeout, httpcore.ConnectTimeout),
            local_address=local_address,
            socket_options=socket_options,
        )
        return _Stream(stream)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_unix_socket(
            path, _bounded(timeout, httpcore.ConnectTimeout), socket_options=socket_options
        )
        return _Stream(stream)


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    # FhirDirectory tells timeouts from other transport failures; nothing finer is needed.
    try:
        yield
    except httpcore.TimeoutException as exc:
        raise httpx.TimeoutException(str(exc) or type(exc).__name__) from exc
    except httpcore.ProtocolError as exc:
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__) from exc
    except (httpcore.NetworkError, httpcore.UnsupportedProtocol, httpcore.ProxyError) as exc:
        raise httpx.TransportError(str(exc) or type(exc).__name__) from exc


class _Body(httpx.SyncByteStream):
    def __init__(self, inner: Iterable[bytes]) -> None:
        self._inner = inner

    def __iter__(self) -> Iterator[bytes]:
        with _translated():
            yield from self._inner

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            with _translated():
                close()


class DeadlineTransport(httpx.BaseTransport):
    """HTTP/1.1 over httpcore, each network operation bounded by the current :func:`deadline`.

    Certificates are verified with httpx's default context (``SSL_CERT_FILE``/``SSL_CERT_DIR``
    honoured). Proxies are not handled here: :func:`uses_env_proxy` tells the caller when to
    use a plain ``httpx.Client`` instead.
    """

    def __init__(self) -> None:
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=10,
            keepalive_expiry=5.0,
            network_backend=_Backend(),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not isinstance(request.stream, httpx.SyncByteStream):  # pragma: no cover - sync only
            raise TypeError("DeadlineTransport serves synchronous requests")
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _translated():
            response = self._pool.handle_request(core_request)
        if not isinstance(response.stream, Iterable):  # pragma: no cover - sync pool
            raise TypeError("unexpected asynchronous response stream")
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response.stream),
            extensions=response.extensions,
        )

    def close(self) -> None:
        with _translated():
            self._pool.close()


def uses_env_proxy(url: str) -> bool:
    """True when the environment (``HTTPS_PROXY``, ``ALL_PROXY``… minus ``NO_PROXY``) sends
    ``url`` through a proxy, as httpx's ``trust_env`` would."""
    parts = httpx.URL(url)
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(parts.host)
