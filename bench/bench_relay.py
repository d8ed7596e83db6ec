"""Relay benchmarks: the real server (uvicorn subprocess) on each backend, against a baseline.

    python bench/bench_relay.py [--messages 2000] [--clients 16] [--big-mib 1024] [--no-postgres]

Per backend (embedded SQLite + files; PostgreSQL with large objects):

* messages/s for 10 KiB envelopes sent by ``--clients`` concurrent RelayTransport clients,
  with p50/p99 latency per delivery;
* MB/s for one ``--big-mib`` envelope uploaded then downloaded, with the server's peak RSS above
  its idle RSS (the target bound is 64 MiB);

and, in the same run, the **baseline**: the same ASGI stack (Starlette on uvicorn) receiving the
same bytes and fsyncing them to a file, then serving them back, with no medsecure logic (no
signatures, no digest, no metadata). Printed ratios are relay / baseline (target: >= 0.67).
Also the event-loop lag of AsyncRelayTransport while it uploads a 256 MiB envelope (target:
< 50 ms). Figures depend on the machine: run it when the machine is quiet.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import httpx
from relaykit import RelayServer, message_id

import medsecure as m
from medsecure.models import Endpoint
from medsecure.transports import AsyncRelayTransport, RelayTransport

FAST = ("--rate", "100000", "--burst", "1000000", "--max-envelope-mib", "4096")
MiB = 1 << 20

BASELINE = r"""
import os, sys, secrets
from starlette.applications import Starlette
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
import anyio, uvicorn

ROOT = sys.argv[2]

async def put(request):
    path = os.path.join(ROOT, secrets.token_hex(16))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    batch = []
    n = 0
    async for chunk in request.stream():
        batch.append(chunk)
        n += len(chunk)
        if n >= 1 << 20:
            await anyio.to_thread.run_sync(os.write, fd, b"".join(batch))
            batch, n = [], 0
    if batch:
        await anyio.to_thread.run_sync(os.write, fd, b"".join(batch))
    await anyio.to_thread.run_sync(os.fsync, fd)
    os.close(fd)
    return Response(path.rsplit("/", 1)[1], status_code=201)

async def get(request):
    fd = os.open(os.path.join(ROOT, request.path_params["name"]), os.O_RDONLY)
    size = os.fstat(fd).st_size
    async def body():
        pos = 0
        try:
            while pos < size:
                data = await anyio.to_thread.run_sync(os.pread, fd, 1 << 20, pos)
                pos += len(data)
                yield data
        finally:
            os.close(fd)
    return StreamingResponse(body(), headers={"Content-Length": str(size)})

async def health(request):
    return Response("ok")

app = Starlette(routes=[Route("/put", put, methods=["PUT"]), Route("/get/{name}", get),
                        Route("/v1/health", health)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_config=None, access_log=False)
"""


class Baseline(RelayServer):
    """The bare ASGI stack: receive, fsync, serve back."""

    def __init__(self, root: Path) -> None:
        super().__init__(root / "baseline.log")
        self.root = root / "baseline"
        self.root.mkdir()

    def command(self) -> list[str]:
        return [sys.executable, "-c", BASELINE, str(self.port), str(self.root)]


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.idle = rss(pid)
        self.peak = self.idle
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return (self.peak - self.idle) / MiB


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def many_small(
    url: str, clients: int, messages: int, *, baseline: bool
) -> tuple[float, float, float]:
    """(messages/s, p50 ms, p99 ms) for 10 KiB envelopes."""
    body = os.urandom(10 * 1024)
    receivers = [m.Identity.generate() for _ in range(10)]
    senders = [m.Identity.generate() for _ in range(clients)]
    per = messages // clients
    latencies: list[float] = []
    lock = threading.Lock()
    transports = []
    for s in senders:
        if baseline:
            transports.append(httpx.Client())
        else:
            t = RelayTransport(s, url)
            t.publish()
            transports.append(t)
    barrier = threading.Barrier(clients + 1)

    def run(i: int) -> None:
        t = transports[i]
        mine = []
        barrier.wait()
        for j in range(per):
            start = time.perf_counter()
            if baseline:
                r = t.put(url + "/put", content=body)  # type: ignore[union-attr]
                assert r.status_code == 201
            else:
                to = receivers[(i + j) % len(receivers)]
                box = Endpoint(kind="relay", url=url, mailbox=to.fingerprint)
                t.deliver(box, io.BytesIO(body), message_id=message_id(), size=len(body))  # type: ignore[union-attr]
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    for t in transports:
        t.close()
    return len(latencies) / elapsed, pct(latencies, 0.5) * 1000, pct(latencies, 0.99) * 1000


def one_big(srv: RelayServer, path: Path, *, baseline: bool) -> tuple[float, float, float]:
    """(upload MB/s, download MB/s, peak server RSS above idle in MiB)."""
    size = path.stat().st_size
    assert srv.proc is not None
    watch = PeakRSS(srv.proc.pid)
    if baseline:
        with httpx.Client(timeout=600) as c, path.open("rb") as fh:
            start = time.perf_counter()
            name = c.put(
                srv.url + "/put",
                content=iter(lambda: fh.read(MiB), b""),
                headers={"Content-Length": str(size)},
            ).text
            up = time.perf_counter() - start
            start = time.perf_counter()
            with c.stream("GET", f"{srv.url}/get/{name}") as r:
                got = sum(len(b) for b in r.iter_raw(MiB))
            down = time.perf_counter() - start
    else:
        a, b = m.Identity.generate(), m.Identity.generate()
        with (
            RelayTransport(a, srv.url, timeout=600) as t,
            RelayTransport(b, srv.url, timeout=600) as r,
        ):
            r.publish()
            with path.open("rb") as fh:
                start = time.perf_counter()
                t.deliver(
                    Endpoint(kind="relay", url=srv.url, mailbox=b.fingerprint),
                    fh,
                    message_id=message_id(),
                    size=size,
                )
                up = time.perf_counter() - start
            (item,) = r.list()
            start = time.perf_counter()
            got = 0
            with r.fetch(item) as src:
                while block := src.read(MiB):
                    got += len(block)
            down = time.perf_counter() - start
            r.acknowledge(item)
    assert got == size
    grown = watch.stop()
    return size / MiB / up, size / MiB / down, grown


async def loop_lag(url: str, path: Path) -> float:
    """Worst event-loop lag (ms) while AsyncRelayTransport uploads ``path``."""
    a, b = m.Identity.generate(), m.Identity.generate()
    worst = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            start = time.perf_counter()
            await asyncio.sleep(0.005)
            worst = max(worst, time.perf_counter() - start - 0.005)

    async with AsyncRelayTransport(a, url, timeout=600) as t:
        await t.publish()
        tick = asyncio.create_task(ticker())
        with path.open("rb") as fh:
            await t.deliver(
                Endpoint(kind="relay", url=url, mailbox=b.fingerprint),
                fh,
                message_id=message_id(),
                size=path.stat().st_size,
            )
        done.set()
        await tick
    return worst * 1000


def make_file(path: Path, mib: int) -> None:
    block = os.urandom(MiB)
    with path.open("wb") as fh:
        for _ in range(mib):
            fh.write(block)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--lag-mib", type=int, default=256)
    ap.add_argument("--no-postgres", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp:
        root = Path(tmp)
        big = root / "big.bin"
        make_file(big, args.big_mib)
        lag_file = root / "lag.bin"
        make_file(lag_file, args.lag_mib)
        print(
            f"{args.clients} clients x 10 KiB envelopes ({args.messages} messages); "
            f"one {args.big_mib} MiB envelope up and down"
        )
        with Baseline(root) as base:
            b_rate, b_p50, b_p99 = many_small(base.url, args.clients, args.messages, baseline=True)
            b_up, b_down, b_rss = one_big(base, big, baseline=True)
        print(
            f"  baseline (Starlette+uvicorn, fsync, no medsecure): {b_rate:8.0f} msg/s "
            f"p50 {b_p50:6.1f} ms p99 {b_p99:6.1f} ms | up {b_up:6.0f} MB/s down {b_down:6.0f} MB/s "
            f"RSS +{b_rss:.0f} MiB"
        )
        backends: list[tuple[str, dict[str, object]]] = [("sqlite", {"data": root / "data"})]
        pg = None
        if not args.no_postgres:
            from pgkit import Postgres

            pg = Postgres()
            backends.append(("postgres", {"database": pg.url}))
        try:
            for name, where in backends:
                with RelayServer(root / f"{name}.log", args=FAST, **where) as srv:  # type: ignore[arg-type]
                    rate, p50, p99 = many_small(
                        srv.url, args.clients, args.messages, baseline=False
                    )
                    up, down, grown = one_big(srv, big, baseline=False)
                    lag = asyncio.run(loop_lag(srv.url, lag_file)) if name == "sqlite" else None
                print(
                    f"  relay {name:8}: {rate:8.0f} msg/s p50 {p50:6.1f} ms p99 {p99:6.1f} ms | "
                    f"up {up:6.0f} MB/s down {down:6.0f} MB/s RSS +{grown:.0f} MiB (bound 64)"
                )
                print(
                    f"    ratios to baseline: msg/s {rate / b_rate:.2f}  up {up / b_up:.2f}  "
                    f"down {down / b_down:.2f}  (target >= 0.67)"
                )
                if lag is not None:
                    print(
                        f"    AsyncRelayTransport event-loop lag while sending {args.lag_mib} MiB: "
                        f"{lag:.1f} ms (target < 50)"
                    )
        finally:
            if pg is not None:
                pg.destroy()


if __name__ == "__main__":
    main()
