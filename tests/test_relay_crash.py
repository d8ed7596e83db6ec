"""kill -9 of the relay during an upload and during a download, and many concurrent clients:
nothing partial is ever listed, the client's retry completes, nothing is lost or doubled."""

from __future__ import annotations

import hashlib
import os
import threading
from collections import Counter
from pathlib import Path

import pytest
from pgkit import wait
from relaykit import RelayServer, message_id

import medsecure as m
from medsecure.models import Endpoint
from medsecure.transports import RelayTransport

FAST = ("--rate", "10000", "--burst", "100000")
PATIENT = {"retries": 40, "backoff": 0.1, "max_backoff": 1.0}


def _payload(path: Path, mib: int) -> bytes:
    with path.open("wb") as fh:
        for i in range(mib * 32):
            fh.write(hashlib.sha256(i.to_bytes(4, "big")).digest() * 1024)  # 32 KiB blocks
    return path.read_bytes()


def _box(identity: m.Identity, url: str) -> Endpoint:
    return Endpoint(kind="relay", url=url, mailbox=identity.fingerprint)


class Gated:
    """A file that stops once in the middle of the upload pass until the test lets it go."""

    def __init__(self, path: Path, stop_at: int) -> None:
        self.f = path.open("rb")
        self.stop_at = stop_at
        self.seeks = 0
        self.reached = threading.Event()
        self.go = threading.Event()

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        self.seeks += 1
        return self.f.seek(pos, whence)

    def read(self, n: int = -1) -> bytes:
        # seek 1: the transport's seekability probe; seek 2: the first upload pass
        if self.seeks == 2 and not self.reached.is_set() and self.f.tell() >= self.stop_at:
            self.reached.set()
            assert self.go.wait(120)
        return self.f.read(n)


class GatedUpload:
    """One envelope delivered from a thread through a :class:`Gated` file: the constructor
    returns once part of the body was sent and the upload waits; :meth:`resume` lets it finish
    and returns what the delivery raised."""

    def __init__(
        self, sender: RelayTransport, box: Endpoint, path: Path, size: int, stop_at: int
    ) -> None:
        self.gated = Gated(path, stop_at)
        self.message_id = message_id()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(sender, box, size))
        self.thread.start()
        assert self.gated.reached.wait(60)

    def _run(self, sender: RelayTransport, box: Endpoint, size: int) -> None:
        try:
            sender.deliver(box, self.gated, message_id=self.message_id, size=size)  # type: ignore[arg-type]
        except BaseException as exc:
            self.errors.append(exc)

    def resume(self) -> list[BaseException]:
        self.gated.go.set()
        self.thread.join(180)
        assert not self.thread.is_alive()
        return self.errors


def _tmp_bytes(data: Path) -> int:
    return sum(e.stat().st_size for e in os.scandir(data / "tmp"))


def test_kill_9_during_an_upload(tmp_path, alice):
    bob = m.Identity.generate()
    data = _payload(tmp_path / "env.msec", 24)
    srv = RelayServer(tmp_path / "log", data=tmp_path / "data", args=FAST).start()
    try:
        sender = RelayTransport(alice, srv.url, **PATIENT)
        receiver = RelayTransport(bob, srv.url, **PATIENT)
        receiver.list()
        upload = GatedUpload(
            sender, _box(bob, srv.url), tmp_path / "env.msec", len(data), stop_at=8 << 20
        )
        mid = upload.message_id
        wait(lambda: _tmp_bytes(tmp_path / "data") > 0, "the relay received part of the body")
        srv.kill()
        srv.start()
        assert receiver.list() == []  # the partial envelope is never listed
        assert _tmp_bytes(tmp_path / "data") == 0  # and its remains are gone
        assert upload.resume() == []
        (item,) = receiver.list()
        assert item.message_id == mid and item.size == len(data)
        assert receiver.fetch(item).read() == data
        # a late retry of the same message does not make a second copy
        with (tmp_path / "env.msec").open("rb") as fh:
            sender.deliver(_box(bob, srv.url), fh, message_id=mid, size=len(data))
        assert [i.message_id for i in receiver.list()] == [mid]
        sender.close()
        receiver.close()
    finally:
        srv.stop()


def test_kill_9_during_a_download(tmp_path, alice):
    bob = m.Identity.generate()
    data = _payload(tmp_path / "env.msec", 32)
    srv = RelayServer(tmp_path / "log", data=tmp_path / "data", args=FAST).start()
    try:
        sender = RelayTransport(alice, srv.url, **PATIENT)
        receiver = RelayTransport(bob, srv.url, **PATIENT)
        mid = message_id()
        with (tmp_path / "env.msec").open("rb") as fh:
            sender.deliver(_box(bob, srv.url), fh, message_id=mid, size=len(data))
        (item,) = receiver.list()
        with receiver.fetch(item) as fh:
            head = fh.read(4 << 20)
            srv.kill()
            srv.start()
            rest = fh.read()
        assert head + rest == data
        assert '"route":"download","status":206' in srv.log.read_text()  # resumed by Range
        assert [i.message_id for i in receiver.list()] == [mid]  # nothing lost, nothing doubled
        receiver.acknowledge(item)
        assert receiver.list() == []
        sender.close()
        receiver.close()
    finally:
        srv.stop()


def deliver_all(
    url_of, senders, receivers, per_sender: int, progress=None, size: int = 2048
) -> dict[str, bytes]:
    """Every sender sends ``per_sender`` envelopes of ``size`` bytes round-robin to the
    receivers, in parallel, re-delivering every seventh one (as an outbox does after a lost
    answer)."""
    sent: dict[str, bytes] = progress if progress is not None else {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def run(i: int, sender: m.Identity) -> None:
        try:
            with RelayTransport(sender, url_of(i), **PATIENT) as t:
                for j in range(per_sender):
                    to = receivers[(i * per_sender + j) % len(receivers)]
                    body = os.urandom(size)
                    mid = message_id()
                    box = Endpoint(kind="relay", url=url_of(i), mailbox=to.fingerprint)
                    for _ in range(2 if j % 7 == 0 else 1):
                        t.deliver(
                            box, __import__("io").BytesIO(body), message_id=mid, size=len(body)
                        )
                    with lock:
                        sent[f"{to.fingerprint}/{mid}"] = body
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert errors == []
    return sent


def drain(url: str, receivers) -> Counter[str]:
    got: Counter[str] = Counter()
    bodies: dict[str, bytes] = {}
    for r in receivers:
        with RelayTransport(r, url, **PATIENT) as t:
            while items := t.list():
                for item in items:
                    key = f"{r.fingerprint}/{item.message_id}"
                    got[key] += 1
                    bodies[key] = t.fetch(item).read()
                    t.acknowledge(item)
    drain.bodies = bodies  # type: ignore[attr-defined]
    return got


@pytest.mark.slow
def test_20_clients_50_messages_10_mailboxes_exactly_once(tmp_path):
    senders = [m.Identity.generate() for _ in range(20)]
    receivers = [m.Identity.generate() for _ in range(10)]
    with RelayServer(tmp_path / "log", data=tmp_path / "data", args=FAST) as srv:
        sent = deliver_all(lambda i: srv.url, senders, receivers, 50)
        got = drain(srv.url, receivers)
    assert len(sent) == 1000
    assert set(got) == set(sent) and set(got.values()) == {1}
    assert drain.bodies == sent  # type: ignore[attr-defined]
