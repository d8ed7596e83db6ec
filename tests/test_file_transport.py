"""FileTransport: Maildir layout, atomic visibility, concurrent writers and readers."""

from __future__ import annotations

import datetime as dt
import io
import os
import threading
from pathlib import Path

import pytest

import medsecure as m
from medsecure.envelope._message import new_message_id
from medsecure.models import Endpoint
from medsecure.transports import FileTransport


def mid() -> str:
    return new_message_id(dt.datetime.now(dt.UTC))


def test_layout_and_names(tmp_path: Path) -> None:
    box = FileTransport.prepare(tmp_path / "box")
    t = FileTransport(box)
    ident = mid()
    t.deliver(
        Endpoint(kind="drop", path=str(box)), io.BytesIO(b"envelope"), message_id=ident, size=8
    )
    assert os.listdir(box / "new") == [f"{ident}.msec"] and os.listdir(box / "tmp") == []
    (item,) = t.list()
    assert item.message_id == ident and item.size == 8
    with t.fetch(item) as fh:
        assert fh.read() == b"envelope"
    # delivering the same message again is idempotent
    t.deliver(
        Endpoint(kind="drop", path=str(box)), io.BytesIO(b"envelope"), message_id=ident, size=8
    )
    assert len(t.list()) == 1
    t.acknowledge(item)
    t.acknowledge(item)  # twice is fine
    assert t.list() == []
    # foreign files are offered as unsupported (reported once by the client, left alone);
    # bad ids refused
    (box / "new" / "notes.txt").write_text("x")
    (foreign,) = t.list()
    assert foreign.kind == "unsupported" and foreign.message_id is None
    with pytest.raises(ValueError):
        t.fetch(foreign)
    with pytest.raises(ValueError):
        t.deliver(
            Endpoint(kind="drop", path=str(box)), io.BytesIO(b"x"), message_id="../../etc", size=1
        )


def test_unreachable_and_refused(tmp_path: Path) -> None:
    t = FileTransport(tmp_path / "mine")
    with pytest.raises(m.TransportUnavailable, match="not reachable"):
        t.deliver(
            Endpoint(kind="drop", path=str(tmp_path / "unplugged-usb-key")),
            io.BytesIO(b"x"),
            message_id=mid(),
            size=1,
        )
    with pytest.raises(m.DeliveryRejected):
        t.deliver(
            Endpoint(kind="mail", address="a@medecin.mssante.fr"),
            io.BytesIO(b"x"),
            message_id=mid(),
            size=1,
        )
    assert t.list() == []  # a mailbox that does not exist yet is empty


def test_concurrent_writers_and_readers_never_see_partial_files(tmp_path: Path) -> None:
    box = FileTransport.prepare(tmp_path / "shared")
    endpoint = Endpoint(kind="drop", path=str(box))
    payloads: dict[str, bytes] = {}
    lock = threading.Lock()
    seen: dict[str, bytes] = {}
    errors: list[BaseException] = []
    done = threading.Event()

    def writer(n: int) -> None:
        try:
            t = FileTransport(box)
            for _ in range(40):
                ident = mid()
                data = os.urandom(1000 + n) * 50  # ~50 KiB, several write() calls
                with lock:
                    payloads[ident] = data
                t.deliver(endpoint, io.BytesIO(data), message_id=ident, size=len(data))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader() -> None:
        t = FileTransport(box)
        try:
            while not done.is_set() or t.list():
                for item in t.list():
                    try:
                        with t.fetch(item) as fh:
                            data = fh.read()
                    except m.TransportUnavailable:
                        continue  # the other reader took it
                    assert item.message_id is not None
                    with lock:
                        expected = payloads[item.message_id]
                        assert data == expected, "a reader saw a partial or mixed file"
                        seen[item.message_id] = data
                    t.acknowledge(item)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for th in writers + readers:
        th.start()
    for th in writers:
        th.join()
    done.set()
    for th in readers:
        th.join(timeout=60)
    assert not errors, errors
    assert set(seen) == set(payloads) and len(payloads) == 160
    assert os.listdir(box / "new") == [] and os.listdir(box / "tmp") == []
