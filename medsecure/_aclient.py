"""``AsyncClient``: the same client for asyncio programs, driving the same rules.

    async with medsecure.AsyncClient.from_home("martin", passphrase=…) as client:
        # or AsyncClient(identity, directory, transport, home, trust=policy, me="rpps:…")
        result = await client.send(Document.from_path("cr.pdf"), to="rpps:10000000017")
        for message in await client.receive():
            ...
            await client.ack(message)

Theory of operation
-------------------
Everything a client does between two network operations is disk and crypto work: sealing and
opening envelopes, fsyncs, SQLite transactions, the audit log. ``AsyncClient`` runs all of it on
one worker thread of its own, through the very same outbox, inbox and receipt rules as
:class:`~medsecure.Client` (it drives a ``Client``), so the event loop is never blocked for
longer than it takes to hand a call over. Work is serialised on that thread, as a ``Client``
serialises it with its lock.

Transports may be synchronous (:class:`~medsecure.transports.Transport`: they run on the worker
thread) or asynchronous (:class:`~medsecure.transports.AsyncTransport`, e.g. the relay's
``AsyncRelayTransport``: their coroutines run on the caller's event loop, and the worker thread
waits for them). One test suite runs against both clients (tests/test_clients_both.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Concatenate, ParamSpec, TypeVar

from ._client import Client
from ._closing import AsyncClosing
from ._errors import TransportError
from ._identity import Identity
from ._results import (
    ReceivedMessage,
)
from .directory import Directory
from .models import Endpoint
from .transports import AsyncTransport, Incoming, Transport
from .trust import TrustPolicy

__all__ = ["AsyncClient"]

P = ParamSpec("P")
T = TypeVar("T")


class _Bridge(Transport):
    """A synchronous face of an :class:`AsyncTransport`, used on the worker thread: each call
    runs the coroutine on the client's event loop and waits for its result."""

    def __init__(self, inner: AsyncTransport, loop: Callable[[], asyncio.AbstractEventLoop]):
        self.inner = inner
        self._loop = loop

    @property
    def name(self) -> str:
        return self.inner.name

    def accepts(self, endpoint: Endpoint) -> bool:
        return self.inner.accepts(endpoint)

    def _wait(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop()).result()

    def deliver(
        self, endpoint: Endpoint, envelope: BinaryIO, *, message_id: str, size: int
    ) -> None:
        self._wait(self.inner.deliver(endpoint, envelope, message_id=message_id, size=size))

    def list(self) -> Sequence[Incoming]:
        return list(self._wait(self.inner.list()))

    def fetch(self, item: Incoming) -> BinaryIO:
        folder = Path(tempfile.mkdtemp(prefix="medsecure-fetch-"))
        try:
            self.take(item, folder / "envelope")
            return (folder / "envelope").open("rb")  # stays readable once unlinked (POSIX)
        finally:
            with contextlib.suppress(OSError):
                (folder / "envelope").unlink()
            with contextlib.suppress(OSError):
                folder.rmdir()

    def take(self, item: Incoming, target: Path) -> None:
        self._wait(self.inner.take(item, target))

    def acknowledge(self, item: Incoming) -> None:
        self._wait(self.inner.acknowledge(item))

    def poll(self, endpoint: Endpoint, message_ids: Sequence[str]) -> dict[str, str]:
        return dict(self._wait(self.inner.poll(endpoint, message_ids)))


def _awaitable(
    method: Callable[Concatenate[Client, P], T], note: str = ""
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]:
    """The :class:`AsyncClient` method that runs ``method`` of its client on the worker thread:
    the same parameters, the same result, awaitable."""

    async def run(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._run(lambda: method(self._client, *args, **kwargs))

    functools.update_wrapper(run, method, assigned=(), updated=())  # help() shows its parameters
    name = method.__name__
    run.__name__ = name
    run.__qualname__ = f"AsyncClient.{name}"
    run.__doc__ = f":meth:`Client.{name}`, awaitable. {note}".rstrip()
    return run


class AsyncClient(AsyncClosing):
    """Send and receive health documents from asyncio code (see the module docstring).

    Takes the arguments of :class:`~medsecure.Client`; ``transport`` may mix synchronous and
    asynchronous transports. Every method of ``Client`` is here, awaitable."""

    def __init__(
        self,
        identity: Identity,
        directory: Directory,
        transport: Transport | AsyncTransport | Sequence[Transport | AsyncTransport],
        home: str | os.PathLike[str] | None = None,
        *,
        trust: TrustPolicy | None = None,
        me: str | None = None,
        **options: Any,
    ) -> None:
        given = (
            [transport] if isinstance(transport, (Transport, AsyncTransport)) else list(transport)
        )
        if not given or not all(isinstance(t, (Transport, AsyncTransport)) for t in given):
            raise TypeError("transport must be a Transport, an AsyncTransport or a list of them")
        transports = [
            t if isinstance(t, Transport) else _Bridge(t, self._event_loop) for t in given
        ]
        self._start(
            lambda: Client(identity, directory, transports, home, trust=trust, me=me, **options)
        )

    def _start(self, make: Callable[[], Client]) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="medsecure-async"
        )
        # The client (its SQLite connection and audit log) is created and used on the worker
        # thread only.
        try:
            self._client: Client = self._executor.submit(make).result()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    @classmethod
    def from_home(
        cls, home: str | os.PathLike[str] | None = None, *, passphrase: str | bytes | None = None
    ) -> AsyncClient:
        """The asyncio twin of :func:`medsecure.client_from_home`: the same home folder
        (``medsecure init``'s), its keys, directory, transports, trust policy and pins.

        The home's transports are synchronous ones; they run on the worker thread.
        """
        from ._home import client_from_home  # _home builds on the client modules

        self = cls.__new__(cls)
        self._start(lambda: client_from_home(home, passphrase=passphrase))
        return self

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("AsyncClient is used outside of its event loop")
        return self._loop

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("an AsyncClient is bound to the event loop that first used it")
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    @property
    def client(self) -> Client:
        """The synchronous client this one drives (use it only from the worker's side)."""
        return self._client

    @property
    def unreachable(self) -> tuple[tuple[str, str], ...]:
        """The mailboxes the last :meth:`receive` could not read: (transport name, reason)."""
        return self._client.unreachable

    @property
    def mailbox_errors(self) -> tuple[tuple[str, TransportError], ...]:
        """The errors behind :attr:`unreachable` (see :attr:`Client.mailbox_errors`)."""
        return self._client.mailbox_errors

    @property
    def home(self) -> Path:
        return self._client.home

    # -- the methods of Client, awaitable (derived from Client's, so they cannot drift) -----
    send = _awaitable(Client.send, "``progress`` is called from the worker thread.")
    receive = _awaitable(
        Client.receive,
        "Acknowledge with :meth:`ack` (``message.ack()`` works too, but runs its small disk "
        "work on the calling thread).",
    )
    flush = _awaitable(Client.flush)
    outbox = _awaitable(Client.outbox)
    status = _awaitable(Client.status)
    events = _awaitable(Client.events)
    expire = _awaitable(Client.expire)
    quarantine = _awaitable(Client.quarantine)
    release = _awaitable(Client.release)

    async def ack(self, message: ReceivedMessage) -> None:
        """:meth:`ReceivedMessage.ack`, on the worker thread."""
        await self._run(message.ack)

    async def mark_read(self, message: ReceivedMessage) -> None:
        """:meth:`ReceivedMessage.mark_read`, on the worker thread."""
        await self._run(message.mark_read)

    async def reject(self, message: ReceivedMessage, reason: str = "other") -> None:
        """:meth:`ReceivedMessage.reject`, on the worker thread."""
        await self._run(message.reject, reason)

    # -- lifetime --------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Checkpoint the audit log and close the store (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._run(self._client.close)
        finally:
            self._executor.shutdown(wait=False)
