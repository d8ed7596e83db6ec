"""Crashes during retention and closing leave a log that verifies.

``Client.close()`` calls ``AuditLog.purge()`` then ``AuditLog.close()``. A process killed at
any point of that sequence (page cache intact: a killed process, not a power cut) must leave a
log that verifies, and the next writer must finish the job.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import medsecure as m
from medsecure.audit import AuditLog, verify

FUTURE = dt.datetime.now(dt.UTC) + dt.timedelta(days=1000)


@pytest.fixture(scope="module")
def me() -> m.Identity:
    return m.Identity.generate()


@pytest.fixture
def base(tmp_path: Path, me: m.Identity) -> Path:
    """A rotated log whose only checkpoint (the one HEAD names) is in its oldest file, with
    records after it: what a long-running client looks like between checkpoints."""
    home = tmp_path / "base"
    log = AuditLog(home / "audit", identity=me, max_bytes=2048, checkpoint_every=10**6)
    for i in range(60):
        log.append("deliver", message_id=f"01M{i:023d}", counterparty="810000000017")
    del log  # abandoned, not closed: no final checkpoint
    assert len(list((home / "audit").glob("audit-*.jsonl"))) > 4
    return home


def copy(base: Path, to: Path) -> Path:
    shutil.copytree(base, to)
    return to / "audit"


class Crash(BaseException):
    """Stands for the process dying: nothing below catches a BaseException."""


@pytest.fixture
def crash_at(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], list[int]]]:
    """Make the n-th durable step (fsync, rename or unlink) never happen, and everything after
    it neither. Returns the step counter so the caller knows when n was past the end."""
    counter = [0]
    limit = [10**9]
    real: dict[str, Any] = {name: getattr(os, name) for name in ("fsync", "replace", "unlink")}

    def wrap(name: str) -> Any:
        def step(*args: Any, **kw: Any) -> Any:
            counter[0] += 1
            if counter[0] >= limit[0]:
                raise Crash(name)
            return real[name](*args, **kw)

        return step

    for name in real:
        monkeypatch.setattr(os, name, wrap(name))

    def arm(n: int) -> list[int]:
        counter[0] = 0
        limit[0] = n
        return counter

    yield arm
    monkeypatch.undo()


def test_crash_at_every_step_of_purge_then_close(
    base: Path, tmp_path: Path, me: m.Identity, crash_at: Callable[[int], list[int]]
) -> None:
    n = 1
    while True:
        folder = copy(base, tmp_path / f"run{n}")
        counter = crash_at(n)
        log = AuditLog(folder, identity=me)
        finished = False
        try:
            log.purge(now=FUTURE)  # what Client.close() does, in its order
            log.close()
            finished = True
        except Crash:
            pass  # the process died here: nothing more of it runs
        crash_at(10**9)
        report = verify(folder, public=me.public)
        assert report.ok, f"crash at step {n}: {report.problem}"
        # the next writer completes the purge and the log still verifies
        again = AuditLog(folder, identity=me)
        again.purge(now=FUTURE)
        again.close()
        report = verify(folder, public=me.public)
        assert report.ok, f"after crash at step {n}: {report.problem}"
        assert len(list(folder.glob("audit-*.jsonl"))) == 1
        if finished:
            assert counter[0] < n
            break
        n += 1
    assert n > 8  # the purge record, its checkpoint, HEAD, the anchor, then each unlink


CHILD = r"""
import datetime as dt, os, signal, sys
import medsecure as m
from medsecure.audit import AuditLog
ident = m.Identity.load(sys.argv[2], passphrase="pw")
log = AuditLog(sys.argv[1], identity=ident)
real = os.unlink
calls = []
def unlink(path, *a, **kw):
    calls.append(path)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill -9, between two removals
    return real(path, *a, **kw)
os.unlink = unlink
log.purge(now=dt.datetime.now(dt.UTC) + dt.timedelta(days=1000))
log.close()
"""


def test_kill_minus_nine_during_purge(base: Path, tmp_path: Path, me: m.Identity) -> None:
    from conftest import FAST_KDF

    me.save(tmp_path / "me.key", passphrase="pw", **FAST_KDF)
    folder = copy(base, tmp_path / "home")
    before = len(list(folder.glob("audit-*.jsonl")))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(tmp_path / "me.key")], check=False
    )
    assert proc.returncode == -signal.SIGKILL
    after = len(list(folder.glob("audit-*.jsonl")))
    assert after == before - 1  # killed after the first removal
    report = verify(folder, public=me.public)
    assert report.ok, report.problem
    log = AuditLog(folder, identity=me)
    assert log.purge(now=FUTURE)
    log.close()
    report = verify(folder, public=me.public)
    assert report.ok and len(list(folder.glob("audit-*.jsonl"))) == 1, report.problem
