"""Audit log benchmarks.

    python bench/bench_audit.py [--records N]

Prints, measured in the same run:
* the cost of appending one record (fsynced) next to a bare write + fsync of the same bytes;
* group commit: 100 records in one ``batch()`` against 100 separate appends;
* verifying an N-record log (default 1,000,000) in records/s, next to hashlib SHA-256 over the
  same lines, one call per line after reading and splitting the files (the work a hash
  chain cannot avoid).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import medsecure as m
from medsecure.audit import AuditLog, verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    args = parser.parse_args()
    me = m.Identity.generate()
    with tempfile.TemporaryDirectory(dir=os.environ.get("MEDSECURE_BENCH_DIR")) as tmp:
        root = Path(tmp)
        log = AuditLog(root / "a", identity=me, actor_id="810000005479", checkpoint_every=10**9)
        fields = {
            "message_id": "01M8RD0VPNHXKFEJHA93WF8EY1",
            "counterparty": "810000000017",
            "result": "sent",
            "endpoint": "drop",
            "attempt": 1,
        }
        log.append("deliver", **fields)
        n = 200
        t = time.perf_counter()
        for _ in range(n):
            log.append("deliver", **fields)
        t_append = (time.perf_counter() - t) / n
        sample = (root / "a" / "audit-000001.jsonl").read_bytes().splitlines()[-1] + b"\n"
        fd = os.open(root / "bare", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        t = time.perf_counter()
        for _ in range(n):
            os.write(fd, sample)
            os.fsync(fd)
        t_bare = (time.perf_counter() - t) / n
        os.close(fd)
        t = time.perf_counter()
        for _ in range(10):
            with log.batch():
                for _ in range(100):
                    log.append("deliver", **fields)
        t_batch = (time.perf_counter() - t) / 10
        print("## appending")
        print(f"append one record (fsynced)   : {t_append * 1e6:8.0f} µs")
        print(f"bare write + fsync, same bytes: {t_bare * 1e6:8.0f} µs")
        print(f"RATIO append / (write + fsync) = {t_append / t_bare:.2f}  (target: one fsync, ~1)")
        print(
            f"100 records in one batch: {t_batch * 1e3:.1f} ms vs 100 appends: {100 * t_append * 1e3:.1f} ms "
            f"-> RATIO {100 * t_append / t_batch:.1f}x"
        )
        log.close()

        big = AuditLog(root / "big", identity=me, actor_id="810000005479", checkpoint_every=250_000)
        t = time.perf_counter()
        done = 0
        while done < args.records:
            with big.batch():
                for _ in range(min(20_000, args.records - done)):
                    big.append("deliver", **fields)
                    done += 1
        big.close()
        t_write = time.perf_counter() - t
        files = sorted((root / "big").glob("audit-*.jsonl"))
        for f in files:
            f.read_bytes()  # same page-cache state for both measurements
        t = time.perf_counter()
        report = verify(root / "big", public=me.public)
        t_verify = time.perf_counter() - t
        assert report.ok, report.problem
        t = time.perf_counter()
        count = 0
        for f in files:  # the minimal work: read, split into lines, hash every line
            for line in f.read_bytes().split(b"\n"):
                if line:
                    hashlib.sha256(line).hexdigest()
                    count += 1
        t_hash = time.perf_counter() - t
        total = sum(f.stat().st_size for f in files)
        print(
            f"## verifying {report.records} records ({total / 1e6:.0f} MB, {len(files)} files, {report.checkpoints} checkpoints)"
        )
        print(f"written in {t_write:.1f} s (batches of 20,000)")
        print(f"verify          : {report.records / t_verify:10.0f} records/s ({t_verify:.2f} s)")
        print(
            f"hashlib per line: {count / t_hash:10.0f} records/s ({t_hash:.2f} s) (read + split + SHA-256 of each line)"
        )
        print(
            f"RATIO verify / hashlib = {t_hash / t_verify:.2f}  (1.0: verification runs at hashing speed)"
        )


if __name__ == "__main__":
    main()
