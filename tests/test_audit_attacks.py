"""The audit log against someone who can write its folder but cannot read the identity key.

The attacker here knows the format (it is documented), so every forged line is built the way
the writer builds one: right sequence number, right ``prev``, canonical JSON. What the attacker
lacks is the identity's private key (checkpoint signatures, the per-record MAC) and write
access to the anchor kept beside the folder (``audit.anchor``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path

import pytest
from test_audit import fill  # one way to write a log of n "send" records

import medsecure as m
from medsecure.audit import AuditLog, verify


@pytest.fixture(scope="module")
def me() -> m.Identity:
    return m.Identity.generate()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "audit"  # the anchor lives beside it: tmp_path / "audit.anchor"


def files(folder: Path) -> list[Path]:
    return sorted(folder.glob("audit-*.jsonl"))


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def body(line: bytes) -> dict[str, object]:
    parsed = json.loads(line[78:])
    assert isinstance(parsed, dict)
    return parsed


def seq_of(line: bytes) -> int:
    return int(line[:12])


def forge(after: bytes, body: dict[str, object], *, seq: int | None = None) -> bytes:
    """A record chained after ``after`` exactly as the writer would chain it (without a key)."""
    prev = hashlib.sha256(after.rstrip(b"\n")).hexdigest()
    number = seq_of(after) + 1 if seq is None else seq
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"{number:012d} {prev} {text}\n".encode("ascii")


def set_head(folder: Path, line: bytes, name: str) -> None:
    digest = hashlib.sha256(line.rstrip(b"\n")).hexdigest()
    head = {"file": name, "hash": digest, "seq": seq_of(line)}
    (folder / "HEAD").write_text(json.dumps(head, sort_keys=True, separators=(",", ":")) + "\n")


def checkpoints(ls: list[bytes]) -> list[int]:
    return [i for i, x in enumerate(ls) if body(x)["action"] == "checkpoint"]


# -- a missing start of the log ---------------------------------------------------------------


def test_first_records_deleted_without_purge_record(folder: Path, me: m.Identity) -> None:
    fill(folder, me, 10, checkpoint_every=4).close()
    (path,) = files(folder)
    path.write_bytes(b"".join(lines(path)[3:]))
    report = verify(folder, public=me.public)
    assert not report.ok and report.first_broken == 1, report
    assert "missing" in (report.problem or "")


def test_oldest_file_deleted_without_purge_record(folder: Path, me: m.Identity) -> None:
    fill(folder, me, 60, max_bytes=2048, checkpoint_every=16).close()
    assert len(files(folder)) > 3
    files(folder)[0].unlink()
    report = verify(folder, public=me.public)
    assert not report.ok and report.first_broken == 1, report


def test_forged_purge_record_is_not_enough(folder: Path, me: m.Identity) -> None:
    """A purge record the attacker appends (no checkpoint covers it) justifies nothing."""
    fill(folder, me, 60, max_bytes=2048, checkpoint_every=16).close()
    first, *_, last = files(folder)
    removed = lines(first)[-1]
    first.unlink()
    tail = lines(last)[-1]
    purge = {
        "action": "purge",
        "actor": me.fingerprint,
        "files": [first.name],
        "through_seq": seq_of(removed),
        "through_hash": hashlib.sha256(removed.rstrip(b"\n")).hexdigest(),
        "ts": dt.datetime.now(dt.UTC).isoformat(),
    }
    with last.open("ab") as fh:
        fh.write(forge(tail, purge))
    report = verify(folder, public=me.public)
    assert not report.ok and report.first_broken == 1, report


def test_records_missing_after_a_real_purge_are_named(folder: Path, me: m.Identity) -> None:
    log = fill(folder, me, 60, max_bytes=2048, checkpoint_every=16)
    log.close()
    removed = AuditLog(folder, identity=me).purge(now=dt.datetime.now(dt.UTC) + dt.timedelta(1000))
    assert removed
    report = verify(folder, public=me.public)
    assert report.ok, report.problem
    (path,) = files(folder)
    ls = lines(path)
    through = seq_of(ls[0]) - 1
    path.write_bytes(b"".join(ls[2:]))  # the first two records after the purge
    report = verify(folder, public=me.public)
    assert not report.ok and report.first_broken == through + 1, report


# -- truncation to an earlier checkpoint ----------------------------------------------------------


def truncate_to_earlier_checkpoint(folder: Path) -> tuple[int, list[bytes]]:
    """Cut the log after its second-to-last checkpoint and point HEAD at it; return that
    checkpoint's sequence number and the removed lines."""
    (path,) = files(folder)
    ls = lines(path)
    cut = checkpoints(ls)[-2]
    path.write_bytes(b"".join(ls[: cut + 1]))
    set_head(folder, ls[cut], path.name)
    return seq_of(ls[cut]), ls[cut + 1 :]


def test_truncation_to_earlier_checkpoint_with_head_rewritten(folder: Path, me: m.Identity) -> None:
    fill(folder, me, 20, checkpoint_every=5).close()
    assert verify(folder, public=me.public).ok
    kept, _ = truncate_to_earlier_checkpoint(folder)
    report = verify(folder, public=me.public)
    assert not report.ok and report.first_broken == kept + 1, report
    assert "truncated" in (report.problem or "")
    # without the anchor only HEAD (inside the folder, rewritten) is left: the limit is stated
    alone = verify(folder, public=me.public, anchor=False)
    assert alone.ok and any("anchor" in w for w in alone.warnings)


def test_truncated_log_stays_detected_after_the_writer_continues(
    folder: Path, me: m.Identity
) -> None:
    fill(folder, me, 20, checkpoint_every=5).close()
    kept, _ = truncate_to_earlier_checkpoint(folder)
    fill(folder, me, 3, checkpoint_every=5).close()  # signs new checkpoints, moves the anchor
    report = verify(folder, public=me.public)
    assert not report.ok and report.first_broken == kept + 1, report
    actions = [body(x)["action"] for x in lines(files(folder)[0])]
    assert "tamper" in actions


def test_truncation_with_forged_continuation(folder: Path, me: m.Identity) -> None:
    """The attacker cuts back to an old checkpoint and writes new records past the anchor."""
    fill(folder, me, 20, checkpoint_every=5).close()
    kept, removed = truncate_to_earlier_checkpoint(folder)
    (path,) = files(folder)
    last = lines(path)[-1]
    with path.open("ab") as fh:
        for _ in range(len(removed) + 3):
            last = forge(last, {"action": "send", "actor": me.fingerprint, "ts": "2026-01-01"})
            fh.write(last)
    report = verify(folder, public=me.public)
    assert not report.ok and report.first_broken == kept + 1, report
    fill(folder, me, 2).close()  # the writer notices too, before signing anything
    report = verify(folder, public=me.public)
    assert not report.ok and report.first_broken == kept + 1, report


# -- a forged record is never signed ----------------------------------------------------------------


def test_record_forged_after_the_last_checkpoint_is_never_signed(
    folder: Path, me: m.Identity
) -> None:
    fill(folder, me, 6).close()
    (path,) = files(folder)
    forged = forge(lines(path)[-1], {"action": "receive", "actor": me.fingerprint, "ts": "x"})
    with path.open("ab") as fh:
        fh.write(forged)
    log = fill(folder, me, 2)  # the next writer checks before it signs
    log.close()
    report = verify(folder, public=me.public)
    assert not report.ok and report.first_broken == seq_of(forged), report
    # the alarm did not stop the log: records keep being appended and signed
    before = len(lines(path))
    fill(folder, me, 3).close()
    assert len(lines(path)) > before
    report = verify(folder, public=me.public)
    assert report.first_broken == seq_of(forged) and report.checkpoints >= 4


def test_unsigned_tail_is_authenticated_with_the_writers_key(folder: Path, me: m.Identity) -> None:
    fill(folder, me, 6).close()
    (path,) = files(folder)
    forged = forge(lines(path)[-1], {"action": "receive", "actor": me.fingerprint, "ts": "x"})
    with path.open("ab") as fh:
        fh.write(forged)
    report = verify(folder, public=me.public)  # no key: it looks like an unsigned tail
    assert report.ok and any("not covered by a checkpoint" in w for w in report.warnings)
    report = verify(folder, public=me.public, identity=me)  # the writer's key tells
    assert not report.ok and report.first_broken == seq_of(forged), report


def test_record_forged_while_the_writer_runs(folder: Path, me: m.Identity) -> None:
    log = fill(folder, me, 4)
    (path,) = files(folder)
    forged = forge(lines(path)[-1], {"action": "ack", "actor": me.fingerprint, "ts": "x"})
    with path.open("ab") as fh:
        fh.write(forged)
    log.append("send", message_id="01M", counterparty="810000000017", result="queued")
    log.close()
    report = verify(folder, public=me.public)
    assert not report.ok and report.first_broken == seq_of(forged), report


def test_unsigned_tail_rewritten_in_place(folder: Path, me: m.Identity) -> None:
    """An edit of an unsigned record, re-chained to the end, is named at the edited record."""
    log = fill(folder, me, 6)
    (path,) = files(folder)
    ls = lines(path)
    target = len(ls) - 3
    edited = ls[target].replace(b'"result":"queued"', b'"result":"failed"')
    chained = [edited]
    for x in ls[target + 1 :]:
        chained.append(forge(chained[-1], body(x)))
    path.write_bytes(b"".join(ls[:target] + chained))  # the same size: the writer's cache holds
    log.close()
    report = verify(folder, public=me.public)
    assert not report.ok and report.first_broken == seq_of(ls[target]), report


# -- the first broken record is named correctly -----------------------------------------------------


def single(folder: Path, me: m.Identity) -> tuple[Path, list[bytes]]:
    fill(folder, me, 10).close()
    (path,) = files(folder)
    return path, lines(path)


def test_renumbered_record_is_named(folder: Path, me: m.Identity) -> None:
    path, ls = single(folder, me)
    assert seq_of(ls[4]) == 5
    ls[4] = b"000000000003" + ls[4][12:]
    path.write_bytes(b"".join(ls))
    report = verify(folder, public=me.public)
    assert not report.ok and report.first_broken == 5, report


def test_duplicated_record_is_named(folder: Path, me: m.Identity) -> None:
    """A copy of record 5 placed after it: records 1-5 verify, the place of record 6 does not."""
    path, ls = single(folder, me)
    ls.insert(5, ls[4])
    path.write_bytes(b"".join(ls))
    report = verify(folder, public=me.public)
    assert not report.ok and report.first_broken == 6, report
    assert "record 5 found where record 6 was expected" in (report.problem or "")


def test_record_with_altered_link_is_named(folder: Path, me: m.Identity) -> None:
    """Record 6's ``prev`` edited: record 5 is intact and must not be blamed."""
    path, ls = single(folder, me)
    x = ls[5]
    flipped = b"0" if x[13:14] != b"0" else b"1"
    ls[5] = x[:13] + flipped + x[14:]
    path.write_bytes(b"".join(ls))
    report = verify(folder, public=me.public)
    assert not report.ok and report.first_broken == 6, report


# -- purge and close ------------------------------------------------------------------------------


def test_purge_keeps_the_checkpoint_head_names(folder: Path, me: m.Identity) -> None:
    """HEAD names the first checkpoint (file 1), the later files hold none: purge must not
    remove what HEAD needs without first signing a newer checkpoint."""
    log = fill(folder, me, 60, max_bytes=2048, checkpoint_every=10**6)
    assert json.loads((folder / "HEAD").read_text())["file"] == "audit-000001.jsonl"
    removed = log.purge(now=dt.datetime.now(dt.UTC) + dt.timedelta(days=1000))
    assert "audit-000001.jsonl" in removed
    report = verify(folder, public=me.public)
    assert report.ok, report.problem
    log.close()
    assert verify(folder, public=me.public).ok


def test_record_field_names_are_plain(folder: Path, me: m.Identity) -> None:
    log = AuditLog(folder, identity=me)
    for key in ("~mac", "\u00e9t\u00e9", "a b"):
        with pytest.raises(ValueError, match="field"):
            log.append("send", **{key: "x"})
    log.close()


def test_damaged_anchor_fails_verification(folder: Path, me: m.Identity) -> None:
    fill(folder, me, 3).close()
    anchor = folder.parent / "audit.anchor"
    assert anchor.exists() and (anchor.stat().st_mode & 0o777) == 0o600
    anchor.write_text("{not json")
    report = verify(folder, public=me.public)
    assert not report.ok and "anchor" in (report.problem or "")


def test_forged_tamper_record_does_not_move_the_report(folder: Path, me: m.Identity) -> None:
    """A forged ``tamper`` record claiming record 1 is bad: the writer flags the forged record
    itself, and the report names it, not record 1."""
    fill(folder, me, 6).close()
    (path,) = files(folder)
    claim = {"action": "tamper", "actor": me.fingerprint, "first_bad": 1, "found": "missing"}
    forged = forge(lines(path)[-1], {**claim, "ts": "x"})
    with path.open("ab") as fh:
        fh.write(forged)
    fill(folder, me, 1).close()
    report = verify(folder, public=me.public)
    assert not report.ok and report.first_broken == seq_of(forged), report


def test_unsigned_records_removed_while_the_writer_runs(folder: Path, me: m.Identity) -> None:
    log = fill(folder, me, 8)
    (path,) = files(folder)
    ls = lines(path)
    path.write_bytes(b"".join(ls[:-2]))  # the writer's last two records, not yet signed
    log.append("send", message_id="01M", counterparty="810000000017", result="queued")
    log.close()
    report = verify(folder, public=me.public)
    assert not report.ok and report.first_broken == seq_of(ls[-2]), report


def test_anchor_copy_kept_elsewhere_catches_even_the_key_holder(
    folder: Path, tmp_path: Path, me: m.Identity
) -> None:
    """With the key, the whole log can be re-written and re-signed, and the anchor beside it
    too; a copy of an earlier anchor kept off the machine still tells."""
    from medsecure.audit import FileAnchor

    fill(folder, me, 5).close()
    copy = tmp_path / "kept-by-the-compliance-officer.anchor"
    copy.write_bytes((tmp_path / "audit.anchor").read_bytes())
    fill(folder, me, 5).close()
    assert verify(folder, public=me.public, anchor=FileAnchor(copy)).ok  # an older point
    for p in files(folder):
        p.unlink()
    (folder / "HEAD").unlink()
    (tmp_path / "audit.anchor").unlink()
    fill(folder, me, 12).close()  # a new history, signed with the right key
    assert verify(folder, public=me.public).ok
    report = verify(folder, public=me.public, anchor=FileAnchor(copy))
    assert not report.ok and report.file == "anchor", report


def test_fifo_and_link_in_the_folder_never_block(
    folder: Path, tmp_path: Path, me: m.Identity
) -> None:
    """A FIFO would make a plain open() wait forever; a link would make the writer append to
    whatever it points at. Both are refused, at once, with a clear result."""
    fill(folder, me, 3).close()
    os.mkfifo(folder / "audit-000002.jsonl")
    report = verify(folder, public=me.public)
    assert not report.ok and report.file == "audit-000002.jsonl", report
    with pytest.raises(m.StorageError):
        AuditLog(folder, identity=me).append("send")
    (folder / "audit-000002.jsonl").unlink()
    victim = tmp_path / "victim"
    victim.write_bytes(b"")
    (folder / "audit-000002.jsonl").symlink_to(victim)
    assert not verify(folder, public=me.public).ok
    with pytest.raises(m.StorageError):
        AuditLog(folder, identity=me).append("send")
    assert victim.read_bytes() == b""


def test_consistent_rewrite_before_a_checkpoint(folder: Path, me: m.Identity) -> None:
    """Records re-chained up to a checkpoint: the public key finds the checkpoint whose
    signature fails; the writer's key names the first rewritten record."""
    path, ls = single(folder, me)
    cps = checkpoints(ls)
    target = cps[0] + 2
    assert target < cps[1]
    chained = [*ls[:target], ls[target].replace(b'"result":"queued"', b'"result":"failed"')]
    for x in ls[target + 1 :]:
        chained.append(forge(chained[-1], body(x)))
    path.write_bytes(b"".join(chained))
    set_head(folder, chained[-1], path.name)
    (folder.parent / "audit.anchor").unlink()  # the strongest case for the public verifier
    report = verify(folder, public=me.public)
    assert not report.ok and report.first_broken == seq_of(ls[cps[1]]), report
    report = verify(folder, public=me.public, identity=me)
    assert not report.ok and report.first_broken == seq_of(ls[target]), report


# -- honest writers are never flagged ----------------------------------------------------------------


def test_concurrent_writers_raise_no_alarm(folder: Path, me: m.Identity) -> None:
    """Two writers (two objects, as two processes would have) interleave appends, checkpoints
    and rotations: each checks what the other wrote, and finds nothing to report."""
    import threading

    logs = [AuditLog(folder, identity=me, checkpoint_every=7, max_bytes=4096) for _ in range(2)]

    def work(log: AuditLog, n: int) -> None:
        for i in range(n):
            if i % 25 == 0:
                with log.batch():
                    log.append("deliver", attempt=i)
                    log.append("deliver", attempt=i + 1)
            else:
                log.append("send", attempt=i)

    threads = [threading.Thread(target=work, args=(log, 120)) for log in logs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs:
        log.close()
    report = verify(folder, public=me.public, identity=me)
    assert report.ok, report.problem
    assert len(files(folder)) > 3 and report.records > 240
    every = b"".join(p.read_bytes() for p in files(folder))
    assert b'"action":"tamper"' not in every
