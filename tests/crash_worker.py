"""A worker process for the kill -9 tests: python crash_worker.py ROLE WORKDIR

Roles: ``send`` (alice sends numbered documents to bob forever, printing each message id once
``send()`` returned), ``flush`` (alice flushes forever), ``receive`` (bob receives and acks
forever, printing each message id received). The test kills it with SIGKILL at random times.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import medsecure as m
from medsecure.directory import FileDirectory
from medsecure.transports import FileTransport
from medsecure.trust import AuthorityPolicy, PinStore


def client(work: Path, who: str) -> m.Client:
    cfg = json.loads((work / "setup.json").read_text())
    identity = m.Identity.load(work / f"{who}.key", passphrase="pw")
    authority = m.PublicIdentity.from_text(cfg["authority"])
    return m.Client(
        identity,
        FileDirectory(work / "directory.json"),
        FileTransport(work / f"box-{who}"),
        work / f"home-{who}",
        trust=AuthorityPolicy([authority], pins=PinStore(work / f"pins-{who}.sqlite")),
        me=cfg[who],
        retry_base=0.01,
        retry_cap=0.05,
    )


def main() -> None:
    role, work = sys.argv[1], Path(sys.argv[2])
    if role == "send":
        c = client(work, "alice")
        i = 0
        while True:
            i += 1
            r = c.send(
                m.Document(content=f"document {i}".encode() * 50, filename=f"d{i}.txt"),
                to="rpps:10000000017",
            )
            print(r.message_id, flush=True)
    elif role == "flush":
        c = client(work, "alice")
        while True:
            c.flush(force=True)
    elif role == "receive":
        c = client(work, "bob")
        while True:
            for msg in c.receive(limit=10):
                assert msg.documents[0].read().startswith(b"document ")
                print(msg.message_id, flush=True)
                msg.ack()
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main()
