"""A tamper-evident audit log: append-only JSON lines, hash-chained, with signed checkpoints.

Theory of operation
-------------------
Each record is one line: ``<seq, 12 digits> <prev, 64 hex> <canonical JSON>``, where ``prev`` is
the SHA-256 of the previous line's bytes (64 zeros for the first record) and the JSON (sorted
keys, no spaces, ASCII) holds the rest. Editing, deleting or reordering any record breaks the
chain at that point; the fixed-width prefix lets :func:`verify` check the chain at hashing
speed without parsing JSON.

Every ``checkpoint_every`` records (and when the log is closed) a ``checkpoint`` record is
appended, signed by the local identity (Ed25519 + ML-DSA-65 for a hybrid identity) over
``"medsecure/v1/audit-checkpoint"`` ‖ the record without its signatures. The newest checkpoint
is also written to ``HEAD`` (atomically): a log truncated below it, or rewritten by someone
without the identity's key, no longer verifies.

Appending costs one fsync; :meth:`AuditLog.batch` groups several records under one fsync
(group commit). A process killed while appending leaves at most a torn last line: the next
writer cuts it off and appends a ``repair`` record saying how many bytes it removed, and
:func:`verify` accepts a torn *last* line (reporting it) since no acknowledged record is lost.

Files rotate at ``max_bytes`` (``audit-000001.jsonl``, ``audit-000002.jsonl``, …) and the chain
runs across them. Files older than the retention period (183 days by default: MSSanté asks for
at least 6 months) are removed by :meth:`AuditLog.purge`, which first appends a ``purge``
record naming the last removed record's hash, so the remaining files still verify.

Records never hold health data: no content, subject, file name or patient identity — at most a
keyed hash (HMAC-SHA256 under a per-home secret) of an INS where records must be linked.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import datetime as dt

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one writer per home is assumed there
    fcntl = None  # type: ignore[assignment]
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

from ._errors import StorageError
from ._fs import atomic_write, fsync_dir
from ._identity import Identity, PublicIdentity
from .envelope._labels import LABEL_AUDIT_CHECKPOINT as LABEL_CHECKPOINT

__all__ = ["AuditLog", "VerifyReport", "export", "verify"]

GENESIS = "0" * 64
GENESIS_B = GENESIS.encode()
FILE_RE = re.compile(r"audit-(\d{6})\.jsonl")
DEFAULT_RETENTION_DAYS = 183
FORBIDDEN_KEYS = {"subject", "body", "filename", "filenames", "title", "ins", "patient", "content"}


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(
        "ascii"
    )


def _sha256(data: bytes) -> str:
    # The chain hashes every line separately; hashlib's SHA-256 (OpenSSL's, as cryptography's)
    # has a third of cryptography's per-call overhead, which is the whole cost for short lines.
    return hashlib.sha256(data).hexdigest()


PREFIX_LEN = 12 + 1 + 64 + 1


def _line(seq: int, prev: str, body: dict[str, Any]) -> bytes:
    return f"{seq:012d} {prev} ".encode("ascii") + _canonical(body)


def _split(line: bytes) -> tuple[int, str, dict[str, Any]]:
    """Parse a line; ValueError if malformed."""
    if len(line) < PREFIX_LEN + 2 or line[12:13] != b" " or line[77:78] != b" ":
        raise ValueError("malformed audit line")
    seq = int(line[:12])
    prev = line[13:77].decode("ascii")
    body = json.loads(line[78:])
    if not isinstance(body, dict):
        raise ValueError("malformed audit line")
    return seq, prev, body


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def _files(folder: Path) -> list[Path]:
    try:
        names = sorted(n for n in os.listdir(folder) if FILE_RE.fullmatch(n))
    except FileNotFoundError:
        return []
    return [folder / n for n in names]


def _checkpoint_message(seq: int, prev: str, body: dict[str, Any]) -> bytes:
    unsigned = {k: v for k, v in body.items() if k != "sigs"}
    return LABEL_CHECKPOINT + _line(seq, prev, unsigned)


class AuditLog:
    """The audit log of a home (``folder``), written by ``identity``'s owner.

    Safe for several threads and processes appending to the same folder (an exclusive
    ``flock`` is held while appending).
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        identity: Identity,
        actor_id: str | None = None,
        checkpoint_every: int = 256,
        max_bytes: int = 64 << 20,
        retention_days: int = DEFAULT_RETENTION_DAYS,
    ) -> None:
        if retention_days < 1:
            raise ValueError("retention_days must be at least 1")
        self.folder = Path(folder)
        self.identity = identity
        self.actor = identity.fingerprint
        self.actor_id = actor_id
        self.checkpoint_every = checkpoint_every
        self.max_bytes = max_bytes
        self.retention_days = retention_days
        self._lock = threading.RLock()
        self._batch_depth = 0
        self._dirty: Path | None = None
        self._since_checkpoint = 0
        self._cache: tuple[Path, int, int, str] | None = None  # file, size, last seq, last hash
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lockfile = (self.folder / ".lock").open("a+")
        except OSError as exc:
            raise StorageError(
                f"cannot open the audit log in {str(self.folder)!r}: {exc.strerror}"
            ) from exc
        self._key = self._link_key()

    # -- keyed hashing ------------------------------------------------------------------------
    def _link_key(self) -> bytes:
        path = self.folder / "link.key"
        try:
            key = path.read_bytes()
            if len(key) == 32:
                return key
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot read the audit link key: {exc.strerror}") from exc
        key = os.urandom(32)
        atomic_write(path, key, mode=0o600)
        return key

    def link(self, value: str) -> str:
        """A keyed hash (HMAC-SHA256, per-home key) of an identifier such as an INS, so records
        about the same patient can be linked without the INS appearing in the log."""
        h = crypto_hmac.HMAC(self._key, hashes.SHA256())
        h.update(value.encode("utf-8"))
        return h.finalize().hex()[:32]

    # -- low level ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._lock:
            if fcntl is None:  # pragma: no cover - platform specific
                yield
                return
            fcntl.flock(self._lockfile.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lockfile.fileno(), fcntl.LOCK_UN)

    def _tail(self) -> tuple[Path, int, str]:
        """(current file, last seq, hash of the last line), repairing a torn last line.

        Cheap when nothing changed since our own last append (size check); otherwise reads
        only the end of the current file (records are a few KiB at most)."""
        files = _files(self.folder)
        if not files:
            return self.folder / "audit-000001.jsonl", 0, GENESIS
        path = files[-1]
        try:
            size = path.stat().st_size
            if self._cache is not None and self._cache[0] == path and self._cache[1] == size:
                return path, self._cache[2], self._cache[3]
            with path.open("rb+") as fh:
                start = max(0, size - (256 << 10))
                fh.seek(start)
                chunk = fh.read()
                if chunk and not chunk.endswith(b"\n"):
                    cut = chunk.rfind(b"\n") + 1
                    torn = chunk[cut:]
                    fh.truncate(start + cut)
                    fh.flush()
                    os.fsync(fh.fileno())
                    self._cache = None
                    seq, last = self._last_line(files, path)
                    self._write(
                        path,
                        seq + 1,
                        last,
                        self._body(
                            "repair", {"torn_bytes": len(torn), "torn_sha256": _sha256(torn)}
                        ),
                        sync=True,
                    )
                    return self._tail()
        except OSError as exc:
            raise StorageError(f"cannot read the audit log: {exc.strerror}") from exc
        seq, last = self._last_line(files, path)
        self._cache = (path, size, seq, last)
        return path, seq, last

    def _last_line(self, files: list[Path], path: Path) -> tuple[int, str]:
        idx = files.index(path)
        while idx >= 0:
            p = files[idx]
            size = p.stat().st_size
            with p.open("rb") as fh:
                fh.seek(max(0, size - (256 << 10)))
                chunk = fh.read().rstrip(b"\n")
            if chunk:
                line = chunk.rsplit(b"\n", 1)[-1]
                try:
                    seq, _, _ = _split(line)
                except ValueError as exc:
                    raise StorageError(
                        f"the audit log {p.name} ends with a damaged record: run 'medsecure audit verify'"
                    ) from exc
                return seq, _sha256(line)
            idx -= 1
        return 0, GENESIS

    def _body(self, action: str, fields: dict[str, Any]) -> dict[str, Any]:
        bad = FORBIDDEN_KEYS & set(fields)
        if bad:
            raise ValueError(f"audit records never hold {sorted(bad)}: log a keyed hash instead")
        body = {k: v for k, v in fields.items() if v is not None}
        body.update({"ts": _now_iso(), "action": action, "actor": self.actor})
        if self.actor_id:
            body["actor_id"] = self.actor_id
        return body

    def _write(self, path: Path, seq: int, prev: str, body: dict[str, Any], *, sync: bool) -> str:
        line = _line(seq, prev, body)
        new = not path.exists()
        try:
            with path.open("ab") as fh:
                fh.write(line + b"\n")
                fh.flush()
                if sync:
                    os.fsync(fh.fileno())
                size = fh.tell()
            if new:
                os.chmod(path, 0o600)
                fsync_dir(path.parent)
        except OSError as exc:
            self._cache = None
            raise StorageError(f"cannot append to the audit log: {exc.strerror}") from exc
        digest = _sha256(line)
        self._cache = (path, size, seq, digest)
        return digest

    # -- API ----------------------------------------------------------------------------------
    def append(self, action: str, **fields: Any) -> int:
        """Append one record (fsynced unless inside :meth:`batch`); return its sequence number."""
        with self._exclusive():
            path, seq, last = self._tail()
            if path.exists() and path.stat().st_size >= self.max_bytes:
                m = FILE_RE.fullmatch(path.name)
                assert m is not None
                path = self.folder / f"audit-{int(m.group(1)) + 1:06d}.jsonl"
            sync = self._batch_depth == 0
            digest = self._write(path, seq + 1, last, self._body(action, fields), sync=sync)
            if not sync:
                self._dirty = path
            self._since_checkpoint += 1
            if seq == 0 or self._since_checkpoint >= self.checkpoint_every:
                # a new log is checkpointed at once, so HEAD exists from its first record on
                self._checkpoint(path, seq + 1, digest)
            return seq + 1

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group the records appended inside into one fsync (group commit)."""
        with self._lock:
            self._batch_depth += 1
            try:
                yield
            finally:
                self._batch_depth -= 1
                if self._batch_depth == 0 and self._dirty is not None:
                    path, self._dirty = self._dirty, None
                    try:
                        with path.open("ab") as fh:
                            os.fsync(fh.fileno())
                    except OSError as exc:
                        raise StorageError(f"cannot sync the audit log: {exc.strerror}") from exc

    def checkpoint(self) -> None:
        """Append a signed checkpoint now (also done every ``checkpoint_every`` records)."""
        with self._exclusive():
            path, seq, last = self._tail()
            if seq:
                self._checkpoint(path, seq, last)

    def _checkpoint(self, path: Path, seq: int, last: str) -> None:
        body = self._body("checkpoint", {"signer": str(self.identity.public)})
        sigs = self.identity._sign(_checkpoint_message(seq + 1, last, body))
        body["sigs"] = [base64.b64encode(s).decode() for s in sigs]
        digest = self._write(path, seq + 1, last, body, sync=True)
        head = {"seq": seq + 1, "hash": digest, "file": path.name}
        atomic_write(self.folder / "HEAD", _canonical(head) + b"\n", mode=0o600)
        self._since_checkpoint = 0

    def purge(self, *, now: dt.datetime | None = None) -> list[str]:
        """Remove rotated files whose newest record is older than the retention period,
        recording what was removed; return the removed file names."""
        when = now or dt.datetime.now(dt.UTC)
        cutoff = when - dt.timedelta(days=self.retention_days)
        removed: list[str] = []
        with self._exclusive():
            files = _files(self.folder)
            through: tuple[int, str] | None = None
            for path in files[:-1]:  # never the current file
                line = path.read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]
                seq, _, body = _split(line)
                if dt.datetime.fromisoformat(body["ts"]) >= cutoff:
                    break
                removed.append(path.name)
                through = (seq, _sha256(line))
            if not removed or through is None:
                return []
            cur, seq, last = self._tail()
            self._write(
                cur,
                seq + 1,
                last,
                self._body(
                    "purge",
                    {"files": removed, "through_seq": through[0], "through_hash": through[1]},
                ),
                sync=True,
            )
            for name in removed:
                (self.folder / name).unlink()
            fsync_dir(self.folder)
            self._cache = None
        return removed

    def close(self) -> None:
        """Write a final checkpoint (so the tail is covered) and release the files."""
        with contextlib.suppress(StorageError):
            if self._since_checkpoint:
                self.checkpoint()
        self._lockfile.close()


# --------------------------------------------------------------------------------------------
# verification and export
# --------------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """The result of :func:`verify`."""

    ok: bool
    records: int = 0
    checkpoints: int = 0
    first_broken: int | None = None
    """Sequence number of the first record that does not verify."""
    problem: str | None = None
    file: str | None = None
    torn_tail: bool = False
    warnings: list[str] = field(default_factory=list)


def _iter_lines(folder: Path) -> Iterator[tuple[Path, int, bytes, bool]]:
    """(file, line number, line bytes, whether it is a torn last line of the log)."""
    files = _files(folder)
    for fi, path in enumerate(files):
        data = path.read_bytes()
        lines = data.split(b"\n")
        torn_last = bool(lines and lines[-1] != b"")
        if not torn_last:
            lines.pop()
        for li, line in enumerate(lines):
            yield path, li + 1, line, torn_last and fi == len(files) - 1 and li == len(lines) - 1


def _file_lines(path: Path) -> tuple[list[bytes], bool, list[int]]:
    """The file's lines, whether the last one is torn, and the indexes of the lines that need
    parsing (checkpoints and purges), found with one search over the whole file."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = bool(lines) and lines[-1] != b""
    if not torn:
        lines.pop()
    special = []
    for needle in (b'"action":"checkpoint"', b'"action":"purge"'):
        pos = data.find(needle)
        while pos != -1:
            special.append(data.count(b"\n", 0, pos))
            pos = data.find(needle, pos + 1)
    return lines, torn, sorted(set(special))


def verify(
    folder: str | os.PathLike[str], *, public: PublicIdentity | Sequence[PublicIdentity]
) -> VerifyReport:
    """Check the whole chain, every checkpoint's signature (by one of ``public``) and ``HEAD``.

    Reports the first broken record. A torn last line (a writer killed mid-append) is reported
    and accepted: no record the writer had finished is lost.

    The chain is checked a file at a time with bulk operations (hash every line, compare every
    ``prev`` with the previous hash, every ``seq`` with its position), and only when something
    differs is the file walked line by line to name the first broken record.
    """
    keys = [public] if isinstance(public, PublicIdentity) else list(public)
    allowed = {k.fingerprint for k in keys}
    root = Path(folder)
    report = VerifyReport(ok=True)
    head: tuple[int, str] | None = None
    head_path = root / "HEAD"
    if head_path.exists():
        try:
            doc = json.loads(head_path.read_text())
            head = (int(doc["seq"]), str(doc["hash"]))
        except (ValueError, KeyError, TypeError):
            return _fail(report, "HEAD", None, "HEAD is damaged")
    head_seen = False
    signed: set[int] = set()
    prev_hash: bytes | None = None
    expected = 0
    first_seq: int | None = None
    purged_through: tuple[int, str] | None = None
    files = _files(root)
    sha = hashlib.sha256
    for fi, path in enumerate(files):
        lines, torn, special = _file_lines(path)
        if torn:
            if fi != len(files) - 1:
                return _fail(
                    report,
                    path.name,
                    expected or None,
                    f"{path.name} ends with an incomplete record",
                )
            lines.pop()
            report.torn_tail = True
            report.warnings.append(
                f"{path.name}: torn last record (a writer was interrupted); the next append repairs it"
            )
        if not lines:
            continue
        try:
            seqs = [int(x[:12]) for x in lines]
        except ValueError:
            return _fail(
                report,
                path.name,
                expected or None,
                f"a record of {path.name} has a bad sequence number",
            )
        digests = [sha(x).hexdigest().encode() for x in lines]
        prevs = [x[13:77] for x in lines]
        if expected == 0:
            first_seq = seqs[0]
            if seqs[0] == 1 and prevs[0] != GENESIS_B:
                return _fail(report, path.name, 1, "record 1 does not start the chain")
            if seqs[0] != 1:
                if prevs[0] == GENESIS_B:
                    return _fail(
                        report, path.name, seqs[0], f"record {seqs[0]} claims to start the log"
                    )
                report.warnings.append(
                    f"the log starts at record {seqs[0]} (older files were purged)"
                )
            expected = seqs[0]
            prev_hash = prevs[0]
        chained_ok = prevs[0] == prev_hash and prevs[1:] == digests[:-1]
        seq_ok = seqs == list(range(expected, expected + len(lines)))
        if not (chained_ok and seq_ok):
            for i, (seq, prev) in enumerate(zip(seqs, prevs, strict=True)):
                want = expected + i
                x = lines[i]
                if not (len(x) > PREFIX_LEN and x[12:13] == b" " and x[77:78] == b" "):
                    return _fail(
                        report,
                        path.name,
                        want,
                        f"line {i + 1} of {path.name} is not a valid record",
                    )
                if seq != want:
                    return _fail(
                        report,
                        path.name,
                        min(seq, want),
                        f"record {seq} found where record {want} was expected (deleted or reordered records)",
                    )
                if prev != (prev_hash if i == 0 else digests[i - 1]):
                    return _fail(
                        report,
                        path.name,
                        seq - 1,
                        f"record {seq} does not chain to record {seq - 1} (record {seq - 1} was altered)",
                    )
        for i in special:
            if i >= len(lines):
                continue  # inside the torn tail
            seq, prev_text, line = seqs[i], prevs[i].decode("ascii", "replace"), lines[i]
            try:
                _, _, body = _split(line)
            except ValueError:
                return _fail(report, path.name, seq, f"record {seq} is malformed")
            if body.get("action") == "checkpoint":
                try:
                    signer = PublicIdentity.from_text(body["signer"])
                    sigs = [base64.b64decode(x, validate=True) for x in body["sigs"]]
                except Exception:
                    return _fail(report, path.name, seq, f"checkpoint {seq} is malformed")
                if signer.fingerprint not in allowed or not signer._verify(
                    _checkpoint_message(seq, prev_text, body), sigs
                ):
                    return _fail(
                        report,
                        path.name,
                        seq,
                        f"checkpoint {seq} is not signed by the expected identity",
                    )
                report.checkpoints += 1
                signed.add(seq)
            elif body.get("action") == "purge":
                try:
                    purged_through = (int(body["through_seq"]), str(body["through_hash"]))
                except (ValueError, KeyError, TypeError):
                    return _fail(report, path.name, seq, f"purge record {seq} is malformed")
        if head is not None and seqs[0] <= head[0] <= seqs[-1]:
            if digests[head[0] - seqs[0]] != head[1].encode():
                return _fail(
                    report,
                    "HEAD",
                    head[0],
                    f"record {head[0]} differs from the checkpoint HEAD names (log rewritten)",
                )
            head_seen = True
        prev_hash = digests[-1]
        expected = seqs[-1] + 1
        report.records += len(lines)
    if report.records and purged_through is not None and first_seq != purged_through[0] + 1:
        return _fail(
            report,
            "(first file)",
            first_seq,
            f"the oldest remaining record is {first_seq}, but the purge record says files through {purged_through[0]} were removed",
        )
    if head is not None:
        if not head_seen:
            return _fail(
                report,
                "HEAD",
                expected,
                f"the log was truncated: checkpoint {head[0]} named by HEAD is missing (the log ends at {expected - 1})",
            )
        if head[0] not in signed:
            return _fail(
                report,
                "HEAD",
                head[0],
                f"HEAD names record {head[0]}, which is not a signed checkpoint",
            )
    elif report.records:
        return _fail(
            report, "HEAD", None, "HEAD is missing: nothing proves this identity wrote the log"
        )
    return report


def _fail(report: VerifyReport, where: str, seq: int | None, problem: str) -> VerifyReport:
    report.ok = False
    report.first_broken = seq
    report.problem = problem
    report.file = where
    return report


def export(
    folder: str | os.PathLike[str],
    out: Any,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    fmt: str = "jsonl",
) -> int:
    """Write records (JSON lines or CSV) for a compliance officer; return how many."""
    if fmt not in ("jsonl", "csv"):
        raise ValueError("format must be 'jsonl' or 'csv'")
    columns = [
        "seq",
        "ts",
        "action",
        "actor",
        "actor_id",
        "message_id",
        "envelope_id",
        "counterparty",
        "result",
        "detail",
    ]
    writer = (
        csv.DictWriter(out, fieldnames=columns, extrasaction="ignore") if fmt == "csv" else None
    )
    if writer:
        writer.writeheader()
    count = 0
    for _path, _lineno, line, torn in _iter_lines(Path(folder)):
        if torn:
            break
        try:
            seq, prev, body = _split(line)
        except ValueError:
            continue
        ts = dt.datetime.fromisoformat(body["ts"])
        if (since and ts < since) or (until and ts > until):
            continue
        record = {"seq": seq, "prev": prev, **body}
        if writer:
            row = dict(record)
            row["detail"] = json.dumps(
                {
                    k: v
                    for k, v in record.items()
                    if k not in columns and k not in ("prev", "sigs", "signer")
                },
                sort_keys=True,
            )
            writer.writerow(row)
        else:
            out.write(
                json.dumps(
                    {k: v for k, v in record.items() if k not in ("sigs", "signer")},
                    sort_keys=True,
                    ensure_ascii=False,
                )
                + "\n"
            )
        count += 1
    return count
