"""The relay's storage alone, without HTTP: what a group-commit transaction costs.

    python bench/bench_relay_storage.py [--uploads 3200] [--threads 4,8,16,32] [--runs 3]
                                        [--no-postgres]

``--threads`` threads each commit 10 KiB envelopes (with a nonce, as a small upload does) into
one storage, SQLite in a folder and PostgreSQL in a cluster this script starts (as the tests
do); the threads' count sets the size of the group-commit batches. Printed for each count,
medians of ``--runs`` interleaved runs (range): uploads a second, the batch size, the relay's own
CPU an upload (this process: hashing, psycopg or sqlite3, the admission rule) and PostgreSQL's
(its postmaster and every process it started, ended ones included). A fit of those against
1 / batch splits each into a part per transaction and a part per upload.
Figures depend on the machine: say what ``uptime`` said.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_relay import cluster_cpu
from relaykit import message_id

from medsecure.relay.server.storage import Storage, open_storage

SIZE = 10 * 1024


def run(storage: Storage, uploads: int, threads: int, cluster: Path | None) -> tuple[float, ...]:
    body = os.urandom(SIZE)
    digest = hashlib.sha256(body).digest()
    boxes = ["ms1" + secrets.token_hex(26) for _ in range(10)]
    per = uploads // threads

    def work(k: int) -> None:
        for j in range(per):
            pending = storage.begin_upload(len(body))
            pending.write(body)
            now = int(time.time())
            storage.commit_upload(
                pending,
                mailbox=boxes[j % len(boxes)],
                message_id=message_id(),
                sender=f"sender{k}",
                digest=digest,
                size=len(body),
                now=now,
                quota=1 << 40,
                nonce=(f"key{k}", secrets.token_hex(8), now + 70),
            )

    commits = getattr(storage, "commits", None)
    b0, i0 = (commits.batches, commits.items) if commits is not None else (0, 0)
    pg0 = cluster_cpu(cluster) if cluster is not None else 0.0
    t0 = os.times()
    start = time.perf_counter()
    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    t1 = os.times()
    done = per * threads
    relay = ((t1.user + t1.system) - (t0.user + t0.system)) * 1000 / done
    pg = (cluster_cpu(cluster) - pg0) * 1000 / done if cluster is not None else 0.0
    batch = (commits.items - i0) / max(1, commits.batches - b0) if commits is not None else 0.0
    return done / elapsed, batch, relay, pg


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares of cost = per_upload + per_transaction / batch."""
    xs = [1 / b for b, _ in points]
    ys = [c for _, c in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - slope * mx, slope


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--uploads", type=int, default=3200)
    ap.add_argument("--threads", default="4,8,16,32")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-postgres", action="store_true")
    args = ap.parse_args()
    counts = [int(x) for x in args.threads.split(",")]
    print("uptime:", os.popen("uptime").read().strip())
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        stores: dict[str, tuple[Storage, Path | None]] = {}
        cluster = None
        try:
            (Path(tmp) / "sqlite").mkdir()
            stores["SQLite"] = (open_storage(data=str(Path(tmp) / "sqlite")), None)
            if not args.no_postgres:
                from pgkit import Postgres

                cluster = Postgres()
                stores["PostgreSQL"] = (open_storage(database=cluster.url), cluster.data)
            results: dict[tuple[str, int], list[tuple[float, ...]]] = {}
            for _ in range(args.runs):
                for name, (storage, data) in stores.items():
                    for n in counts:
                        results.setdefault((name, n), []).append(
                            run(storage, args.uploads, n, data)
                        )
            for name, (_, data) in stores.items():
                print(f"\n{name}: 10 KiB uploads, medians of {args.runs} (range)")
                points_relay, points_pg = [], []
                for n in counts:
                    rows = results[(name, n)]
                    med = [statistics.median(r[i] for r in rows) for i in range(4)]
                    lo = [min(r[i] for r in rows) for i in range(4)]
                    hi = [max(r[i] for r in rows) for i in range(4)]
                    line = (
                        f"  {n:3} threads: {med[0]:6.0f} uploads/s ({lo[0]:.0f}–{hi[0]:.0f}),"
                        f" batch {med[1]:5.1f}, relay CPU {med[2]:.3f} ms an upload"
                        f" ({lo[2]:.3f}–{hi[2]:.3f})"
                    )
                    if data is not None:
                        line += f", PostgreSQL CPU {med[3]:.3f} ms ({lo[3]:.3f}–{hi[3]:.3f})"
                    print(line)
                    points_relay.append((med[1], med[2]))
                    points_pg.append((med[1], med[3]))
                a, b = fit(points_relay)
                print(f"  fit, relay: {b:.2f} ms a transaction + {a:.3f} ms an upload")
                if data is not None:
                    a, b = fit(points_pg)
                    print(f"  fit, PostgreSQL: {b:.2f} ms a transaction + {a:.3f} ms an upload")
        finally:
            for storage, _ in stores.values():
                storage.close()
            if cluster is not None:
                cluster.destroy()
    print("\nuptime:", os.popen("uptime").read().strip())


if __name__ == "__main__":
    main()
