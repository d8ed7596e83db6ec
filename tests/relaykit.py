"""A real relay server for tests: ``medsecure relay serve`` in a subprocess on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

MAIN = "import sys; from medsecure.cli import main; sys.exit(main())"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", MAIN, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


class RelayServer:
    """One relay process; ``restart()`` keeps its port and storage."""

    def __init__(
        self,
        log: Path,
        *,
        data: Path | None = None,
        database: str | None = None,
        args: tuple[str, ...] = (),
        port: int | None = None,
        tls: tuple[str, str] | None = None,
        ca: str | None = None,
    ) -> None:
        self.log = log
        self.data = data
        self.database = database
        self.args = args
        self.port = port or free_port()
        self.tls = tls
        self.ca = ca
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-c", MAIN, "relay", "serve", "--port", str(self.port)]
        if self.data is not None:
            cmd += ["--data", str(self.data)]
        if self.database is not None:
            cmd += ["--database", self.database]
        if self.tls:
            cmd += ["--tls-cert", self.tls[0], "--tls-key", self.tls[1]]
        return cmd + list(self.args)

    def start(self, timeout: float = 60) -> RelayServer:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=self.ca) if self.ca else True
        )
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the relay exited: {self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/v1/health", timeout=2, verify=verify).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the relay did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        """kill -9."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> RelayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def seal_for(sender, recipient, text: bytes = b"compte rendu", name: str = "cr.txt") -> bytes:
    import medsecure as m

    return m.seal(text, sender=sender, recipients=[recipient.public])


def message_id() -> str:
    import datetime as dt

    from medsecure.envelope._message import new_message_id

    return new_message_id(dt.datetime.now(dt.UTC))


def signed_upload(sender, recipient, base: str) -> tuple[str, bytes, dict[str, str]]:
    """A new upload from ``sender`` to ``recipient``'s mailbox on the relay at ``base``: its
    URL, a sealed envelope and the signed headers (one nonce: sending them twice is a replay)."""
    import hashlib

    from medsecure.relay import sign_request

    url = f"{base}/v1/mailboxes/{recipient.fingerprint}/messages/{message_id()}"
    body = seal_for(sender, recipient, b"resultats")
    return url, body, sign_request(sender, "PUT", url, hashlib.sha256(body).digest())


class SyncDriver:
    """The sync transport behind the interface the shared tests use."""

    kind = "sync"

    def __init__(self, identity, url, **kw) -> None:
        from medsecure.transports import RelayTransport

        self.t = RelayTransport(identity, url, **kw)

    def deliver(self, endpoint, data, message_id) -> None:
        import io

        self.t.deliver(endpoint, io.BytesIO(data), message_id=message_id, size=len(data))

    def deliver_file(self, endpoint, fh, message_id, size) -> None:
        self.t.deliver(endpoint, fh, message_id=message_id, size=size)

    def list(self):
        return list(self.t.list())

    def fetch(self, item) -> bytes:
        with self.t.fetch(item) as fh:
            return fh.read()

    def acknowledge(self, item) -> None:
        self.t.acknowledge(item)

    def upload_states(self, ids, **kw):
        return list(self.t.upload_states(ids, **kw))

    def find_keys(self, **kw):
        return list(self.t.find_keys(**kw))

    def endpoint(self):
        return self.t.endpoint()

    def close(self) -> None:
        self.t.close()


class AsyncDriver:
    """The async transport, driven from a blocking portal, behind the same interface."""

    kind = "async"

    def __init__(self, identity, url, **kw) -> None:
        import anyio.from_thread

        from medsecure.transports import AsyncRelayTransport

        self._cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._cm.__enter__()
        if "client" in kw and kw["client"] is None:
            del kw["client"]
        if "sleep" in kw:
            recorder = kw["sleep"]

            async def asleep(s: float) -> None:
                recorder(s)

            kw["sleep"] = asleep

        async def make():
            return AsyncRelayTransport(identity, url, **kw)

        self.t = self.portal.call(make)

    def deliver(self, endpoint, data, message_id) -> None:
        import io

        self.portal.call(
            lambda: self.t.deliver(
                endpoint, io.BytesIO(data), message_id=message_id, size=len(data)
            )
        )

    def deliver_file(self, endpoint, fh, message_id, size) -> None:
        self.portal.call(lambda: self.t.deliver(endpoint, fh, message_id=message_id, size=size))

    def list(self):
        return list(self.portal.call(self.t.list))

    def fetch(self, item) -> bytes:
        async def go() -> bytes:
            out = bytearray()
            async with self.t.fetch(item) as dl:
                async for chunk in dl:
                    out += chunk
            return bytes(out)

        return self.portal.call(go)

    def acknowledge(self, item) -> None:
        self.portal.call(self.t.acknowledge, item)

    def upload_states(self, ids, **kw):
        return list(self.portal.call(lambda: self.t.upload_states(ids, **kw)))

    def find_keys(self, **kw):
        return list(self.portal.call(lambda: self.t.find_keys(**kw)))

    def endpoint(self):
        return self.t.endpoint()

    def close(self) -> None:
        self.portal.call(self.t.aclose)
        self._cm.__exit__(None, None, None)


DRIVERS = {"sync": SyncDriver, "async": AsyncDriver}


class RoundRobinProxy:
    """A TCP load balancer on loopback (what a reverse proxy does in front of several relay
    instances): each new connection goes to the next backend that accepts it."""

    def __init__(self, ports: list[int], port: int | None = None) -> None:
        import threading

        self.ports = ports
        self.port = port or free_port()
        self._next = 0
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _backend(self) -> socket.socket | None:
        for _ in range(len(self.ports)):
            port = self.ports[self._next % len(self.ports)]
            self._next += 1
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:
                continue
        return None

    def _serve(self) -> None:
        import threading

        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            backend = self._backend()
            if backend is None:
                client.close()
                continue
            backend.settimeout(None)
            client.settimeout(None)
            for a, b in ((client, backend), (backend, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(5)
