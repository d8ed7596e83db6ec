"""Client benchmarks: send + receive through the file transport, next to bare seal_stream.

    python bench/bench_client.py [--small N] [--large-mib M]

Prints, measured in the same run:
* 1,000 small (10 KiB) documents: send and receive throughput (messages/s), and the number of
  fsync calls per send (counted by wrapping os.fsync), against one batch per send;
* one large document (1 GiB by default) sent from disk to the drop folder and received: MB/s
  against bare ``seal_stream`` / ``unseal_stream`` file to file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

import medsecure as m
from medsecure.directory import MemoryDirectory
from medsecure.models import Endpoint, KeyEntry, Practitioner
from medsecure.transports import FileTransport
from medsecure.trust import AuthorityPolicy, sign_binding


def setup(root: Path) -> tuple[m.Client, m.Client, m.Identity, m.Identity]:
    authority = m.Identity.generate()
    now = dt.datetime.now(dt.UTC)
    ids = {"alice": m.Identity.generate(), "bob": m.Identity.generate()}
    idnps = {"alice": "810000005479", "bob": "810000000017"}
    entries = []
    for who, ident in ids.items():
        box = FileTransport.prepare(root / f"box-{who}")
        st = sign_binding(
            authority,
            idnps=idnps[who],
            key=ident.public,
            not_before=now - dt.timedelta(days=1),
            not_after=now + dt.timedelta(days=9),
        )
        entries.append(
            Practitioner(
                idnps=idnps[who],
                keys=(KeyEntry(public=ident.public, statements=(st.to_text(),)),),
                endpoints=(Endpoint(kind="drop", path=str(box)),),
            )
        )
    directory = MemoryDirectory(entries)
    clients = [
        m.Client(
            ids[w],
            directory,
            FileTransport(root / f"box-{w}"),
            root / f"home-{w}",
            trust=AuthorityPolicy([authority.public]),
            me=idnps[w],
        )
        for w in ("alice", "bob")
    ]
    return clients[0], clients[1], ids["alice"], ids["bob"]


class FsyncCounter:
    def __init__(self) -> None:
        self.count = 0
        self._orig = os.fsync

    def __enter__(self) -> FsyncCounter:
        def counting(fd: int) -> None:
            self.count += 1
            self._orig(fd)

        os.fsync = counting  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        os.fsync = self._orig  # type: ignore[assignment]


def small(root: Path, n: int) -> None:
    alice, bob, _, _ = setup(root / "small")
    payload = os.urandom(10 * 1024)
    with FsyncCounter() as fs:
        t = time.perf_counter()
        for i in range(n):
            alice.send(m.Document(content=payload, filename=f"r{i}.txt"), to="rpps:10000000017")
        t_send = time.perf_counter() - t
    fsyncs = fs.count
    t = time.perf_counter()
    got = 0
    while True:
        batch = bob.receive(limit=200)
        if not batch:
            break
        for msg in batch:
            msg.documents[0].read()
            msg.ack()
            got += 1
    t_recv = time.perf_counter() - t
    assert got == n, got
    t = time.perf_counter()
    sender, recipient = alice.identity, bob.identity
    for _ in range(n):
        m.unseal(m.seal(payload, sender=sender, recipients=[recipient.public]), identity=recipient)
    t_bare = time.perf_counter() - t
    print(f"## {n} documents of 10 KiB through the file transport")
    print(f"send (durable outbox + drop-folder delivery): {n / t_send:7.0f} msg/s")
    print(f"receive (store, verify, read, ack)           : {n / t_recv:7.0f} msg/s")
    print(f"bare seal + unseal in memory                 : {n / t_bare:7.0f} msg/s")
    print(
        f"fsync calls per send: {fsyncs / n:.1f} (envelope file + outbox folder, then the drop folder; plus SQLite's own commit)"
    )
    print(
        "  SQLite commits: 1 durable (synchronous=FULL) + 1 status update (synchronous=NORMAL) per send"
    )
    alice.close()
    bob.close()


def large(root: Path, mib: int, repeat: int = 2) -> None:
    src = root / "large.bin"
    with src.open("wb") as fh:
        block = os.urandom(1 << 20)
        for _ in range(mib):
            fh.write(block)
    size = mib << 20
    best = {"seal": 1e9, "unseal": 1e9, "send": 1e9, "receive": 1e9, "save": 1e9}

    def timed(key: str, fn) -> None:  # type: ignore[no-untyped-def]
        os.sync()  # start with no write-back pending from the previous step
        t = time.perf_counter()
        fn()
        best[key] = min(best[key], time.perf_counter() - t)

    for r in range(repeat):
        alice, bob, a_id, b_id = setup(root / f"large{r}")

        def bare_seal() -> None:
            with src.open("rb") as fi, (root / "bare.msec").open("wb") as fo:
                m.seal_stream(fi, fo, sender=a_id, recipients=[b_id.public])

        def bare_unseal() -> None:
            with (root / "bare.msec").open("rb") as fi:
                m.unseal_stream(fi, root / "bare.out", identity=b_id)

        timed("seal", bare_seal)
        timed("unseal", bare_unseal)
        for p in ("bare.msec", "bare.out"):
            (root / p).unlink()
        timed("send", lambda: alice.send(m.Document.from_path(src), to="rpps:10000000017"))
        got: list[m.ReceivedMessage] = []
        timed("receive", lambda: got.extend(bob.receive()))
        timed("save", lambda: got[0].documents[0].save(root / "saved.bin"))
        assert (root / "saved.bin").stat().st_size == size
        got[0].ack()
        (root / "saved.bin").unlink()
        alice.close()
        bob.close()

    def mbps(key: str) -> float:
        return size / best[key] / 1e6

    print(f"## one {mib} MiB document, file to file (best of {repeat}, os.sync() before each step)")
    print(f"bare seal_stream  : {mbps('seal'):7.0f} MB/s (to an open file, no fsync)")
    print(
        f"client.send       : {mbps('send'):7.0f} MB/s (seal to outbox, fsync, link into the drop folder)"
    )
    print(f"bare unseal_stream: {mbps('unseal'):7.0f} MB/s (to a path: temp file, fsync, rename)")
    print(
        f"client.receive    : {mbps('receive'):7.0f} MB/s (link from the drop folder, unseal to inbox, fsync)"
    )
    print(f"document.save     : {mbps('save'):7.0f} MB/s")
    print(
        f"RATIO send / bare seal_stream       = {best['seal'] / best['send']:.2f}  (target >= 0.7)"
    )
    print(
        f"RATIO receive / bare unseal_stream  = {best['unseal'] / best['receive']:.2f}  (target >= 0.7)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large-mib", type=int, default=1024)
    args = parser.parse_args()
    print(f"# medsecure client benchmark — Python {sys.version.split()[0]}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(dir=os.environ.get("MEDSECURE_BENCH_DIR")) as tmp:
        small(Path(tmp), args.small)
        large(Path(tmp), args.large_mib)


if __name__ == "__main__":
    main()
