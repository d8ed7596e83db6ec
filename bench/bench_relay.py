"""Relay benchmarks: the real server (uvicorn subprocess) on each backend, against a baseline.

    python bench/bench_relay.py [--messages 2000] [--clients 16] [--runs 3] [--big-mib 1024]
                                [--big-runs 5] [--lag-mib 256] [--no-postgres]

What is measured, and what each figure includes:

* **baseline** — the same ASGI stack (Starlette on uvicorn, started with the relay's own uvicorn
  settings: ``medsecure.relay.server.uvicorn_config``, one process) receiving the same bytes
  (the same URLs, the same signature headers, the same 10 KiB bodies) and writing each body to a
  new file with one ``fsync`` per message before answering; no medsecure logic (no signature
  check, no digest, no nonce, no metadata). Downloads: the file streamed back.
* **relay, prepared requests** (the target figure) — the relay checking everything it checks in
  production (both signatures of a hybrid identity, Content-Digest, created window, single-use
  nonce, rate limit, quota, idempotency) and answering each upload only once it is durable (group
  commit: one fsync per batch of concurrent uploads). The clients signed their requests before the
  timed phase (within the signature window, one nonce each), exactly as for the baseline, so
  that on this 2-core machine the clients' signing does not take the server's CPU: in a
  deployment the clients are other machines.
* **relay, live signing, end to end** — ``RelayTransport.deliver`` from ``--clients`` threads:
  digest, both signatures (~1.5 ms of ML-DSA-65 each) and the upload inside the timed phase, on
  the same 2 cores as the server. Printed for information, labelled as such.
* per backend, one ``--big-mib`` envelope up (``RelayTransport.deliver``) and down
  (``RelayTransport.fetch``) with the server's peak RSS above its idle RSS (bound: 64 MiB);
  PostgreSQL both with large objects and with a shared bodies folder (``--bodies``);
* ``medsecure.AsyncClient`` (with ``AsyncRelayTransport``) sending a ``--lag-mib`` document
  through the relay while a ticker task measures the event loop's worst lag (target < 50 ms).

Small-envelope phases run ``--runs`` times, interleaved (baseline, relay, relay, … again), and
each ratio is taken against the baseline run just before it; medians and ranges are printed,
with the CPU a message of the server, of PostgreSQL's processes and of the clients, all on the
same 2 cores. The large-envelope phase runs ``--big-runs`` times, each server once a run in an
order rotated from run to run; each ratio is taken against the baseline of the same run.
Figures depend on the machine: run it when the machine is quiet and say what ``uptime`` said.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import httpx
from clientkit import entry, party
from relaykit import RelayServer, message_id

import medsecure as m
from medsecure.directory import MemoryDirectory
from medsecure.models import Endpoint
from medsecure.relay import sign_request
from medsecure.transports import AsyncRelayTransport, RelayTransport
from medsecure.trust import AuthorityPolicy

FAST = ("--rate", "100000", "--burst", "1000000", "--max-envelope-mib", "4096")
MiB = 1 << 20
SMALL = 10 * 1024

BASELINE = r"""
import os, sys, secrets
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
import anyio, uvicorn
from medsecure.relay.server import uvicorn_config

ROOT = sys.argv[2]

async def put(request):
    name = secrets.token_hex(16)
    fd = os.open(os.path.join(ROOT, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
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
    await anyio.to_thread.run_sync(os.fsync, fd)  # one fsync per message
    os.close(fd)
    return JSONResponse({"name": name}, status_code=201)

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

app = Starlette(routes=[
    Route("/v1/mailboxes/{mailbox}/messages/{message_id}", put, methods=["PUT"]),
    Route("/blob/{name}", get),
    Route("/v1/health", health),
])
uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=int(sys.argv[1]))).run()
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
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass  # the server exited: the run fails on its own
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


class Parties:
    """Senders (one per client) and receivers (10 mailboxes), hybrid identities."""

    def __init__(self, clients: int) -> None:
        self.senders = [m.Identity.generate() for _ in range(clients)]
        self.receivers = [m.Identity.generate() for _ in range(10)]

    def publish(self, url: str) -> None:
        for s in self.senders:
            with RelayTransport(s, url) as t:
                t.publish()


Result = tuple[float, float, float, float]  # msg/s, p50 ms, p99 ms, server CPU ms per message


def _threads(clients: int, work: Callable[[int, Callable[[float], None]], None]) -> Result:
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def run(i: int) -> None:
        mine: list[float] = []
        barrier.wait()
        work(i, mine.append)
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
    return (
        len(latencies) / elapsed,
        pct(latencies, 0.5) * 1000,
        pct(latencies, 0.99) * 1000,
        0.0,
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its threads included)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def commits(url: str) -> tuple[float, float]:
    """(durable transactions, writes they carried) so far, from the relay's /metrics."""
    found = {"medsecure_relay_commits_total": 0.0, "medsecure_relay_committed_writes_total": 0.0}
    try:
        text = httpx.get(url + "/metrics").text
    except httpx.HTTPError:
        return 0.0, 0.0
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in found:
            found[name] = float(value)
    return found["medsecure_relay_commits_total"], found["medsecure_relay_committed_writes_total"]


BATCHES: dict[str, list[float]] = {}
CLIENT_CPU: list[float] = []
#: CPU of the PostgreSQL cluster's processes (postmaster and backends) per message, by server URL
PG_CPU: dict[str, list[float]] = {}


def cluster_cpu(data: Path) -> float:
    """User + system CPU time so far of a PostgreSQL cluster: its postmaster and every process
    the postmaster started (backends, WAL writer, checkpointer...), including those that have
    ended (autovacuum workers: the postmaster's children's time)."""
    postmaster = int((data / "postmaster.pid").read_text().split()[0])
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(pid) == postmaster:
            # its own time, and that of its children that ended and were waited for
            used = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
            total += used / os.sysconf("SC_CLK_TCK")
        elif int(fields[1]) == postmaster:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def prepared(
    srv: RelayServer, parties: Parties, messages: int, body: bytes, cluster: Path | None = None
) -> Result:
    """Requests signed before the timed phase (one nonce each), then sent by plain httpx
    clients: the same bytes for the baseline and the relay. Also returns the server process's
    CPU time per message in the timed phase (ms; a figure the machine's load disturbs less)."""
    url = srv.url
    assert srv.proc is not None
    clients = len(parties.senders)
    per = messages // clients
    digest = hashlib.sha256(body).digest()
    signed_at = time.time()
    plans: list[list[tuple[str, dict[str, str]]]] = []
    for i, sender in enumerate(parties.senders):
        plan = []
        for j in range(per):
            box = parties.receivers[(i + j) % len(parties.receivers)].fingerprint
            target = f"{url}/v1/mailboxes/{box}/messages/{message_id()}"
            headers = sign_request(sender, "PUT", target, digest)
            headers["Content-Type"] = "application/octet-stream"
            plan.append((target, headers))
        plans.append(plan)
    if time.time() - signed_at > 30:
        raise SystemExit("signing took too long for the 60 s signature window: fewer --messages")
    connections = [httpx.Client() for _ in range(clients)]

    def work(i: int, record: Callable[[float], None]) -> None:
        c = connections[i]
        for target, headers in plans[i]:
            start = time.perf_counter()
            r = c.put(target, content=body, headers=headers)
            if r.status_code != 201:
                raise SystemExit(f"upload answered {r.status_code}: {r.text[:300]}")
            record(time.perf_counter() - start)

    try:
        before = cpu_seconds(srv.proc.pid)
        b0, w0 = commits(url)
        mine = cpu_seconds(os.getpid())
        pg0 = cluster_cpu(cluster) if cluster is not None else 0.0
        rate, p50, p99, _ = _threads(clients, work)
        cpu = (cpu_seconds(srv.proc.pid) - before) * 1000 / (per * clients)
        if cluster is not None:
            PG_CPU.setdefault(url, []).append((cluster_cpu(cluster) - pg0) * 1000 / (per * clients))
        CLIENT_CPU.append((cpu_seconds(os.getpid()) - mine) * 1000 / (per * clients))
        b1, w1 = commits(url)
        if b1 > b0:
            BATCHES.setdefault(url, []).append((w1 - w0) / (b1 - b0))
        return rate, p50, p99, cpu
    finally:
        for c in connections:
            c.close()


def live(url: str, parties: Parties, messages: int, body: bytes) -> Result:
    """End to end: RelayTransport.deliver (digest, both signatures, upload) in the timed phase."""
    clients = len(parties.senders)
    per = messages // clients
    transports = [RelayTransport(s, url) for s in parties.senders]
    for t in transports:
        t.publish()

    def work(i: int, record: Callable[[float], None]) -> None:
        t = transports[i]
        for j in range(per):
            to = parties.receivers[(i + j) % len(parties.receivers)]
            box = Endpoint(kind="relay", url=url, mailbox=to.fingerprint)
            start = time.perf_counter()
            t.deliver(box, io.BytesIO(body), message_id=message_id(), size=len(body))
            record(time.perf_counter() - start)

    try:
        return _threads(clients, work)
    finally:
        for t in transports:
            t.close()


def _stream_up(
    c: httpx.Client, target: str, headers: dict[str, str], path: Path
) -> tuple[float, httpx.Response]:
    with path.open("rb") as fh:
        start = time.perf_counter()
        r = c.put(target, content=iter(lambda: fh.read(MiB), b""), headers=headers)
        took = time.perf_counter() - start
    if r.status_code != 201:
        raise SystemExit(f"upload answered {r.status_code}: {r.text[:300]}")
    return took, r


def _stream_down(c: httpx.Client, target: str, headers: dict[str, str], size: int) -> float:
    start = time.perf_counter()
    with c.stream("GET", target, headers=headers) as r:
        got = sum(len(b) for b in r.iter_raw(MiB))
    took = time.perf_counter() - start
    if got != size:
        raise SystemExit(f"downloaded {got} bytes of {size}")
    return took


def one_big(
    srv: RelayServer, path: Path, digest: bytes, *, baseline: bool
) -> tuple[float, float, float, float]:
    """(upload MB/s, download MB/s, peak server RSS above idle in MiB, RelayTransport.deliver
    MB/s end to end). Upload and download go through the same httpx code for the baseline and
    the relay, with the same signed headers; for the relay, ``deliver`` adds the client's own
    digest pass over the file before the upload (0 for the baseline)."""
    size = path.stat().st_size
    assert srv.proc is not None
    a, b = m.Identity.generate(), m.Identity.generate()
    if not baseline:
        for who in (a, b):
            with RelayTransport(who, srv.url) as t:
                t.publish()
    os.sync()
    watch = PeakRSS(srv.proc.pid)
    target = f"{srv.url}/v1/mailboxes/{b.fingerprint}/messages/{message_id()}"
    with httpx.Client(timeout=600) as c:
        headers = sign_request(a, "PUT", target, digest)
        headers["Content-Length"] = str(size)
        headers["Content-Type"] = "application/octet-stream"
        up, answer = _stream_up(c, target, headers, path)
        source = f"{srv.url}/blob/{answer.json()['name']}" if baseline else target
        down = _stream_down(
            c, source, sign_request(b, "GET", source, hashlib.sha256(b"").digest()), size
        )
    grown = watch.stop()
    end_to_end = 0.0
    if not baseline:
        os.sync()
        with RelayTransport(a, srv.url, timeout=600) as t, path.open("rb") as fh:
            start = time.perf_counter()
            t.deliver(
                Endpoint(kind="relay", url=srv.url, mailbox=b.fingerprint),
                fh,
                message_id=message_id(),
                size=size,
            )
            end_to_end = size / 1e6 / (time.perf_counter() - start)
        with RelayTransport(b, srv.url, timeout=600) as r:
            for item in r.list():
                r.acknowledge(item)
    return size / 1e6 / up, size / 1e6 / down, grown, end_to_end


async def idle_lag(seconds: float) -> float:
    """Worst lag (ms) of the same ticker on an idle loop: what the machine alone causes."""
    worst = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        await asyncio.sleep(0.005)
        worst = max(worst, time.perf_counter() - start - 0.005)
    return worst * 1000


async def loop_lag(url: str, root: Path, path: Path) -> tuple[float, float]:
    """(worst event-loop lag in ms, seconds) while medsecure.AsyncClient (with
    AsyncRelayTransport) sends the document at ``path`` through the relay."""
    authority = m.Identity.generate()
    alice = party(root, "alice", "810000005479")
    bob = party(root, "bob", "810000000017")

    def box(p: object) -> tuple[Endpoint, ...]:
        return (Endpoint(kind="relay", url=url, mailbox=p.identity.fingerprint),)  # type: ignore[attr-defined]

    directory = MemoryDirectory(
        [entry(authority, alice, endpoints=box(alice)), entry(authority, bob, endpoints=box(bob))]
    )
    worst = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            start = time.perf_counter()
            await asyncio.sleep(0.005)
            worst = max(worst, time.perf_counter() - start - 0.005)

    transport = AsyncRelayTransport(alice.identity, url, timeout=600)
    async with m.AsyncClient(
        alice.identity,
        directory,
        transport,
        alice.home,
        trust=AuthorityPolicy([authority.public]),
        me=alice.idnps,
    ) as client:
        document = m.Document.from_path(path, media_type="application/octet-stream")
        tick = asyncio.create_task(ticker())
        start = time.perf_counter()
        result = await client.send(document, to=bob.ref)
        took = time.perf_counter() - start
        done.set()
        await tick
    await transport.aclose()
    assert [s.status for s in result.recipients] == ["sent"], result.recipients
    return worst * 1000, took


def make_dir(path: Path) -> Path:
    path.mkdir()
    return path


def make_file(path: Path, mib: int) -> None:
    block = os.urandom(MiB)
    with path.open("wb") as fh:
        for _ in range(mib):
            fh.write(block)


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    return (
        f"{fmt.format(statistics.median(values))} "
        f"({fmt.format(min(values))}–{fmt.format(max(values))})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--big-runs", type=int, default=5, help="runs of the large-envelope phase")
    ap.add_argument("--lag-mib", type=int, default=256)
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--no-live", action="store_true", help="skip the live-signing figures")
    ap.add_argument("--no-big", action="store_true", help="skip the large-envelope figures")
    args = ap.parse_args()
    print(f"uptime: {os.popen('uptime').read().strip()}")
    body = os.urandom(SMALL)
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp:
        root = Path(tmp)
        pg = None
        servers: dict[str, RelayServer] = {"baseline": Baseline(root)}
        servers["sqlite"] = RelayServer(root / "sqlite.log", args=FAST, data=root / "data")
        if not args.no_postgres:
            from pgkit import Postgres

            pg = Postgres()
            servers["postgres"] = RelayServer(root / "pg.log", args=FAST, database=pg.url)
            import psycopg

            with psycopg.connect(pg.admin_url, autocommit=True) as conn:
                conn.execute("CREATE DATABASE relay_folder")
            servers["postgres+folder"] = RelayServer(
                root / "pgf.log",
                args=(*FAST, "--bodies", str(root / "bodies")),
                database=pg.url.rsplit("/", 1)[0] + "/relay_folder",
            )
        try:
            for srv in servers.values():
                srv.start()
            parties = Parties(args.clients)
            for name, srv in servers.items():
                if name != "baseline":
                    parties.publish(srv.url)
            small = [n for n in servers if n != "postgres+folder"]
            print(
                f"\n{args.clients} clients x 10 KiB envelopes, {args.messages} messages a run, "
                f"{args.runs} runs interleaved"
            )
            got: dict[str, list[Result]] = {n: [] for n in small}
            ratios: dict[str, list[float]] = {n: [] for n in small}
            for _ in range(args.runs):
                base = None
                for name in small:
                    res = prepared(
                        servers[name],
                        parties,
                        args.messages,
                        body,
                        pg.data if pg is not None and name.startswith("postgres") else None,
                    )
                    got[name].append(res)
                    if name == "baseline":
                        base = res[0]
                    else:
                        assert base is not None
                        ratios[name].append(res[0] / base)
            print(
                f"  (the clients' own CPU, sending prepared requests: "
                f"{spread(CLIENT_CPU, '{:.2f}')} ms/msg, on the same 2 cores)"
            )
            for name in small:
                rates = [r[0] for r in got[name]]
                p50 = [r[1] for r in got[name]]
                p99 = [r[2] for r in got[name]]
                label = (
                    "baseline (Starlette+uvicorn, 1 fsync/msg, no medsecure)"
                    if name == "baseline"
                    else f"relay {name}, prepared requests"
                )
                cpu = [r[3] for r in got[name]]
                line = (
                    f"  {label:58} {spread(rates):>16} msg/s  p50 {spread(p50, '{:.1f}')} ms"
                    f"  p99 {spread(p99, '{:.1f}')} ms  server CPU {spread(cpu, '{:.2f}')} ms/msg"
                )
                if name != "baseline":
                    line += (
                        f"  ratio {spread(ratios[name], '{:.2f}')} (target >= 0.67);"
                        f" uploads per fsync {spread(BATCHES.get(servers[name].url, [0]), '{:.1f}')}"
                    )
                if servers[name].url in PG_CPU:
                    line += (
                        f"; PostgreSQL's processes {spread(PG_CPU[servers[name].url], '{:.2f}')}"
                        " ms/msg"
                    )
                print(line)
            # Where the 2 cores go: the clients, the server, PostgreSQL (medians, ms a message)
            # and the rate they would allow if the cores did nothing else.
            client = statistics.median(CLIENT_CPU)
            print(f"  CPU a message (ms, medians; clients {client:.2f}) and the 2 cores' bound:")
            for name in small:
                server = statistics.median(r[3] for r in got[name])
                cluster = statistics.median(PG_CPU.get(servers[name].url, [0.0]))
                total = client + server + cluster
                print(
                    f"    {name:10} server {server:.2f} + PostgreSQL {cluster:.2f} + clients "
                    f"{client:.2f} = {total:.2f} -> at most {2000 / total:.0f} msg/s"
                )
            if not args.no_live:
                for name in small:
                    if name == "baseline":
                        continue
                    runs = [
                        live(servers[name].url, parties, args.messages, body)
                        for _ in range(args.runs)
                    ]
                    rates = [r[0] for r in runs]
                    base_median = statistics.median(r[0] for r in got["baseline"])
                    print(
                        f"  {'relay ' + name + ', live signing end to end':58} "
                        f"{spread(rates):>16} msg/s  p50 {spread([r[1] for r in runs], '{:.1f}')}"
                        f" ms  p99 {spread([r[2] for r in runs], '{:.1f}')} ms  "
                        f"(/ baseline median: {statistics.median(rates) / base_median:.2f};"
                        " clients sign on the server's 2 cores)"
                    )
            print(f"  uptime: {os.popen('uptime').read().strip()}")
            lag_file = root / "lag.bin"
            make_file(lag_file, args.lag_mib)
            lags = []
            for i in range(args.runs):
                os.sync()  # the lag of the client, not of a write-back backlog left by others
                lags.append(
                    asyncio.run(
                        loop_lag(servers["sqlite"].url, make_dir(root / f"lag{i}"), lag_file)
                    )
                )
            idle = [asyncio.run(idle_lag(x[1])) for x in lags]
            print(
                f"\nmedsecure.AsyncClient + AsyncRelayTransport sending a {args.lag_mib} MiB "
                f"document (seal, outbox, upload): worst event-loop lag "
                f"{spread([x[0] for x in lags], '{:.1f}')} ms (target < 50), "
                f"send took {spread([x[1] for x in lags], '{:.1f}')} s; the same ticker on an "
                f"idle loop for as long: {spread(idle, '{:.1f}')} ms"
            )
            print(f"uptime: {os.popen('uptime').read().strip()}")
            if not args.no_big:
                big = root / "big.bin"
                make_file(big, args.big_mib)
                with big.open("rb") as fh:
                    digest = hashlib.file_digest(fh, "sha256").digest()
                print(
                    f"\none {args.big_mib} MiB envelope up and down, {args.big_runs} runs (MB/s: "
                    "the same httpx upload and download, the same signed headers; 'deliver' is "
                    "RelayTransport.deliver end to end, with its digest pass over the file)"
                )
                figures: dict[str, list[tuple[float, float, float, float]]] = {
                    n: [] for n in servers
                }
                # The disk's speed here changes several times over within minutes: each run
                # measures every server once, in an order rotated from run to run (no server
                # always follows another's write-back), and each relay's figure is divided by
                # the baseline's of the same run.
                names = list(servers)
                for run in range(args.big_runs):
                    order = names[run % len(names) :] + names[: run % len(names)]
                    for name in order:
                        figures[name].append(
                            one_big(servers[name], big, digest, baseline=name == "baseline")
                        )
                base = figures["baseline"]
                for name, fig in figures.items():
                    up, down = [f[0] for f in fig], [f[1] for f in fig]
                    line = (
                        f"  {name:16} up {spread(up):>16}  down {spread(down):>16}"
                        f"  server RSS +{max(f[2] for f in fig):.0f} MiB (bound 64)"
                    )
                    if name != "baseline":
                        ups = [f[0] / b[0] for f, b in zip(fig, base, strict=True)]
                        downs = [f[1] / b[1] for f, b in zip(fig, base, strict=True)]
                        line += (
                            f"  same-run ratios up {spread(ups, '{:.2f}')}"
                            f" down {spread(downs, '{:.2f}')} (target >= 0.67)"
                            f"  deliver {spread([f[3] for f in fig])}"
                        )
                    print(line)
                big.unlink()
                print(f"  uptime: {os.popen('uptime').read().strip()}")
        finally:
            for srv in servers.values():
                srv.stop()
            if pg is not None:
                pg.destroy()


if __name__ == "__main__":
    main()
