"""A tamper-evident audit log: append-only JSON lines, hash-chained, with signed checkpoints.

Theory of operation
-------------------
Each record is one line: ``<seq, 12 digits> <prev, 64 hex> <canonical JSON>``, where ``prev`` is
the SHA-256 of the previous line's bytes (64 zeros for the first record) and the JSON (sorted
keys, no spaces, ASCII) holds the rest. Editing, deleting or reordering any record breaks the
chain at that point; the fixed-width prefix lets :func:`verify` check the chain at hashing
speed without parsing JSON.

The chain alone stops nobody who can write the folder: anyone can compute SHA-256. Three things
tie the log to the identity and to its own past:

* **Checkpoints.** Every ``checkpoint_every`` records (at the first record, after a purge, and
  when the log is closed) a ``checkpoint`` record is signed by the identity (Ed25519 +
  ML-DSA-65 for a hybrid identity) over ``"medsecure/v1/audit-checkpoint"`` ‖ the record without
  its signatures and MAC. It commits to every record before it.
* **Record MACs.** Every record the writer appends ends with a ``"~mac"`` field: HMAC-SHA256
  (first 128 bits) of the line without it, under a key derived (HKDF-SHA256,
  ``"medsecure/v1/audit-record-mac"``) from the identity's Ed25519 private key. ``~`` sorts after
  every field name a record may have (plain ASCII identifiers), so the MAC is always the line's
  last 43 bytes and is checked without parsing JSON. **Before signing a checkpoint the writer
  re-reads every record since the previous checkpoint** and checks numbers, links and MACs: a
  record it did not write is never signed. (A reader with the public key only cannot check
  MACs; :func:`verify` does when it is given the identity.)
* **The anchor.** The newest checkpoint's number and hash are kept in an :class:`Anchor` out of
  reach of whoever can write the audit folder: by default the file ``<folder>.anchor`` beside
  the folder (``MEDSECURE_HOME/audit.anchor``, next to ``identity.key``). ``HEAD`` inside the
  folder repeats it for a reader who was handed the folder alone. A log cut back to an earlier
  checkpoint, with ``HEAD`` rewritten to match, no longer holds the anchored record.

When the writer finds something it cannot vouch for (a record with a bad number, link or MAC;
the anchored checkpoint missing or different), it does not stop: it appends a ``tamper`` record
naming the first record it cannot vouch for, signs a checkpoint right after it (the anchor moves
on) and carries on. :func:`verify` fails on every ``tamper`` record a checkpoint covers, so the
finding stays in the log for good and the log stays usable.

Appending costs one fsync; :meth:`AuditLog.batch` groups several records under one fsync
(group commit). A process killed while appending leaves at most a torn last line: the next
writer cuts it off and appends a ``repair`` record saying how many bytes it removed, and
:func:`verify` accepts a torn *last* line (reporting it) since no acknowledged record is lost.
A checkpoint is durable before ``HEAD`` and the anchor name it, so they never name a record a
crash could take away.

Files rotate at ``max_bytes`` (``audit-000001.jsonl``, ``audit-000002.jsonl``, …) and the chain
runs across them. Files older than the retention period (183 days by default: MSSanté asks for
at least 6 months) are removed by :meth:`AuditLog.purge`, which first appends a ``purge`` record
naming, for every file it removes, its last record's number and hash, then signs a checkpoint,
and only then removes the files, oldest first. A log whose first records are gone verifies only
if a purge record covered by a checkpoint names exactly the record before the first one left;
a purge interrupted between two removals therefore still verifies.

Files in the folder are opened without following links and without waiting on FIFOs: the
folder may be written by someone hostile.

Records never hold health data: no content, subject, file name or patient identity — at most a
keyed hash (HMAC-SHA256 under a per-home secret) of an INS where records must be linked.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import csv
import datetime as dt
import errno

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one writer per home is assumed there
    fcntl = None  # type: ignore[assignment]
import hashlib
import hmac
import json
import os
import re
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._errors import StorageError
from ._fs import atomic_write, fsync_dir
from ._identity import Identity, PublicIdentity
from .envelope._labels import LABEL_AUDIT_CHECKPOINT as LABEL_CHECKPOINT
from .envelope._labels import LABEL_AUDIT_RECORD_MAC as LABEL_RECORD_MAC

__all__ = ["Anchor", "AuditLog", "FileAnchor", "VerifyReport", "export", "verify"]

GENESIS = "0" * 64
GENESIS_B = GENESIS.encode()
FILE_RE = re.compile(r"audit-(\d{6,})\.jsonl")
FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HASH_RE = re.compile(r"[0-9a-f]{64}")
DEFAULT_RETENTION_DAYS = 183
FORBIDDEN_KEYS = {"subject", "body", "filename", "filenames", "title", "ins", "patient", "content"}
MAC_FIELD = "~mac"
MAC_OPEN = b',"~mac":"'
MAC_HEX = 32
MAC_SUFFIX = len(MAC_OPEN) + MAC_HEX + 2  # ,"~mac":"<32 hex>"}
POINT_MAX = 4096  # HEAD and anchor files are a few dozen bytes
# Records the verifier must parse; the others are only hashed.
SPECIAL = (b'"action":"checkpoint"', b'"action":"purge"', b'"action":"tamper"')
# Never follow a link an attacker placed, never block on a FIFO (no effect on regular files).
_SAFE_OPEN = (
    getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
)


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


def _well_formed(line: bytes) -> bool:
    return (
        len(line) > PREFIX_LEN + 1
        and line[12:13] == b" "
        and line[77:78] == b" "
        and line[:12].isdigit()
    )


def _split(line: bytes) -> tuple[int, str, dict[str, Any]]:
    """Parse a line; ValueError if malformed."""
    if not _well_formed(line):
        raise ValueError("malformed audit line")
    seq = int(line[:12])
    prev = line[13:77].decode("ascii")
    body = json.loads(line[78:])
    if not isinstance(body, dict):
        raise ValueError("malformed audit line")
    return seq, prev, body


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def _name(number: int) -> str:
    return f"audit-{number:06d}.jsonl"


def _files(folder: Path) -> list[Path]:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"cannot list the audit log: {exc.strerror}") from exc
    found = sorted((int(m.group(1)), n) for n in names if (m := FILE_RE.fullmatch(n)))
    return [folder / n for _, n in found]


def _open(path: Path, flags: int) -> int:
    """A descriptor on a regular file; OSError for anything else (link, FIFO, device)."""
    fd = os.open(path, flags | _SAFE_OPEN, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read(path: Path, start: int = 0, limit: int = -1) -> bytes:
    with os.fdopen(_open(path, os.O_RDONLY), "rb") as fh:
        if start:
            fh.seek(start)
        return fh.read(limit)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1  # gone or unreadable: not what we last saw


def _last_full_line(path: Path) -> bytes:
    """The last newline-terminated line of a file (the records are a few KiB at most)."""
    size = os.stat(path).st_size
    start = max(0, size - (256 << 10))
    chunk = _read(path, start)
    return chunk[: chunk.rfind(b"\n")].rsplit(b"\n", 1)[-1]


def _first_seq(path: Path) -> int | None:
    head = _read(path, 0, 13)
    return int(head[:12]) if len(head) == 13 and head[:12].isdigit() else None


def _find_line(path: Path, seq: int) -> tuple[int, bytes] | None:
    """(offset, line) of record ``seq`` in ``path``, searched from the end of the file (the
    records looked for are recent ones)."""
    key = b"%012d " % seq
    with os.fdopen(_open(path, os.O_RDONLY), "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        window = 1 << 16
        while True:
            start = max(0, size - window)
            fh.seek(start)
            data = fh.read(size - start)
            at = data.rfind(b"\n" + key)
            if at != -1:
                at += 1
            elif start == 0 and data.startswith(key):
                at = 0
            elif start == 0:
                return None
            else:
                window *= 4
                continue
            end = data.find(b"\n", at)
            return None if end == -1 else (start + at, data[at:end])


def _parse_point(data: bytes) -> tuple[int, str] | None:
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    seq, digest = doc.get("seq"), doc.get("hash")
    if type(seq) is not int or seq < 1 or not isinstance(digest, str):
        return None
    return (seq, digest) if HASH_RE.fullmatch(digest) else None


def _read_point(path: Path, what: str) -> tuple[int, str] | None:
    """(seq, hash) from a HEAD or anchor file; None if there is none; StorageError if damaged."""
    try:
        data = _read(path, 0, POINT_MAX + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read the audit {what}: {exc.strerror}") from exc
    point = _parse_point(data) if len(data) <= POINT_MAX else None
    if point is None:
        raise StorageError(f"the audit {what} is damaged")
    return point


def _checkpoint_message(seq: int, prev: str, body: dict[str, Any]) -> bytes:
    unsigned = {k: v for k, v in body.items() if k not in ("sigs", MAC_FIELD)}
    return LABEL_CHECKPOINT + _line(seq, prev, unsigned)


def _mac_key(identity: Identity) -> bytes:
    # Derived from the Ed25519 private key: the one secret the folder's writer cannot read.
    seed: bytes = identity._seeds()[4]
    kdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=LABEL_RECORD_MAC)
    return kdf.derive(seed)


def _tag(key: bytes, data: bytes) -> bytes:
    h = crypto_hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()[: MAC_HEX // 2].hex().encode("ascii")


def _with_mac(key: bytes, line: bytes) -> bytes:
    """The line with ``"~mac"`` as its last field (the same bytes as ``_line`` would give with
    the field in the body, since ``~`` sorts last)."""
    return line[:-1] + MAC_OPEN + _tag(key, line) + b'"}'


def _mac_ok(key: bytes, line: bytes) -> bool:
    if (
        len(line) < PREFIX_LEN + MAC_SUFFIX + 2
        or line[-MAC_SUFFIX : -MAC_SUFFIX + len(MAC_OPEN)] != MAC_OPEN
        or line[-2:] != b'"}'
    ):
        return False
    return hmac.compare_digest(_tag(key, line[:-MAC_SUFFIX] + b"}"), line[-MAC_HEX - 2 : -2])


# --------------------------------------------------------------------------------------------
# the anchor
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Anchor(Protocol):
    """Where the writer keeps the newest checkpoint's sequence number and hash, somewhere the
    attacker in view (someone who can write the audit folder) cannot rewrite.

    ``load`` returns ``(seq, hash)``, or None when nothing was saved yet, and raises
    :class:`~medsecure.StorageError` when what was saved cannot be read. ``save`` replaces it
    durably (it is called after the checkpoint is on disk)."""

    def load(self) -> tuple[int, str] | None:
        """The saved ``(seq, hash)``, or None."""

    def save(self, seq: int, digest: str) -> None:
        """Replace the saved point, durably."""


class FileAnchor:
    """An :class:`Anchor` kept in one small file, replaced atomically and readable only by its
    owner (0600). The default one is ``<audit folder>.anchor``, beside the folder."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> tuple[int, str] | None:
        """The saved ``(seq, hash)``, or None if the file does not exist."""
        return _read_point(self.path, "anchor")

    def save(self, seq: int, digest: str) -> None:
        """Write ``(seq, hash)`` atomically and durably."""
        try:
            atomic_write(self.path, _canonical({"hash": digest, "seq": seq}) + b"\n", mode=0o600)
        except OSError as exc:
            raise StorageError(f"cannot write the audit anchor: {exc.strerror}") from exc

    def __repr__(self) -> str:
        return f"FileAnchor({str(self.path)!r})"


def _anchor_for(folder: Path, anchor: Anchor | bool) -> Anchor | None:
    if anchor is True:
        where = Path(os.path.abspath(folder))
        return FileAnchor(where.parent / f"{where.name}.anchor")
    if anchor is False:
        return None
    if not isinstance(anchor, Anchor):
        raise TypeError("anchor must be True (beside the folder), False or an Anchor")
    return anchor


# --------------------------------------------------------------------------------------------
# the writer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Pos:
    """Where the log ends: the file the next record goes to, its size, the last record."""

    path: Path
    size: int
    seq: int
    digest: str


@dataclass(frozen=True, slots=True)
class _Finding:
    first_bad: int
    found: str  # "unauthenticated" (number, link or MAC) | "missing" (the reference is gone)


class AuditLog:
    """The audit log of a home (``folder``), written by ``identity``'s owner.

    ``anchor`` keeps the newest checkpoint's hash where whoever can write ``folder`` cannot:
    True (the default) for the file ``<folder>.anchor`` beside the folder, an :class:`Anchor`
    of your own (a database row, a remote service), or False for none (only ``HEAD``, inside the
    folder: a log cut back to an earlier checkpoint then goes unnoticed).

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
        anchor: Anchor | bool = True,
    ) -> None:
        if not isinstance(identity, Identity):
            raise TypeError("identity must be an Identity")
        if retention_days < 1:
            raise ValueError("retention_days must be at least 1")
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        self.folder = Path(folder)
        self.identity = identity
        self.actor = identity.fingerprint
        self.actor_id = actor_id
        self.checkpoint_every = checkpoint_every
        self.max_bytes = max_bytes
        self.retention_days = retention_days
        self.anchor = _anchor_for(self.folder, anchor)
        self._mac_key = _mac_key(identity)
        self._lock = threading.RLock()
        self._batch_depth = 0
        self._dirty: set[Path] = set()  # files appended to without fsync, inside batch()
        self._since_checkpoint = 0
        # Where the log ended when we last read or wrote it; everything up to it was checked
        # (or written) by this object, so it is where the next incremental check starts.
        self._pos: _Pos | None = None
        self._where: dict[int, tuple[Path, int]] = {}  # our last record and checkpoint: offsets
        self._where_cp = -1
        self._lockfd: int | None = None
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lockfd = _open(self.folder / ".lock", os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise StorageError(
                f"cannot open the audit log in {str(self.folder)!r}: {exc.strerror}"
            ) from exc
        self._key = self._link_key()

    # -- keyed hashing ------------------------------------------------------------------------
    def _link_key(self) -> bytes:
        path = self.folder / "link.key"
        try:
            key = _read(path, 0, 33)
            if len(key) == 32:
                return key
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot read the audit link key: {exc.strerror}") from exc
        key = os.urandom(32)
        try:
            atomic_write(path, key, mode=0o600)
        except OSError as exc:
            raise StorageError(f"cannot write the audit link key: {exc.strerror}") from exc
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
            if self._lockfd is None:
                raise StorageError("the audit log is closed")
            if fcntl is None:  # pragma: no cover - platform specific
                yield
                return
            fcntl.flock(self._lockfd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lockfd, fcntl.LOCK_UN)

    def _reference(self) -> tuple[int, str] | None:
        """The newest checkpoint as recorded out of the folder (the anchor), else as ``HEAD``
        says (a log from before anchors, or ``anchor=False``)."""
        if self.anchor is not None:
            point = self.anchor.load()
            if point is not None:
                return point
        try:
            return _read_point(self.folder / "HEAD", "HEAD")
        except StorageError:
            return None  # a damaged HEAD: the check starts from the first record instead

    def _tail(self) -> _Pos:
        """Where the log ends. Cheap when nothing changed since our own last append (size
        check); otherwise cuts a torn last line, then checks the records appended since we last
        looked (by another process, or by someone else) before anything is chained to them."""
        try:
            files = _files(self.folder)
            pos = self._pos
            if pos is not None:
                if not files and pos.seq == 0:
                    return pos
                if files and files[-1] == pos.path and _size(pos.path) == pos.size:
                    return pos
            torn = self._cut_torn(files)
            ref = (pos.seq, pos.digest) if pos is not None and pos.seq else self._reference()
            self._pos, finding = self._scan(ref)
        except OSError as exc:
            self._pos = None
            raise StorageError(f"cannot read the audit log: {exc.strerror}") from exc
        if torn is not None:
            self._emit(
                self._body("repair", {"torn_bytes": len(torn), "torn_sha256": _sha256(torn)}),
                sync=True,
            )
        if finding is not None:
            self._alarm(finding)
        return self._pos

    def _cut_torn(self, files: list[Path]) -> bytes | None:
        """Cut an incomplete last line (a writer killed mid-append); return the cut bytes."""
        if not files:
            return None
        fd = _open(files[-1], os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            start = max(0, size - (256 << 10))
            os.lseek(fd, start, os.SEEK_SET)
            chunk = b""
            while len(chunk) < size - start:
                more = os.read(fd, size - start - len(chunk))
                if not more:
                    break
                chunk += more
            if not chunk or chunk.endswith(b"\n"):
                return None
            cut = chunk.rfind(b"\n") + 1
            os.ftruncate(fd, start + cut)
            os.fsync(fd)
            return chunk[cut:]
        finally:
            os.close(fd)

    def _locate(self, files: list[Path], ref: tuple[int, str]) -> tuple[int, int] | None:
        """(file index, offset just after it) of record ``ref`` if it is in the log with that
        hash; None otherwise."""
        seq, digest = ref
        hint = self._where.get(seq)
        if hint is not None and hint[0] in files:
            path, offset = hint
            chunk = _read(path, offset, 1 << 16)
            end = chunk.find(b"\n")
            if end != -1 and chunk.startswith(b"%012d " % seq) and _sha256(chunk[:end]) == digest:
                return files.index(path), offset + end + 1
        for fi in range(len(files) - 1, -1, -1):
            first = _first_seq(files[fi])
            if first is None or first > seq:
                continue
            found = _find_line(files[fi], seq)
            if found is None or _sha256(found[1]) != digest:
                return None
            return fi, found[0] + len(found[1]) + 1
        return None

    def _signed_by_me(self, line: bytes) -> bool:
        try:
            seq, prev, body = _split(line)
            sigs = [base64.b64decode(x, validate=True) for x in body["sigs"]]
        except (ValueError, KeyError, TypeError):
            return False
        message = _checkpoint_message(seq, prev, body)
        return body.get("action") == "checkpoint" and self.identity.public._verify(message, sigs)

    def _last_signed(self, files: list[Path]) -> tuple[int, int, int, str] | None:
        """(file index, offset after it, seq, hash) of the newest checkpoint in the log that
        this identity signed: where a check restarts when the reference is gone."""
        needle = SPECIAL[0]
        for fi in range(len(files) - 1, -1, -1):
            data = _read(files[fi])
            at = data.rfind(needle)
            while at != -1:
                start = data.rfind(b"\n", 0, at) + 1
                end = data.find(b"\n", at)
                if end != -1 and self._signed_by_me(data[start:end]):
                    line = data[start:end]
                    return fi, end + 1, int(line[:12]), _sha256(line)
                at = data.rfind(needle, 0, start)
        return None

    def _scan(self, ref: tuple[int, str] | None) -> tuple[_Pos, _Finding | None]:
        """Check every record after ``ref`` (numbers, links, MACs) and find where the log ends.

        ``ref`` is a record this writer vouches for (the newest checkpoint, or the last record
        it saw); None starts from the first record of the log. If ``ref`` is not in the log
        with its hash (the log was cut back or rewritten), the check restarts from the newest
        checkpoint this identity signed, and the finding names the first record after it that
        does not check, or the first missing one."""
        files = _files(self.folder)
        found = "unauthenticated"
        start: tuple[int, int, int, str] | None = None
        if ref is not None:
            at = self._locate(files, ref)
            if at is not None:
                start = (at[0], at[1], ref[0], ref[1])
            else:
                found = "missing"
                start = self._last_signed(files)
        first_bad: int | None = None
        expected, prev = (start[2] + 1, start[3].encode()) if start else (0, GENESIS_B)
        key = self._mac_key
        fi0, offset = (start[0], start[1]) if start else (0, 0)
        for fi in range(fi0, len(files)):
            data = _read(files[fi], offset if fi == fi0 else 0)
            lines = data.split(b"\n")
            complete = len(lines) - 1  # the part after the last newline is no record
            if lines[-1] == b"":
                lines.pop()
            for i, line in enumerate(lines):
                if expected == 0:  # the log's first record: its number and link are verify's
                    expected = int(line[:12]) if _well_formed(line) else 1
                    prev = line[13:77]
                if first_bad is None and not (
                    i < complete
                    and _well_formed(line)
                    and int(line[:12]) == expected
                    and line[13:77] == prev
                    and _mac_ok(key, line)
                ):
                    first_bad = expected
                prev = hashlib.sha256(line).hexdigest().encode()
                expected += 1
        seq = max(expected - 1, 0)
        if found == "missing" and first_bad is None:
            first_bad = seq + 1
        if files:
            pos = _Pos(files[-1], os.stat(files[-1]).st_size, seq, prev.decode())
        else:
            pos = _Pos(self.folder / _name(1), 0, 0, GENESIS)
        return pos, None if first_bad is None else _Finding(first_bad, found)

    def _body(self, action: str, fields: dict[str, Any]) -> dict[str, Any]:
        bad = FORBIDDEN_KEYS & set(fields)
        if bad:
            raise ValueError(f"audit records never hold {sorted(bad)}: log a keyed hash instead")
        if not all(FIELD_RE.fullmatch(k) for k in fields):
            raise ValueError("audit record field names are plain ASCII identifiers")
        body = {k: v for k, v in fields.items() if v is not None}
        body.update({"ts": _now_iso(), "action": action, "actor": self.actor})
        if self.actor_id:
            body["actor_id"] = self.actor_id
        return body

    def _sync_dirty(self) -> None:
        try:
            for path in sorted(self._dirty):
                fd = _open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise StorageError(f"cannot sync the audit log: {exc.strerror}") from exc
        self._dirty.clear()

    def _emit(self, body: dict[str, Any], *, sync: bool) -> tuple[int, str]:
        """Append one record after ``self._pos`` (which the caller has just checked)."""
        pos = self._pos
        assert pos is not None
        path = pos.path
        if pos.size >= self.max_bytes:
            m = FILE_RE.fullmatch(path.name)
            assert m is not None
            path = self.folder / _name(int(m.group(1)) + 1)
            # A file's records are durable before the next file has any (whoever wrote them:
            # another process's batch may have left them unsynced).
            self._dirty.add(pos.path)
            self._sync_dirty()
        seq = pos.seq + 1
        line = _with_mac(self._mac_key, _line(seq, pos.digest, body))
        try:
            new = not os.path.lexists(path)
            fd = _open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                offset = os.fstat(fd).st_size
                _write_all(fd, line + b"\n")
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if new:
                fsync_dir(self.folder)
        except OSError as exc:
            self._pos = None
            raise StorageError(f"cannot append to the audit log: {exc.strerror}") from exc
        if not sync:
            self._dirty.add(path)
        digest = _sha256(line)
        self._pos = _Pos(path, offset + len(line) + 1, seq, digest)
        self._where = {k: v for k, v in self._where.items() if k == self._where_cp}
        self._where[seq] = (path, offset)
        return seq, digest

    def _checkpoint(self) -> None:
        """Check everything since the previous checkpoint, then sign (the caller holds the
        lock and has called _tail)."""
        try:
            self._pos, finding = self._scan(self._reference())
        except OSError as exc:
            self._pos = None
            raise StorageError(f"cannot read the audit log: {exc.strerror}") from exc
        if finding is not None:
            self._alarm(finding)
        else:
            self._sign()

    def _alarm(self, finding: _Finding) -> None:
        """Say in the log what cannot be vouched for, and sign that right away."""
        self._emit(
            self._body("tamper", {"first_bad": finding.first_bad, "found": finding.found}),
            sync=True,
        )
        self._sign()

    def _sign(self) -> None:
        pos = self._pos
        assert pos is not None
        body = self._body("checkpoint", {"signer": str(self.identity.public)})
        sigs = self.identity._sign(_checkpoint_message(pos.seq + 1, pos.digest, body))
        body["sigs"] = [base64.b64encode(s).decode() for s in sigs]
        seq, digest = self._emit(body, sync=True)
        self._where_cp = seq
        # Only now that the checkpoint is on disk may HEAD and the anchor name it.
        head = {"seq": seq, "hash": digest, "file": self._where[seq][0].name}
        try:
            atomic_write(self.folder / "HEAD", _canonical(head) + b"\n", mode=0o600)
        except OSError as exc:
            raise StorageError(f"cannot write the audit HEAD: {exc.strerror}") from exc
        if self.anchor is not None:
            self.anchor.save(seq, digest)
        self._since_checkpoint = 0

    # -- API ----------------------------------------------------------------------------------
    def append(self, action: str, **fields: Any) -> int:
        """Append one record (fsynced unless inside :meth:`batch`); return its sequence number."""
        with self._exclusive():
            body = self._body(action, fields)
            self._tail()
            seq, _ = self._emit(body, sync=self._batch_depth == 0)
            self._since_checkpoint += 1
            if seq == 1 or self._since_checkpoint >= self.checkpoint_every:
                # a new log is checkpointed at once, so HEAD exists from its first record on
                self._checkpoint()
            return seq

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group the records appended inside into one fsync (group commit)."""
        with self._lock:
            self._batch_depth += 1
            try:
                yield
            finally:
                self._batch_depth -= 1
                if self._batch_depth == 0 and self._dirty:
                    self._sync_dirty()

    def checkpoint(self) -> None:
        """Append a signed checkpoint now (also done every ``checkpoint_every`` records), after
        checking every record since the previous one."""
        with self._exclusive():
            if self._tail().seq:
                self._checkpoint()

    def purge(self, *, now: dt.datetime | None = None) -> list[str]:
        """Remove rotated files whose newest record is older than the retention period;
        return the removed file names.

        Order, so that a crash at any point leaves a log that verifies: a ``purge`` record
        naming each file's last record, a checkpoint covering it (HEAD and the anchor then name
        a record of the current file), then the removals, oldest file first."""
        when = now or dt.datetime.now(dt.UTC)
        if when.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        cutoff = when - dt.timedelta(days=self.retention_days)
        with self._exclusive():
            self._tail()
            cuts: list[tuple[Path, int, str]] = []
            try:
                for path in _files(self.folder)[:-1]:  # never the current file
                    line = _last_full_line(path)
                    try:
                        seq, _, body = _split(line)
                        expired = dt.datetime.fromisoformat(body["ts"]) < cutoff
                    except (ValueError, KeyError, TypeError):
                        break  # a damaged file is evidence: kept, and the files after it too
                    if not expired:
                        break
                    cuts.append((path, seq, _sha256(line)))
            except OSError as exc:
                raise StorageError(f"cannot read the audit log: {exc.strerror}") from exc
            if not cuts:
                return []
            names = [path.name for path, _, _ in cuts]
            fields = {
                "files": names,
                "cuts": [[seq, digest] for _, seq, digest in cuts],
                "through_seq": cuts[-1][1],
                "through_hash": cuts[-1][2],
            }
            self._emit(self._body("purge", fields), sync=True)
            self._checkpoint()
            try:
                for path, _, _ in cuts:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                fsync_dir(self.folder)
            except OSError as exc:
                raise StorageError(f"cannot remove old audit files: {exc.strerror}") from exc
        return names

    def close(self) -> None:
        """Write a final checkpoint if records are not covered by one yet (after checking
        them), and release the files."""
        if self._lockfd is None:
            return
        with contextlib.suppress(StorageError), self._exclusive():
            seq = self._tail().seq
            ref = self._reference()
            if seq and (ref is None or seq > ref[0]):
                self._checkpoint()
        os.close(self._lockfd)
        self._lockfd = None


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
    """Sequence number of the first record that does not verify: every record before it does.
    A missing record is named by its own number; a record out of place (a copy, a renumbered or
    moved record) by the number of the record whose place it takes."""
    problem: str | None = None
    file: str | None = None
    torn_tail: bool = False
    warnings: list[str] = field(default_factory=list)


def _iter_lines(folder: Path) -> Iterator[tuple[Path, int, bytes, bool]]:
    """(file, line number, line bytes, whether it is a torn last line of the log)."""
    files = _files(folder)
    for fi, path in enumerate(files):
        try:
            data = _read(path)
        except OSError as exc:
            raise StorageError(f"cannot read the audit log: {exc.strerror}") from exc
        lines = data.split(b"\n")
        torn_last = bool(lines and lines[-1] != b"")
        if not torn_last:
            lines.pop()
        for li, line in enumerate(lines):
            yield path, li + 1, line, torn_last and fi == len(files) - 1 and li == len(lines) - 1


def _file_lines(path: Path) -> tuple[list[bytes], bool, list[int]]:
    """The file's lines, whether the last one is torn, and the indexes of the lines that need
    parsing (checkpoints, purges, tamper findings), found by searching the whole file."""
    data = _read(path)
    lines = data.split(b"\n")
    torn = lines[-1] != b""
    if not torn:
        lines.pop()
    positions = []
    for needle in SPECIAL:
        pos = data.find(needle)
        while pos != -1:
            positions.append(pos)
            pos = data.find(needle, pos + 1)
    positions.sort()
    special = []
    counted = upto = 0
    for pos in positions:  # count newlines once over the file, not once per match
        counted += data.count(b"\n", upto, pos)
        upto = pos
        special.append(counted)
    return lines, torn, sorted(set(special))


def _first_break(
    name: str, lines: list[bytes], digests: list[bytes], expected: int, prev: bytes | None
) -> tuple[int, str]:
    """Walk a file whose bulk check failed: the first record that does not verify."""
    for i, x in enumerate(lines):
        want = expected + i
        if not _well_formed(x):
            return want, f"line {i + 1} of {name} is not a valid record"
        seq = int(x[:12])
        if seq != want:
            return want, (
                f"record {seq} found where record {want} was expected "
                "(deleted or reordered records, a copy or a renumbered record)"
            )
        if x[13:77] != (prev if i == 0 else digests[i - 1]):
            # Either the previous record was altered, or this record's own link was. If the
            # next record still links to this one, this one is as written: the previous was.
            if i + 1 < len(lines) and lines[i + 1][13:77] != digests[i]:
                return want, (
                    f"record {want} was altered (it links neither to record {want - 1} "
                    "nor to the record after it)"
                )
            return want - 1, (
                f"record {want} does not chain to record {want - 1} (record {want - 1} was altered)"
            )
    return expected + len(lines), f"{name} does not chain to the file before it"


def _first_forged(chunks: list[tuple[int, list[bytes]]], key: bytes) -> int | None:
    """The first record, in runs of consecutive records, whose MAC does not check."""
    for start, run in chunks:
        for i, line in enumerate(run):
            if not _mac_ok(key, line):
                return start + i
    return None


def _purge_cuts(body: dict[str, Any]) -> list[tuple[int, str]] | None:
    """The (seq, hash) of the last record of every file a purge record says it removed."""
    try:
        cuts = [(int(s), str(h)) for s, h in body.get("cuts", [])]
        cuts.append((int(body["through_seq"]), str(body["through_hash"])))
    except (ValueError, KeyError, TypeError):
        return None
    return cuts


def verify(
    folder: str | os.PathLike[str],
    *,
    public: PublicIdentity | Sequence[PublicIdentity],
    anchor: Anchor | bool = True,
    identity: Identity | None = None,
) -> VerifyReport:
    """Check the whole chain, every checkpoint's signature (by one of ``public``), ``HEAD``
    and the anchor, the start of the log against the purge records, and the writer's own
    ``tamper`` findings.

    ``anchor`` is where the writer kept the newest checkpoint's hash (True: the file beside the
    folder, as :class:`AuditLog` does by default; False: none, which leaves a log cut back to an
    earlier checkpoint undetected, and says so in a warning). ``identity``, the writer's private
    identity if you hold it, also authenticates the records written after the newest checkpoint,
    which the public key alone cannot.

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
    try:
        head = _read_point(root / "HEAD", "HEAD")
    except StorageError:
        return _fail(report, "HEAD", None, "HEAD is damaged")
    store = _anchor_for(root, anchor)
    point: tuple[int, str] | None = None
    if store is not None:
        try:
            point = store.load()
        except StorageError:
            return _fail(report, "anchor", None, "the anchor is damaged or unreadable")
    mac_key = _mac_key(identity) if identity is not None else None
    seen = {"HEAD": False, "anchor": False}
    signed: list[int] = []  # checkpoints whose signature verified, in order
    signers: dict[str, PublicIdentity] = {}
    purges: list[tuple[int, list[tuple[int, str]]]] = []
    tampers: list[tuple[int, int, str, str]] = []  # (record, first bad, what, file)
    unsigned: list[tuple[int, list[bytes]]] = []  # (first seq, lines) after the last checkpoint
    prev_hash: bytes | None = None
    expected = 0
    first: tuple[int, bytes] | None = None
    files = _files(root)
    sha = hashlib.sha256
    for fi, path in enumerate(files):
        try:
            lines, torn, special = _file_lines(path)
        except OSError as exc:
            return _fail(
                report, path.name, expected or 1, f"{path.name} cannot be read ({exc.strerror})"
            )
        if torn:
            if fi != len(files) - 1:
                return _fail(
                    report,
                    path.name,
                    expected + len(lines) - 1 if expected else None,
                    f"{path.name} ends with an incomplete record",
                )
            lines.pop()
            report.torn_tail = True
            report.warnings.append(
                f"{path.name}: torn last record (a writer was interrupted); the next append repairs it"
            )
        if not lines:
            continue
        digests = [sha(x).hexdigest().encode() for x in lines]
        prevs = [x[13:77] for x in lines]
        if expected == 0:
            if not _well_formed(lines[0]):
                return _fail(report, path.name, 1, f"line 1 of {path.name} is not a valid record")
            first = (int(lines[0][:12]), prevs[0])
            if first[0] == 1 and prevs[0] != GENESIS_B:
                return _fail(report, path.name, 1, "record 1 does not start the chain")
            expected = first[0]
            prev_hash = prevs[0]
        try:
            seqs = [int(x[:12]) for x in lines]
        except ValueError:
            seqs = []
        chained_ok = prevs[0] == prev_hash and prevs[1:] == digests[:-1]
        if not (chained_ok and seqs == list(range(expected, expected + len(lines)))):
            seq, problem = _first_break(path.name, lines, digests, expected, prev_hash)
            return _fail(report, path.name, seq, problem)
        last_cp = -1
        for i in special:
            if i >= len(lines):
                continue  # inside the torn tail
            seq, prev_text, line = seqs[i], prevs[i].decode("ascii", "replace"), lines[i]
            try:
                _, _, body = _split(line)
            except ValueError:
                return _fail(report, path.name, seq, f"record {seq} is malformed")
            action = body.get("action")
            if action == "checkpoint":
                try:
                    text = body["signer"]
                    signer = signers.get(text) if isinstance(text, str) else None
                    if signer is None:
                        # parsed once per log: decoding a hybrid key costs more than its check
                        signer = signers[text] = PublicIdentity.from_text(text)
                    sigs = [base64.b64decode(x, validate=True) for x in body["sigs"]]
                except Exception:
                    return _fail(report, path.name, seq, f"checkpoint {seq} is malformed")
                if signer.fingerprint not in allowed or not signer._verify(
                    _checkpoint_message(seq, prev_text, body), sigs
                ):
                    # With the public key alone, records rewritten consistently before this
                    # checkpoint cannot be told from genuine ones; the writer's key can.
                    since = [(seqs[last_cp + 1], lines[last_cp + 1 : i + 1])]
                    forged = None
                    if mac_key is not None:
                        forged = _first_forged((unsigned if last_cp < 0 else []) + since, mac_key)
                    return _fail(
                        report,
                        path.name,
                        seq if forged is None else forged,
                        f"checkpoint {seq} is not signed by the expected identity"
                        + ("" if forged is None else f"; record {forged} was forged or altered"),
                    )
                report.checkpoints += 1
                signed.append(seq)
                last_cp = i
            elif action == "purge":
                cuts = _purge_cuts(body)
                if cuts is None:
                    return _fail(report, path.name, seq, f"purge record {seq} is malformed")
                purges.append((seq, cuts))
            elif action == "tamper":
                bad = body.get("first_bad")
                if type(bad) is not int or bad < 1:
                    return _fail(report, path.name, seq, f"tamper record {seq} is malformed")
                tampers.append((seq, bad, str(body.get("found")), path.name))
        if mac_key is not None:
            if last_cp >= 0:
                unsigned.clear()
            unsigned.append(
                (seqs[last_cp + 1] if last_cp + 1 < len(seqs) else 0, lines[last_cp + 1 :])
            )
        for what, pt in (("HEAD", head), ("anchor", point)):
            if pt is not None and seqs[0] <= pt[0] <= seqs[-1]:
                if digests[pt[0] - seqs[0]] != pt[1].encode():
                    at = bisect.bisect_left(signed, pt[0])
                    vouched = signed[at - 1] if at else (first[0] - 1 if first else 0)
                    return _fail(
                        report,
                        what,
                        vouched + 1,
                        f"record {pt[0]} differs from the checkpoint the {what} names: the log "
                        f"was rewritten after record {vouched}",
                    )
                seen[what] = True
        prev_hash = digests[-1]
        expected = seqs[-1] + 1
        report.records += len(lines)
    last_signed = signed[-1] if signed else 0
    if first is not None and first[0] != 1:
        start, link = first
        accounted = {c for at, cs in purges if at < last_signed for c in cs}
        if (start - 1, link.decode("ascii", "replace")) not in accounted:
            below = [s for s, _ in accounted if s < start]
            gone = max(below, default=0)
            if gone == start - 1:
                return _fail(
                    report,
                    files[0].name,
                    start,
                    f"record {start} does not follow the last record the purge removed",
                )
            return _fail(
                report,
                files[0].name,
                gone + 1,
                f"records {gone + 1} to {start - 1} are missing and no purge record covered by "
                "a checkpoint accounts for them",
            )
        report.warnings.append(f"the log starts at record {start} (older files were purged)")
    for what, pt in (("anchor", point), ("HEAD", head)):
        if pt is None:
            continue
        if not seen[what]:
            return _fail(
                report,
                what,
                expected,
                f"the log was truncated: checkpoint {pt[0]} named by the {what} is missing "
                f"(the log ends at {expected - 1})",
            )
        if pt[0] not in signed:
            return _fail(
                report,
                what,
                pt[0],
                f"the {what} names record {pt[0]}, which is not a signed checkpoint",
            )
    # A tamper record inside a range another (later) finding does not vouch for may itself be
    # forged, placed there to point the report elsewhere: only the others are believed.
    believed: list[tuple[int, int, str, str]] = []
    floor = expected
    for t in sorted((t for t in tampers if t[0] < last_signed), reverse=True):
        if t[0] < floor:
            believed.append(t)
            floor = min(floor, t[1])
    if believed:
        at, bad, found, name = min(believed, key=lambda t: t[1])
        if found == "missing":
            problem = (
                f"the writer found the log cut back or rewritten from record {bad} "
                f"(tamper record {at})"
            )
        else:
            problem = (
                f"record {bad} was forged or altered: the writer found it before signing "
                f"(tamper record {at})"
            )
        return _fail(report, name, bad, problem)
    if tampers and tampers[-1][0] > last_signed:
        report.warnings.append(f"tamper record {tampers[-1][0]} is not covered by a checkpoint yet")
    if head is None and report.records:
        return _fail(
            report, "HEAD", None, "HEAD is missing: nothing proves this identity wrote the log"
        )
    if report.records and point is None:
        report.warnings.append(
            "no anchor was checked: a log cut back to an earlier checkpoint, with HEAD "
            "rewritten, would not be detected"
        )
    tail = expected - 1 - last_signed
    if report.records and tail > 0:
        report.warnings.append(
            f"{tail} record(s) from record {last_signed + 1} are not covered by a checkpoint "
            "yet" + ("" if mac_key else " (the writer's identity can authenticate them)")
        )
        forged = _first_forged(unsigned, mac_key) if mac_key is not None else None
        if forged is not None:
            return _fail(
                report,
                files[-1].name,
                forged,
                f"record {forged} (after the newest checkpoint) was not written by this identity",
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
                    if k not in columns and k not in ("prev", "sigs", "signer", MAC_FIELD)
                },
                sort_keys=True,
            )
            writer.writerow(row)
        else:
            out.write(
                json.dumps(
                    {k: v for k, v in record.items() if k not in ("sigs", "signer", MAC_FIELD)},
                    sort_keys=True,
                    ensure_ascii=False,
                )
                + "\n"
            )
        count += 1
    return count
