"""Properties the de-duplication refactor moved into shared code (storage's commit_upload and
admit(), FileTransport's _open_regular), checked on the real components: a relay keeps exactly
one body for a message id whatever is replayed, conflicts or is refused by quota, on SQLite and
on PostgreSQL with a shared bodies folder; a drop-folder entry swapped after it was listed is
never followed, never blocks and leaves nothing behind, for take() and fetch() alike."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from relaykit import message_id

from medsecure.models import Endpoint
from medsecure.relay.server.storage import SQLiteStorage
from medsecure.relay.server.storage._base import INLINE_MAX, Conflict, QuotaExceeded
from medsecure.transports import FileTransport, UnsupportedItem

BOX = "ms1" + "a" * 52
SENDER = "ms1" + "s" * 52
STRANGER = "ms1" + "t" * 52
LARGE = b"L" * (INLINE_MAX + 1)


def _upload(storage: Any, body: bytes, *, mid: str, sender: str = SENDER, quota: int = 1 << 30):
    pending = storage.begin_upload(len(body))
    pending.write(body)
    return storage.commit_upload(
        pending,
        mailbox=BOX,
        message_id=mid,
        sender=sender,
        digest=hashlib.sha256(body).digest(),
        size=len(body),
        now=int(time.time()),
        quota=quota,
    )


def _files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "objects").rglob("*") if p.is_file()) + sorted(
        (root / "tmp").iterdir()
    )


def _one_body_whatever_follows(storage: Any, root: Path) -> None:
    """The first large upload of an id is kept; an identical replay, the same body from
    another sender, another body under the id, and an upload over quota each leave no file."""
    mid = message_id()
    record, new = _upload(storage, LARGE, mid=mid)
    assert new
    (kept,) = _files(root)
    assert _upload(storage, LARGE, mid=mid) == (record, False)  # identical replay
    with pytest.raises(Conflict):
        _upload(storage, LARGE, mid=mid, sender=STRANGER)  # same bytes, other sender
    with pytest.raises(Conflict):
        _upload(storage, b"M" * len(LARGE), mid=mid)  # same sender, other body
    with pytest.raises(QuotaExceeded):  # checked with what waits: the first body counts
        _upload(storage, LARGE, mid=message_id(), quota=len(LARGE) + 1)
    assert _files(root) == [kept]
    assert storage.usage(BOX) == len(LARGE)
    assert [m.message_id for m in storage.waiting(BOX, 10)] == [mid]
    reader = storage.open_body(BOX, mid)
    assert reader is not None and reader.read(0, len(LARGE)) == LARGE
    assert storage.acknowledge(BOX, mid, int(time.time()))
    assert _files(root) == []


def test_sqlite_keeps_one_large_body_per_id_whatever_is_replayed_or_refused(tmp_path: Path):
    storage = SQLiteStorage(tmp_path / "data")
    try:
        _one_body_whatever_follows(storage, tmp_path / "data")
    finally:
        storage.close()


@pytest.fixture
def pg_folder_storage(pg: Any, tmp_path: Path) -> Iterator[tuple[Any, Path, str]]:
    from medsecure.relay.server.storage._postgres import PostgresStorage

    name = f"refactor_{time.monotonic_ns()}"
    with psycopg.connect(pg.admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = pg.url.rsplit("/", 1)[0] + "/" + name
    storage = PostgresStorage(url, bodies=tmp_path / "bodies")
    yield storage, tmp_path / "bodies", url
    storage.close()


def test_postgres_keeps_one_large_body_per_id_in_the_shared_folder(
    pg_folder_storage: tuple[Any, Path, str],
) -> None:
    storage, root, url = pg_folder_storage
    _one_body_whatever_follows(storage, root)
    with psycopg.connect(url) as conn:  # nothing left for the sweep either
        row = conn.execute("SELECT count(*) FROM relay_body_files").fetchone()
        assert row is not None and row[0] == 0


# -- the drop folder: an entry swapped between list() and take()/fetch() -------------------------


def _fifo(path: Path, tmp: Path) -> None:
    os.mkfifo(path)


def _link_to_secret(path: Path, tmp: Path) -> None:
    (tmp / "secret").write_bytes(b"not for the inbox")
    path.symlink_to(tmp / "secret")


def _folder(path: Path, tmp: Path) -> None:
    path.mkdir()


def _in_thread(fn: Callable[[], object]) -> BaseException | None:
    out: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            out.append(None)
        except BaseException as exc:
            out.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "blocked"
    return out[0]


@pytest.mark.parametrize("swap", [_fifo, _link_to_secret, _folder], ids=["fifo", "link", "dir"])
def test_a_drop_folder_entry_swapped_after_listing_is_refused_by_take_and_fetch(
    tmp_path: Path, swap: Callable[[Path, Path], None]
) -> None:
    box = FileTransport.prepare(tmp_path / "box")
    t = FileTransport(box)
    t.deliver(
        Endpoint(kind="drop", path=str(box)),
        io.BytesIO(b"envelope"),
        message_id=message_id(),
        size=8,
    )
    (item,) = t.list()
    (entry,) = (box / "new").iterdir()
    entry.unlink()
    swap(entry, tmp_path)
    target = tmp_path / "taken"
    assert isinstance(_in_thread(lambda: t.take(item, target)), UnsupportedItem)
    assert not target.exists() and not target.is_symlink()
    assert isinstance(_in_thread(lambda: t.fetch(item).close()), UnsupportedItem)
    assert os.path.lexists(entry)  # left alone


# -- a hostile relay and the resumable download (the sans-I/O _Resume both drivers share) -------

BODY = bytes(range(256)) * (3 << 12)  # 3 MiB: a cut at half comes after a whole 1 MiB chunk
RESUMED_AT = 1 << 20  # what the transport had received (whole chunks) when the cut came
MID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


class _HostileRelay:
    """A relay on loopback that accepts the key bundle and answers downloads as ``plan`` says:
    ``size`` (a body of another size than listed), ``cut`` (half of what is asked, then the
    connection closes, every time), ``restart`` (a cut, then a resume answered 200 with the
    whole body) or ``resume`` (a cut, then the rest with 206). It records the Ranges asked."""

    def __init__(self, plan: str) -> None:
        import http.server

        self.plan = plan
        self.ranges: list[str | None] = []
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_PUT(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                asked = self.headers.get("Range")
                relay.ranges.append(asked)
                if relay.plan == "size":
                    self._send(200, BODY + b"x", BODY + b"x")
                elif asked is None:
                    self._send(200, BODY, BODY[: len(BODY) // 2], cut=True)
                elif relay.plan == "restart":
                    self._send(200, BODY, BODY)
                else:
                    start = int(asked.removeprefix("bytes=").rstrip("-"))
                    rest = BODY[start:]
                    cut = relay.plan == "cut"
                    self._send(
                        206, rest, rest[: len(rest) // 2] if cut else rest, cut=cut, first=start
                    )

            def _send(
                self, status: int, announced: bytes, sent: bytes, *, cut: bool = False, first=0
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(announced)))
                self.send_header("ETag", '"the-digest"')
                if status == 206:
                    last = len(BODY) - 1
                    self.send_header("Content-Range", f"bytes {first}-{last}/{len(BODY)}")
                self.end_headers()
                self.wfile.write(sent)
                self.wfile.flush()
                if cut:
                    self.close_connection = True

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # the transport hanging up on a body it refuses is expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def _take_sync(identity: Any, url: str, item: Any, target: Path) -> None:
    from medsecure.transports import RelayTransport

    with RelayTransport(identity, url, retries=2, sleep=lambda s: None) as t:
        t.take(item, target)


def _take_async(identity: Any, url: str, item: Any, target: Path) -> None:
    import asyncio

    from medsecure.transports import AsyncRelayTransport

    async def no_wait(s: float) -> None:
        return None

    async def go() -> None:
        async with AsyncRelayTransport(identity, url, retries=2, sleep=no_wait) as t:
            await t.take(item, target)

    asyncio.run(go())


@pytest.mark.parametrize("take", [_take_sync, _take_async], ids=["sync", "async"])
@pytest.mark.parametrize(
    ("plan", "error"),
    [
        ("size", "another size than it listed"),
        ("cut", "relay unreachable"),
        ("restart", "could not resume"),
        ("resume", None),
    ],
)
def test_a_hostile_relay_cannot_make_a_download_longer_restarted_or_partial(
    tmp_path: Path, take: Callable[..., None], plan: str, error: str | None
) -> None:
    import medsecure as m
    from medsecure.transports import Incoming

    relay = _HostileRelay(plan)
    target = tmp_path / "taken"
    item = Incoming(handle=MID, message_id=MID, size=len(BODY))
    try:
        if error is None:
            take(m.Identity.generate(), relay.url, item, target)
            assert target.read_bytes() == BODY and target.stat().st_mode & 0o777 == 0o600
            assert relay.ranges == [None, f"bytes={RESUMED_AT}-"]
        else:
            with pytest.raises(m.TransportUnavailable, match=error):
                take(m.Identity.generate(), relay.url, item, target)
            assert not target.exists()  # nothing partial is left to be mistaken for a result
            if plan == "cut":  # resumed where it broke each time, given up after the retries
                assert relay.ranges == [None, f"bytes={RESUMED_AT}-", f"bytes={2 * RESUMED_AT}-"]
    finally:
        relay.close()


@pytest.mark.parametrize("take", [_take_sync, _take_async], ids=["sync", "async"])
def test_a_target_that_cannot_be_created_is_a_storage_error(
    tmp_path: Path, take: Callable[..., None]
) -> None:
    """The inbox's file cannot be made (here: its folder is gone): both drivers say
    StorageError, which the client handles by leaving the envelope on the relay, never a raw
    OSError that would stop receive()."""
    import medsecure as m
    from medsecure.transports import Incoming

    relay = _HostileRelay("resume")
    item = Incoming(handle=MID, message_id=MID, size=len(BODY))
    try:
        with pytest.raises(m.StorageError, match="cannot store an incoming envelope"):
            take(m.Identity.generate(), relay.url, item, tmp_path / "gone" / "taken")
    finally:
        relay.close()
