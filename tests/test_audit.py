"""The audit log: chain, checkpoints, tampering detection, torn tails, rotation, export."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import medsecure as m
from medsecure.audit import AuditLog, export, verify


@pytest.fixture(scope="module")
def me() -> m.Identity:
    return m.Identity.generate()


def fill(folder: Path, me: m.Identity, n: int, **kw: object) -> AuditLog:
    log = AuditLog(folder, identity=me, actor_id="810000005479", **kw)  # type: ignore[arg-type]
    for i in range(n):
        log.append("send", message_id=f"01M{i:023d}", counterparty="810000000017", result="queued")
    return log


def lines(folder: Path) -> list[bytes]:
    return (folder / "audit-000001.jsonl").read_bytes().splitlines(keepends=True)


def test_chain_and_checkpoints(tmp_path: Path, me: m.Identity) -> None:
    log = fill(tmp_path, me, 20, checkpoint_every=8)
    log.close()
    report = verify(tmp_path, public=me.public)
    assert report.ok, report.problem
    assert (
        report.records == 20 + 1 + 2 + 1
    )  # records, the first checkpoint, two periodic, the final one
    assert report.checkpoints == 4
    head = json.loads((tmp_path / "HEAD").read_text())
    assert head["seq"] == report.records
    for line in lines(tmp_path):
        assert line[:12].isdigit() and line.endswith(b"\n")


def rewrite(folder: Path, new_lines: list[bytes]) -> None:
    (folder / "audit-000001.jsonl").write_bytes(b"".join(new_lines))


def test_edited_record_is_detected(tmp_path: Path, me: m.Identity) -> None:
    fill(tmp_path, me, 10).close()
    ls = lines(tmp_path)
    ls[4] = ls[4].replace(b'"result":"queued"', b'"result":"sent!!"')
    rewrite(tmp_path, ls)
    report = verify(tmp_path, public=me.public)
    assert not report.ok and report.first_broken == 5 and "altered" in (report.problem or "")


def test_deleted_record_is_detected(tmp_path: Path, me: m.Identity) -> None:
    fill(tmp_path, me, 10).close()
    ls = lines(tmp_path)
    del ls[6]
    rewrite(tmp_path, ls)
    report = verify(tmp_path, public=me.public)
    assert (
        not report.ok
        and report.first_broken == 7
        and "deleted or reordered" in (report.problem or "")
    )


def test_reordered_pair_is_detected(tmp_path: Path, me: m.Identity) -> None:
    fill(tmp_path, me, 10).close()
    ls = lines(tmp_path)
    ls[3], ls[4] = ls[4], ls[3]
    rewrite(tmp_path, ls)
    report = verify(tmp_path, public=me.public)
    assert not report.ok and report.first_broken == 4


def test_truncated_tail_is_detected(tmp_path: Path, me: m.Identity) -> None:
    fill(tmp_path, me, 10).close()
    ls = lines(tmp_path)
    rewrite(tmp_path, ls[:-3])  # the final checkpoint and two records before it
    report = verify(tmp_path, public=me.public)
    assert not report.ok and "truncated" in (report.problem or "")


def test_rewritten_log_is_detected(tmp_path: Path, me: m.Identity) -> None:
    fill(tmp_path, me, 5).close()
    forger = m.Identity.generate()
    (tmp_path / "audit-000001.jsonl").unlink()
    (tmp_path / "HEAD").unlink()
    fill(tmp_path, forger, 5).close()  # a consistent chain, but signed by someone else
    report = verify(tmp_path, public=me.public)
    assert not report.ok and "not signed by the expected identity" in (report.problem or "")
    honest = tmp_path / "honest"
    fill(honest, me, 3).close()
    (honest / "HEAD").unlink()  # deleting HEAD does not make a log look authentic
    assert "HEAD is missing" in (verify(honest, public=me.public).problem or "")


def test_torn_last_line_verifies_and_is_repaired(tmp_path: Path, me: m.Identity) -> None:
    log = fill(tmp_path, me, 5)
    with (tmp_path / "audit-000001.jsonl").open("ab") as fh:
        fh.write(b'000000000099 abc {"acti')  # what a kill during write() leaves
    report = verify(tmp_path, public=me.public)
    assert report.ok and report.torn_tail
    log2 = AuditLog(tmp_path, identity=me)
    log2.append("receive", message_id="01M0")
    log2.close()
    log.close()
    report = verify(tmp_path, public=me.public)
    assert report.ok and not report.torn_tail, report.problem
    actions = [json.loads(line[78:])["action"] for line in lines(tmp_path)]
    assert "repair" in actions
    repair = next(json.loads(line[78:]) for line in lines(tmp_path) if b'"repair"' in line)
    assert repair["torn_bytes"] == 23


WRITER = r"""
import sys
import medsecure as m
from medsecure.audit import AuditLog
ident = m.Identity.load(sys.argv[2], passphrase="pw")
log = AuditLog(sys.argv[1], identity=ident, checkpoint_every=50)
i = 0
while True:
    i += 1
    log.append("delivery", message_id="01M%023d" % i, counterparty="810000000017", result="sent")
    if i == 20:
        print("ready", flush=True)
"""


def test_kill_minus_nine_while_appending(tmp_path: Path, me: m.Identity) -> None:
    from conftest import FAST_KDF

    me.save(tmp_path / "me.key", passphrase="pw", **FAST_KDF)
    folder = tmp_path / "audit"
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(folder), str(tmp_path / "me.key")],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.05 + os.urandom(1)[0] / 2550)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        report = verify(folder, public=me.public)
        assert report.ok, report.problem
    AuditLog(folder, identity=me).close()
    report = verify(folder, public=me.public)
    assert report.ok and not report.torn_tail and report.records > 100


def test_group_commit(tmp_path: Path, me: m.Identity, monkeypatch: pytest.MonkeyPatch) -> None:
    log = fill(tmp_path, me, 1)  # the first record and its checkpoint
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    log.append("one")
    assert len(calls) == 1  # one record, one fsync
    calls.clear()
    with log.batch():
        for i in range(50):
            log.append("delivery", message_id=f"x{i}")
    assert len(calls) == 1  # fifty records, one fsync
    monkeypatch.undo()
    log.close()
    assert verify(tmp_path, public=me.public).ok


def test_rotation_and_retention(tmp_path: Path, me: m.Identity) -> None:
    log = fill(tmp_path, me, 300, max_bytes=4096, checkpoint_every=1000)
    files = sorted(p.name for p in tmp_path.glob("audit-*.jsonl"))
    assert len(files) > 5
    log.close()
    assert verify(tmp_path, public=me.public).ok
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    removed = AuditLog(tmp_path, identity=me).purge(now=future)
    assert removed and removed == files[: len(removed)]
    report = verify(tmp_path, public=me.public)
    assert report.ok, report.problem
    assert any("purged" in w for w in report.warnings)


def test_records_refuse_health_data(tmp_path: Path, me: m.Identity) -> None:
    log = AuditLog(tmp_path, identity=me)
    for key in ("subject", "filename", "ins", "patient", "content"):
        with pytest.raises(ValueError, match="never hold"):
            log.append("send", **{key: "x"})
    linked = log.link("279035121518989")
    assert linked == log.link("279035121518989") and "279035121518989" not in linked
    assert AuditLog(tmp_path, identity=me).link("279035121518989") == linked  # stable per home
    log.close()


def test_export(tmp_path: Path, me: m.Identity) -> None:
    fill(tmp_path, me, 5).close()
    out = io.StringIO()
    assert export(tmp_path, out, fmt="jsonl") == 5 + 2
    rows = [json.loads(x) for x in out.getvalue().splitlines()]
    assert rows[0]["action"] == "send" and rows[0]["seq"] == 1 and "sigs" not in rows[1]
    out = io.StringIO()
    assert (
        export(tmp_path, out, fmt="csv", since=dt.datetime.now(dt.UTC) + dt.timedelta(days=1)) == 0
    )
    out = io.StringIO()
    export(tmp_path, out, fmt="csv")
    assert out.getvalue().splitlines()[0].startswith("seq,ts,action,actor")
    with pytest.raises(ValueError):
        export(tmp_path, io.StringIO(), fmt="xml")
