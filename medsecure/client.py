"""The client: the one place where identity, directory, trust, transports and storage meet.

    client = medsecure.Client(identity=me, directory=annuaire, transport=FileTransport(box),
                              home="~/.medsecure", trust=policy, me="rpps:10000005479")
    result = client.send(Document.from_path("cr.pdf"), to="rpps:10000000019", subject="CR")
    for message in client.receive():
        ...
        message.ack()

Sending: recipients are resolved through the directory (batched), every key is checked by the
trust policy, the documents are sealed once for all recipients' keys into the durable outbox,
and only then is delivery attempted. Transient failures are retried with exponential backoff and
jitter by :meth:`Client.flush`; permanent ones fall through to the recipient's next endpoint and
end as ``failed`` with the reason.

Transport selection, per recipient: the practitioner's endpoints sorted by their ``priority``
(lower first), ties broken by kind — ``relay``, then ``mail``, then ``drop`` — keeping only
those a configured transport accepts. A ``DeliveryRejected`` moves to the next endpoint; a
``TransportUnavailable`` retries the same one later.

Receiving: envelopes are stored durably before the transport copy is acknowledged, opened,
and their sender verified through the directory and the trust policy. Anything that fails goes
to the quarantine with its reason (:meth:`Client.quarantine`); nothing is dropped silently.
Messages stay in ``receive()``'s answer until ``message.ack()`` (at-least-once; deduplicated by
message id).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import random
import shutil
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

from ._document import Document
from ._envelope import envelope_id, seal_stream, unseal_stream
from ._errors import (
    DeliveryRejected,
    DirectoryUnavailable,
    EnvelopeError,
    MedsecureError,
    PractitionerNotFound,
    StorageError,
    TransportError,
    TransportUnavailable,
    TrustError,
)
from ._fs import atomic_output, fsync_dir
from ._identity import Identity, PublicIdentity
from ._message import Manifest, MessageReader, new_message_id, read_manifest
from ._store import Store
from .audit import AuditLog
from .directory import Directory
from .directory._base import normalize_ref
from .identifiers import parse
from .models import Code, Endpoint, Patient, Practitioner
from .transports import Transport
from .trust import TrustDecision, TrustPolicy

__all__ = [
    "Client",
    "OutboxEntry",
    "QuarantinedEnvelope",
    "ReceivedDocument",
    "ReceivedMessage",
    "RecipientStatus",
    "SendResult",
    "StatusEvent",
    "default_home",
]

REJECTION_CODES = (
    "unknown-patient",
    "unreadable-document",
    "verification-failed",
    "not-for-me",
    "other",
)
RECEIPT_ORDER = {"sent": 1, "delivered": 2, "read": 3}

log = logging.getLogger("medsecure.client")

KIND_ORDER = {"relay": 0, "mail": 1, "drop": 2}
# Delivery statuses of a recipient in the outbox.
QUEUED, SENT, FAILED = "queued", "sent", "failed"


def default_home() -> Path:
    """``$MEDSECURE_HOME``, else the per-user data folder of the platform."""
    env = os.environ.get("MEDSECURE_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":  # pragma: no cover - platform specific
        return Path(os.environ.get("APPDATA", Path.home())) / "medsecure"
    if sys.platform == "darwin":  # pragma: no cover - platform specific
        return Path.home() / "Library" / "Application Support" / "medsecure"
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "medsecure"


@dataclass(frozen=True)
class RecipientStatus:
    """Where a message stands for one recipient."""

    recipient: str
    status: str
    """``queued``, ``sent``, ``delivered``, ``read``, ``rejected``, ``failed`` or ``expired``."""
    endpoint: str | None = None
    attempts: int = 0
    error: str | None = None
    receipts: tuple[str, ...] = ()
    """Signed receipts received from this recipient (``delivered``, ``read``, ``rejected``)."""
    late_receipts: tuple[str, ...] = ()
    """Receipts that arrived after the message had expired or failed: recorded, never hidden,
    and never rewriting the final status."""
    reason: str | None = None
    """The recipient's reason code for a rejection."""


@dataclass(frozen=True)
class StatusEvent:
    """A change of a recipient's status, as recorded (``Client.events()``, ``on_status``)."""

    id: int
    message_id: str
    recipient: str
    status: str
    at: dt.datetime
    late: bool = False
    detail: str | None = None


@dataclass(frozen=True)
class SendResult:
    """What :meth:`Client.send` did: the message id and each recipient's status."""

    message_id: str
    recipients: tuple[RecipientStatus, ...]

    @property
    def all_sent(self) -> bool:
        return all(r.status == SENT for r in self.recipients)


@dataclass(frozen=True)
class OutboxEntry:
    """One message of the outbox with its recipients' statuses."""

    message_id: str
    created: dt.datetime
    size: int
    recipients: tuple[RecipientStatus, ...]


@dataclass(frozen=True)
class QuarantinedEnvelope:
    """An incoming envelope that failed verification, kept with the reason."""

    id: int
    received_at: dt.datetime
    reason: str
    path: Path
    message_id: str | None = None


@dataclass(frozen=True)
class ReceivedDocument:
    """A verified document; its bytes are read from the inbox on demand."""

    id: str
    media_type: str
    size: int
    filename: str | None
    title: str | None
    document_type: Code | None
    created: dt.datetime | None
    author: str | None
    patient: Patient | None
    confidentiality: str
    replaces: str | None
    _file: Path = field(repr=False)
    _offset: int = field(repr=False)

    def open(self) -> BinaryIO:
        """A binary stream of exactly this document."""
        fh = self._file.open("rb")
        fh.seek(self._offset)
        return _Range(fh, self.size)  # type: ignore[return-value]

    def read(self) -> bytes:
        with self.open() as fh:
            return fh.read()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the document to ``path`` atomically (temporary file, fsync, rename)."""
        target = Path(path)
        with self.open() as src, atomic_output(target, mode=0o600) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return target


class _Range:
    def __init__(self, fh: BinaryIO, size: int) -> None:
        self._fh = fh
        self._left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            n = self._left
        data = self._fh.read(n)
        self._left -= len(data)
        return data

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")[: self._left]
        got = self._fh.readinto(view)  # type: ignore[attr-defined]
        self._left -= got
        return int(got)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> _Range:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ReceivedMessage:
    """A verified incoming message. Call :meth:`ack` once the application has processed it."""

    message_id: str
    subject: str | None
    body: str | None
    sender: Practitioner
    sender_key: PublicIdentity
    documents: tuple[ReceivedDocument, ...]
    created: dt.datetime
    received_at: dt.datetime
    in_reply_to: str | None
    receipts_requested: tuple[str, ...]
    _client: Client = field(repr=False)
    _row: int = field(repr=False)

    def ack(self) -> None:
        """Mark the message processed: it leaves ``receive()`` and its files are removed."""
        self._client._ack(self._row)

    def mark_read(self) -> None:
        """Record that a person read the message; sends the ``read`` receipt if the sender asked
        for one and this client's policy allows read receipts."""
        self._client._mark_read(self._row)

    def reject(self, reason: str = "other") -> None:
        """Refuse the message (``unknown-patient``, ``unreadable-document``, ``not-for-me``,
        ``other``): a ``rejected`` receipt goes back if receipts were asked, then it is acked."""
        self._client._reject(self._row, reason)


def _doc_from_entry(entry: dict[str, Any], file: Path, offset: int) -> ReceivedDocument:
    def opt_code(value: Any) -> Code | None:
        try:
            return Code.model_validate(value) if value is not None else None
        except ValueError:
            return None

    patient = None
    if entry.get("patient") is not None:
        try:
            patient = Patient.model_validate(entry["patient"])
        except ValueError:
            patient = None
    created = None
    if isinstance(entry.get("created"), str):
        with contextlib.suppress(ValueError):
            created = dt.datetime.fromisoformat(entry["created"])
    return ReceivedDocument(
        id=entry["id"],
        media_type=entry["media_type"],
        size=entry["size"],
        filename=entry.get("filename"),
        title=entry.get("title"),
        document_type=opt_code(entry.get("document_type")),
        created=created,
        author=entry.get("author"),
        patient=patient,
        confidentiality=str(entry.get("confidentiality", "N")),
        replaces=entry.get("replaces"),
        _file=file,
        _offset=offset,
    )


def _ts(value: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, dt.UTC)


class Client:
    """Send and receive health documents for one identity (see the module docstring).

    ``trust`` decides which keys belong to which practitioner; when not given it comes from
    the home's configuration (``Client.from_home``), and a client without any is refused.
    ``me`` is the sender's own reference (``rpps:…``), which recipients look up to verify it.
    """

    def __init__(
        self,
        identity: Identity,
        directory: Directory,
        transport: Transport | Sequence[Transport],
        home: str | os.PathLike[str] | None = None,
        *,
        trust: TrustPolicy | None = None,
        me: str | None = None,
        max_attempts: int = 20,
        retry_base: float = 30.0,
        retry_cap: float = 6 * 3600.0,
        busy_timeout: float = 10.0,
        clock: Callable[[], float] | None = None,
        on_status: Callable[[StatusEvent], None] | None = None,
        send_read_receipts: bool = True,
        audit_checkpoint_every: int = 256,
        audit_retention_days: int = 183,
    ) -> None:
        if not isinstance(identity, Identity):
            raise TypeError("identity must be an Identity")
        if not isinstance(directory, Directory):
            raise TypeError("directory must be a medsecure Directory")
        transports = [transport] if isinstance(transport, Transport) else list(transport)
        if not transports or not all(isinstance(t, Transport) for t in transports):
            raise TypeError("transport must be a Transport or a list of them")
        if trust is None:
            raise ValueError(
                "no trust policy: pass trust=AuthorityPolicy([...]) (or an explicitly Unsafe policy), "
                "or configure one in the home (Client.from_home)"
            )
        if not isinstance(trust, TrustPolicy):
            raise TypeError("trust must be a TrustPolicy")
        self.identity = identity
        self.directory = directory
        self.transports = transports
        self.trust = trust
        self.me = parse(me).idnps if me is not None else None
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.max_attempts = max_attempts
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self._clock = clock or Store.now
        self.store = Store(self.home, busy_timeout=busy_timeout)
        self._lock = threading.RLock()
        self.on_status = on_status
        self.send_read_receipts = send_read_receipts
        self.audit = AuditLog(
            self.home / "audit",
            identity=identity,
            actor_id=self.me,
            checkpoint_every=audit_checkpoint_every,
            retention_days=audit_retention_days,
        )
        self.store.recover()

    # -- context manager --------------------------------------------------------------------
    def close(self) -> None:
        """Checkpoint the audit log (and apply its retention), then close the store."""
        with contextlib.suppress(MedsecureError):
            self.audit.purge()
        self.audit.close()
        self.store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- sending ----------------------------------------------------------------------------
    def _resolve(self, to: Any) -> list[Practitioner]:
        items = list(to) if isinstance(to, (list, tuple)) else [to]
        if not items:
            raise ValueError("at least one recipient is required")
        refs = [x for x in items if not isinstance(x, Practitioner)]
        for r in refs:
            if not isinstance(r, str):
                raise TypeError("recipients are references (str) or Practitioner objects")
        found = self.directory.lookup_many(refs) if refs else {}
        out: dict[str, Practitioner] = {}
        for x in items:
            p = x if isinstance(x, Practitioner) else found[normalize_ref(x)[0]]
            out.setdefault(p.idnps, p)
        return list(out.values())

    def _endpoints(self, p: Practitioner) -> list[Endpoint]:
        usable = [e for e in p.endpoints if any(t.accepts(e) for t in self.transports)]
        usable.sort(key=lambda e: (e.priority, KIND_ORDER.get(e.kind, 9)))
        if not usable:
            kinds: list[str] = sorted({e.kind for e in p.endpoints}) or ["none"]
            raise TransportError(
                f"no configured transport can reach {p.idnps} (its endpoints: {', '.join(kinds)})"
            )
        return usable

    def send(
        self,
        documents: Document | Sequence[Document],
        to: str | Practitioner | Sequence[str | Practitioner],
        *,
        subject: str | None = None,
        body: str | None = None,
        in_reply_to: str | None = None,
        receipts: Sequence[str] = (),
        allow_classic: bool = False,
        progress: Callable[[int], None] | None = None,
        deadline: dt.timedelta | dt.datetime | None = None,
    ) -> SendResult:
        """Seal ``documents`` for every recipient in ``to`` and deliver them.

        Returns once the envelope and its delivery plan are durably stored and one delivery
        attempt per recipient was made. Raises before storing anything if a recipient is
        unknown, has no trusted key or no reachable endpoint. ``progress`` is called with the
        number of bytes sealed since its previous call (for progress bars). With ``receipts``,
        each recipient signs and returns ``delivered`` / ``read`` receipts; with ``deadline``, a
        recipient whose ``delivered`` receipt has not come by then is marked ``expired``.
        """
        docs = [documents] if isinstance(documents, Document) else list(documents)
        if not all(isinstance(d, Document) for d in docs):
            raise TypeError("documents must be Document objects")
        if not docs and body is None:
            raise ValueError("nothing to send: give documents or a body")
        if self.me is None:
            raise ValueError("the client needs to know who it sends as: Client(..., me='rpps:…')")
        bad = [r for r in receipts if r not in ("delivered", "read")]
        if bad:
            raise ValueError(f"unknown receipt kind {bad[0]!r}: expected 'delivered' or 'read'")
        if isinstance(deadline, dt.timedelta):
            deadline_ts: float | None = self._clock() + deadline.total_seconds()
        elif isinstance(deadline, dt.datetime):
            if deadline.tzinfo is None:
                raise ValueError("deadline must be timezone-aware")
            deadline_ts = deadline.timestamp()
        elif deadline is None:
            deadline_ts = None
        else:
            raise TypeError("deadline is a timedelta or a datetime")
        practitioners = self._resolve(to)
        now = self._clock()
        manifest = Manifest(
            message_id=new_message_id(_ts(now)),
            created=_ts(now),
            sender_idnps=self.me,
            recipients=tuple(p.idnps for p in practitioners),
            subject=subject,
            body=body,
            in_reply_to=in_reply_to,
            documents=tuple(d.describe(d.size) for d in docs),
            receipts=tuple(dict.fromkeys(receipts)),
        )
        patients = sorted(
            {self.audit.link(d.patient.ins.matricule) for d in docs if d.patient is not None}
        )
        return self._submit(
            manifest,
            docs,
            practitioners,
            allow_classic=allow_classic,
            progress=progress,
            deadline=deadline_ts,
            patients=patients,
        )

    def _submit(
        self,
        manifest: Manifest,
        docs: Sequence[Document],
        practitioners: Sequence[Practitioner],
        *,
        allow_classic: bool = False,
        progress: Callable[[int], None] | None = None,
        deadline: float | None = None,
        patients: Sequence[str] = (),
    ) -> SendResult:
        """Seal into the outbox, commit the delivery plan, attempt delivery (shared by messages
        and receipts)."""
        keys: list[PublicIdentity] = []
        plans: list[tuple[str, list[Endpoint]]] = []
        try:
            for p in practitioners:
                for k in self._trusted_keys(p):
                    if k not in keys:
                        keys.append(k)
                plans.append((p.idnps, self._endpoints(p)))
        except TrustError as exc:
            self.audit.append(
                "trust-refused",
                message_id=manifest.message_id,
                result=type(exc).__name__,
                answer=str(exc),
            )
            raise
        message_id = manifest.message_id
        now = self._clock()
        name = f"{message_id}.msec"
        path = self.store.outbox_dir / name
        try:
            with (
                MessageReader(manifest, docs, progress=progress) as src,
                # 0644: the envelope is encrypted; drop folders may hard-link it for other users
                atomic_output(path, mode=0o644) as out,
            ):
                seal_stream(
                    src,  # type: ignore[arg-type]
                    out,
                    sender=self.identity,
                    recipients=keys,
                    allow_classic=allow_classic,
                )
            size = path.stat().st_size
            with path.open("rb") as fh:
                eid = envelope_id(fh)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            raise StorageError(f"cannot write the outbox: {exc.strerror}") from exc
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        try:
            with self.store.transaction() as db:
                db.execute(
                    "INSERT INTO outbox (message_id, created, envelope, size, envelope_id, receipts, deadline, kind)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        message_id,
                        now,
                        name,
                        size,
                        eid,
                        ",".join(manifest.receipts),
                        deadline,
                        manifest.kind,
                    ),
                )
                db.executemany(
                    "INSERT INTO deliveries VALUES (?, ?, ?, 0, ?, 0, ?, NULL, ?)",
                    [
                        (
                            message_id,
                            idnps,
                            json.dumps(
                                [e.model_dump(mode="json", exclude_defaults=True) for e in eps]
                            ),
                            QUEUED,
                            now,
                            now,
                        )
                        for idnps, eps in plans
                    ],
                )
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        log.info("message %s accepted for %d recipient(s)", message_id, len(plans))
        # From here on the message is accepted: a failure of the audit log or of a delivery's
        # bookkeeping must not make the caller believe the send failed (and send it again).
        try:
            with self.audit.batch():
                self.audit.append(
                    "send" if manifest.kind == "message" else "receipt-send",
                    message_id=message_id,
                    envelope_id=eid,
                    counterparty=[idnps for idnps, _ in plans],
                    keys=[k.fingerprint for k in keys],
                    documents=len(docs),
                    size=size,
                    receipts=list(manifest.receipts) or None,
                    patients=list(patients) or None,
                    of=(manifest.extra or {}).get("of"),
                    result=(manifest.extra or {}).get("status"),
                )
                self._deliver(
                    self.store.query(
                        "SELECT * FROM deliveries WHERE message_id = ? AND status = ?",
                        (message_id, QUEUED),
                    )
                )
            return SendResult(message_id, tuple(self._statuses(message_id)))
        except MedsecureError as exc:
            log.error(
                "message %s is accepted but its delivery attempt failed (%s); flush() retries it",
                message_id,
                exc,
            )
            return SendResult(
                message_id,
                tuple(RecipientStatus(idnps, QUEUED, error=str(exc)) for idnps, _ in plans),
            )

    def _trusted_keys(self, p: Practitioner) -> list[PublicIdentity]:
        """The practitioner's keys the policy accepts; key pinning and rotations are audited."""
        decisions = self.trust.decisions(p)
        for decision in decisions:
            self._audit_trust(decision)
        return [d.key for d in decisions]

    def _audit_trust(self, decision: TrustDecision) -> None:
        if decision.newly_pinned or decision.reason in ("rotation", "new-authority-statement"):
            self.audit.append(
                "trust",
                counterparty=decision.idnps,
                key=decision.key.fingerprint,
                result=decision.reason,
                authority=decision.authority,
            )

    def _statuses(self, message_id: str) -> list[RecipientStatus]:
        got: dict[str, list[Any]] = {}
        for r in self.store.query(
            "SELECT * FROM receipts WHERE message_id = ? ORDER BY at", (message_id,)
        ):
            got.setdefault(r["recipient"], []).append(r)
        out = []
        for r in self.store.query(
            "SELECT * FROM deliveries WHERE message_id = ? ORDER BY recipient", (message_id,)
        ):
            eps = json.loads(r["endpoints"])
            ep = eps[min(r["endpoint_index"], len(eps) - 1)]["kind"] if eps else None
            receipts = got.get(r["recipient"], [])
            on_time = [x for x in receipts if not x["late"]]
            status = r["status"]
            reason = None
            rejected = [x for x in on_time if x["status"] == "rejected"]
            if rejected:
                status, reason = "rejected", rejected[0]["reason"]
            elif status in (SENT, QUEUED) and on_time:
                best = max(on_time, key=lambda x: RECEIPT_ORDER.get(x["status"], 0))
                status = best["status"]
            out.append(
                RecipientStatus(
                    r["recipient"],
                    status,
                    ep,
                    r["attempts"],
                    r["last_error"],
                    receipts=tuple(x["status"] for x in on_time),
                    late_receipts=tuple(x["status"] for x in receipts if x["late"]),
                    reason=reason,
                )
            )
        return out

    def _event(
        self,
        message_id: str,
        recipient: str,
        status: str,
        *,
        late: bool = False,
        detail: str | None = None,
    ) -> None:
        at = self._clock()
        with self.store.transaction(durable=False) as db:
            cur = db.execute(
                "INSERT INTO events (message_id, recipient, status, at, late, detail) VALUES (?, ?, ?, ?, ?, ?)",
                (message_id, recipient, status, at, int(late), detail),
            )
            event_id = int(cur.lastrowid or 0)
        if self.on_status is not None:
            try:
                self.on_status(
                    StatusEvent(event_id, message_id, recipient, status, _ts(at), late, detail)
                )
            except Exception:  # the application's callback must not break delivery
                log.exception("on_status callback failed")

    def events(self, *, after: int = 0) -> list[StatusEvent]:
        """Recorded status changes with an id above ``after`` (poll with the last id seen)."""
        return [
            StatusEvent(
                r["id"],
                r["message_id"],
                r["recipient"],
                r["status"],
                _ts(r["at"]),
                bool(r["late"]),
                r["detail"],
            )
            for r in self.store.query("SELECT * FROM events WHERE id > ? ORDER BY id", (after,))
        ]

    def expire(self) -> list[RecipientStatus]:
        """Mark ``expired`` every recipient whose deadline passed without a delivered receipt."""
        now = self._clock()
        rows = self.store.query(
            "SELECT d.message_id, d.recipient FROM deliveries d JOIN outbox o ON o.message_id = d.message_id"
            " WHERE o.deadline IS NOT NULL AND o.deadline < ? AND d.status IN (?, ?)"
            " AND NOT EXISTS (SELECT 1 FROM receipts r WHERE r.message_id = d.message_id AND r.recipient = d.recipient"
            " AND r.status IN ('delivered', 'read', 'rejected'))",
            (now, QUEUED, SENT),
        )
        if not rows:
            return []
        with self.store.transaction() as db:
            db.executemany(
                "UPDATE deliveries SET status = 'expired', updated = ? WHERE message_id = ? AND recipient = ?",
                [(now, r["message_id"], r["recipient"]) for r in rows],
            )
        with self.audit.batch():
            for r in rows:
                self.audit.append(
                    "expire",
                    message_id=r["message_id"],
                    counterparty=r["recipient"],
                    result="expired",
                )
        for r in rows:
            self._event(r["message_id"], r["recipient"], "expired")
        return [
            s for mid in dict.fromkeys(r["message_id"] for r in rows) for s in self._statuses(mid)
        ]

    def _backoff(self, attempts: int) -> float:
        ceiling = min(self.retry_cap, self.retry_base * 2 ** max(0, attempts - 1))
        return random.uniform(ceiling / 2, ceiling)

    def _transport_for(self, endpoint: Endpoint) -> Transport:
        for t in self.transports:
            if t.accepts(endpoint):
                return t
        raise DeliveryRejected(f"no configured transport for a {endpoint.kind} endpoint")

    def _deliver(self, rows: Sequence[Any]) -> None:
        for row in rows:
            self._deliver_one(row)

    def _deliver_one(self, row: Any) -> None:
        endpoints = [Endpoint.model_validate(e) for e in json.loads(row["endpoints"])]
        index = row["endpoint_index"]
        attempts = row["attempts"]
        message_id, recipient = row["message_id"], row["recipient"]
        env = self.store.query(
            "SELECT envelope, size FROM outbox WHERE message_id = ?", (message_id,)
        )
        path = self.store.outbox_dir / env[0]["envelope"]
        status, error, next_attempt = QUEUED, None, self._clock()
        while True:
            endpoint = endpoints[index]
            attempts += 1
            try:
                transport = self._transport_for(endpoint)
                with path.open("rb") as fh:
                    transport.deliver(endpoint, fh, message_id=message_id, size=env[0]["size"])
            except FileNotFoundError:
                status, error = FAILED, "the sealed envelope is missing from the outbox"
                break
            except DeliveryRejected as exc:
                error = str(exc)
                if index + 1 < len(endpoints):
                    index += 1
                    log.info(
                        "message %s: %s endpoint refused, trying the next one",
                        message_id,
                        endpoint.kind,
                    )
                    continue
                status = FAILED
                break
            except (TransportUnavailable, TransportError, OSError) as exc:
                error = str(exc) if isinstance(exc, MedsecureError) else f"I/O error: {exc}"
                if attempts >= self.max_attempts:
                    status = FAILED
                    error = f"gave up after {attempts} attempts: {error}"
                else:
                    next_attempt = self._clock() + self._backoff(attempts)
                break
            else:
                status, error = SENT, None
                break
        with self.store.transaction(durable=False) as db:
            db.execute(
                "UPDATE deliveries SET status = ?, attempts = ?, endpoint_index = ?, next_attempt = ?,"
                " last_error = ?, updated = ? WHERE message_id = ? AND recipient = ? AND status = ?",
                (
                    status,
                    attempts,
                    index,
                    next_attempt,
                    error,
                    self._clock(),
                    message_id,
                    recipient,
                    QUEUED,
                ),
            )
        self.audit.append(
            "deliver",
            message_id=message_id,
            counterparty=recipient,
            endpoint=endpoints[index].kind,
            attempt=attempts,
            result=status,
            answer=error,
        )
        if status == FAILED:
            log.warning("message %s to %s failed: %s", message_id, recipient, error)
        if status in (SENT, FAILED):
            self._event(message_id, recipient, status, detail=error)

    def flush(
        self, *, force: bool = False, progress: Callable[[int, int], None] | None = None
    ) -> list[RecipientStatus]:
        """Attempt every queued delivery that is due (all of them with ``force=True``), after
        marking expired the recipients whose deadline passed. ``progress(done, total)`` is called
        after each attempt (for progress bars)."""
        self.expire()
        if force:
            rows = self.store.query(
                "SELECT * FROM deliveries WHERE status = ? ORDER BY message_id", (QUEUED,)
            )
        else:
            rows = self.store.query(
                "SELECT * FROM deliveries WHERE status = ? AND next_attempt <= ? ORDER BY message_id",
                (QUEUED, self._clock()),
            )
        with self.audit.batch():
            for done, row in enumerate(rows, 1):
                self._deliver_one(row)
                if progress is not None:
                    progress(done, len(rows))
        ids = list(dict.fromkeys(r["message_id"] for r in rows))
        return [s for mid in ids for s in self._statuses(mid)]

    def outbox(self) -> list[OutboxEntry]:
        """Every message of the outbox, oldest first, with its recipients' statuses."""
        return [
            OutboxEntry(
                r["message_id"],
                _ts(r["created"]),
                r["size"],
                tuple(self._statuses(r["message_id"])),
            )
            for r in self.store.query(
                "SELECT * FROM outbox WHERE kind = 'message' ORDER BY created, message_id"
            )
        ]

    def status(self, message_id: str) -> list[RecipientStatus]:
        """The recipients' statuses of one sent message (receipts and deadlines included)."""
        self.expire()
        statuses = self._statuses(message_id)
        if not statuses:
            raise KeyError(f"no message {message_id!r} in the outbox")
        return statuses

    # -- receiving --------------------------------------------------------------------------
    def _store_incoming(self, transport: Transport, limit: int | None) -> int:
        stored = 0
        local_path = getattr(transport, "local_path", None)
        for item in transport.list():
            if limit is not None and stored >= limit:
                break
            tmp = (
                self.store.inbox_dir / f".medsecure-in-{os.getpid()}-{random.getrandbits(48):012x}"
            )
            try:
                self._take(transport, item, tmp, local_path)
            except TransportUnavailable:
                continue  # taken meanwhile by another reader
            try:
                with tmp.open("rb") as fh:
                    eid = envelope_id(fh)
            except EnvelopeError:
                eid = "unparsable-" + os.urandom(16).hex()  # verified (and quarantined) below
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise StorageError(f"cannot read an incoming envelope: {exc.strerror}") from exc
            known = self.store.query(
                "SELECT id FROM inbox WHERE envelope_id = ? AND status IN ('received', 'acked', 'duplicate', 'receipt', 'receipt-ignored')",
                (eid,),
            )
            if known:
                tmp.unlink(missing_ok=True)
                transport.acknowledge(item)  # already received by an earlier run: idempotent
                continue
            with self.store.transaction() as db:
                cur = db.execute(
                    "INSERT INTO inbox (envelope_id, status, received_at) VALUES (?, 'fetched', ?)",
                    (eid, self._clock()),
                )
                row_id = cur.lastrowid
                name = f"{row_id}.msec"
                os.replace(tmp, self.store.inbox_dir / name)
                fsync_dir(self.store.inbox_dir)
                db.execute("UPDATE inbox SET envelope = ? WHERE id = ?", (name, row_id))
            transport.acknowledge(item)
            stored += 1
        return stored

    def _take(self, transport: Transport, item: Any, tmp: Path, local_path: Any) -> None:
        """Put a durable copy of a waiting envelope at ``tmp``.

        A drop folder on the same file system is hard-linked (its file was fsynced by the
        sender); anything else is copied and fsynced."""
        if local_path is not None:
            try:
                os.link(local_path(item), tmp)
            except FileNotFoundError as exc:
                raise TransportUnavailable("the envelope was taken by another reader") from exc
            except OSError:
                pass  # another file system: copy below
            else:
                return
        src = transport.fetch(item)
        try:
            with src, tmp.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StorageError(f"cannot store an incoming envelope: {exc.strerror}") from exc

    def _quarantine(self, row: Any, reason: str, message_id: str | None = None) -> None:
        src = self.store.inbox_dir / row["envelope"]
        dst = self.store.quarantine_dir / f"{row['id']}.msec"
        with contextlib.suppress(FileNotFoundError):
            os.replace(src, dst)
            fsync_dir(self.store.quarantine_dir)
        with contextlib.suppress(FileNotFoundError):
            (self.store.inbox_dir / f"{row['id']}.msg").unlink()
        with self.store.transaction() as db:
            db.execute(
                "UPDATE inbox SET status = 'quarantined', reason = ?, envelope = ?, plaintext = NULL, message_id = NULL WHERE id = ?",
                (reason, dst.name, row["id"]),
            )
        log.warning("incoming envelope %d quarantined: %s", row["id"], reason)
        self._on_quarantine(row["id"], reason, message_id)

    def _on_quarantine(self, row_id: int, reason: str, message_id: str | None) -> None:
        self.audit.append(
            "quarantine", inbox=row_id, message_id=message_id, result="quarantined", answer=reason
        )

    def _claim(self, row: Any) -> bool:
        """Take a fetched envelope for verification (compare-and-swap on the claim), so that
        several clients on one home never open the same envelope at once. A claim left by a
        process that died is taken over; so is one older than ten minutes."""
        if row["status"] == "verifying":
            alive = True
            if os.name != "nt":  # on Windows os.kill would terminate the process: rely on age
                try:
                    os.kill(int(row["claimer"]), 0)
                except (ProcessLookupError, TypeError, ValueError):
                    alive = False
                except PermissionError:
                    pass
            stale = (row["claimed_at"] or 0) < self._clock() - 600
            if alive and not stale:
                return False
        with self.store.transaction(durable=False) as db:
            cur = db.execute(
                "UPDATE inbox SET status = 'verifying', claimer = ?, claimed_at = ? WHERE id = ? AND status = ?"
                " AND claimer IS ? AND claimed_at IS ?",
                (
                    os.getpid(),
                    self._clock(),
                    row["id"],
                    row["status"],
                    row["claimer"],
                    row["claimed_at"],
                ),
            )
            return cur.rowcount == 1

    def _verify(self, row: Any) -> None:
        env_path = self.store.inbox_dir / row["envelope"]
        plain_name = f"{row['id']}.msg"
        plain_path = self.store.inbox_dir / plain_name
        try:
            with env_path.open("rb") as src:
                opened = unseal_stream(src, plain_path, identity=self.identity)
        except EnvelopeError as exc:
            self._quarantine(row, f"envelope refused: {exc}")
            return
        except FileNotFoundError:
            self._quarantine(row, "envelope file missing")
            return
        try:
            with plain_path.open("rb") as fh:
                manifest, _ = read_manifest(fh, opened.size)
        except EnvelopeError as exc:
            self._quarantine(row, f"message refused: {exc}")
            return
        if manifest.sender_idnps is None:
            self._quarantine(row, "the sender did not identify themselves", manifest.message_id)
            return
        try:
            sender = self.directory.lookup(f"idnps:{manifest.sender_idnps}")
        except PractitionerNotFound:
            self._quarantine(
                row,
                f"sender {manifest.sender_idnps} is unknown to the directory",
                manifest.message_id,
            )
            return
        except DirectoryUnavailable:
            plain_path.unlink(missing_ok=True)
            with self.store.transaction(durable=False) as db:
                db.execute(
                    "UPDATE inbox SET status = 'fetched', claimer = NULL WHERE id = ?", (row["id"],)
                )
            log.info(
                "directory unavailable: incoming envelope %d will be verified later", row["id"]
            )
            return
        try:
            self._audit_trust(self.trust.check(sender, opened.sender))
        except TrustError as exc:
            self._quarantine(
                row,
                f"sender key not trusted for {manifest.sender_idnps}: {exc}",
                manifest.message_id,
            )
            if manifest.receipts and manifest.kind == "message":
                # tell the practitioner the directory knows (never the unverified key) that
                # something sent in their name failed verification
                self._send_receipt(
                    manifest.message_id,
                    row["envelope_id"],
                    sender,
                    "rejected",
                    "verification-failed",
                )
            return
        if self._handle_special(row, manifest, opened.sender, sender, plain_path):
            return
        # Check and claim the message id in one write transaction: two processes verifying
        # copies of the same message concurrently cannot both record it.
        with self.store.transaction() as db:
            dup = db.execute(
                "SELECT id FROM inbox WHERE message_id = ? AND id != ?",
                (manifest.message_id, row["id"]),
            ).fetchall()
            if dup:
                db.execute(
                    "UPDATE inbox SET status = 'duplicate', plaintext = NULL WHERE id = ?",
                    (row["id"],),
                )
            else:
                db.execute(
                    "UPDATE inbox SET status = 'received', message_id = ?, sender_idnps = ?, plaintext = ?,"
                    " sender = ?, sender_key = ?, receipts = ? WHERE id = ?",
                    (
                        manifest.message_id,
                        sender.idnps,
                        plain_name,
                        sender.model_dump_json(),
                        str(opened.sender),
                        ",".join(manifest.receipts),
                        row["id"],
                    ),
                )
        if dup:
            plain_path.unlink(missing_ok=True)
            env_path.unlink(missing_ok=True)
            return
        self._on_received(row, manifest, sender)

    def _handle_special(
        self, row: Any, manifest: Manifest, key: PublicIdentity, sender: Practitioner, plain: Path
    ) -> bool:
        """Non-document messages (receipts); True when handled."""
        if manifest.kind != "receipt":
            return False
        self._handle_receipt(row, manifest, sender)
        for name in (row["envelope"], plain.name):
            with contextlib.suppress(OSError):
                (self.store.inbox_dir / name).unlink()
        return True

    def _on_received(self, row: Any, manifest: Manifest, sender: Practitioner) -> None:
        patients = sorted(
            {
                self.audit.link(str(d["patient"]["ins"]["matricule"]))
                for d in manifest.documents
                if isinstance(d.get("patient"), dict)
                and isinstance(d["patient"].get("ins"), dict)
                and d["patient"]["ins"].get("matricule")
            }
        )
        self.audit.append(
            "receive",
            message_id=manifest.message_id,
            envelope_id=row["envelope_id"],
            counterparty=sender.idnps,
            documents=len(manifest.documents),
            patients=patients or None,
            receipts=list(manifest.receipts) or None,
        )
        if "delivered" in manifest.receipts:
            self._send_receipt(manifest.message_id, row["envelope_id"], sender, "delivered")

    # -- receipts ---------------------------------------------------------------------------
    def _send_receipt(
        self, of: str, envelope: str, to: Practitioner, status: str, reason: str | None = None
    ) -> None:
        """Send a signed receipt for message ``of`` (idempotent; failures are logged, never
        raised into receive())."""
        if self.store.query(
            "SELECT 1 FROM sent_receipts WHERE message_id = ? AND status = ?", (of, status)
        ):
            return
        if self.me is None:
            log.warning(
                "cannot send a %s receipt: the client does not know who it is (me=)", status
            )
            return
        now = self._clock()
        extra: dict[str, Any] = {
            "status": status,
            "of": of,
            "envelope": envelope,
            "at": int(now * 1000),
        }
        if reason:
            extra["reason"] = reason
        manifest = Manifest(
            message_id=new_message_id(_ts(now)),
            created=_ts(now),
            sender_idnps=self.me,
            recipients=(to.idnps,),
            subject=None,
            body=None,
            in_reply_to=of,
            documents=(),
            receipts=(),
            kind="receipt",
            extra=extra,
        )
        try:
            self._submit(manifest, [], [to])
        except MedsecureError as exc:
            log.warning("could not send the %s receipt for %s: %s", status, of, exc)
            self.audit.append(
                "receipt-failed",
                message_id=of,
                counterparty=to.idnps,
                result=status,
                answer=str(exc),
            )
            return
        with self.store.transaction(durable=False) as db:
            db.execute("INSERT OR IGNORE INTO sent_receipts VALUES (?, ?, ?)", (of, status, now))

    def _handle_receipt(self, row: Any, manifest: Manifest, sender: Practitioner) -> None:
        extra = manifest.extra or {}
        status, of, envelope, reason = (
            extra.get("status"),
            extra.get("of"),
            extra.get("envelope"),
            extra.get("reason"),
        )
        problem = None
        outbox = (
            self.store.query("SELECT * FROM outbox WHERE message_id = ?", (of,))
            if isinstance(of, str)
            else []
        )
        delivery = (
            self.store.query(
                "SELECT * FROM deliveries WHERE message_id = ? AND recipient = ?",
                (of, sender.idnps),
            )
            if outbox
            else []
        )
        if status not in ("delivered", "read", "rejected"):
            problem = "unknown receipt status"
        elif not outbox:
            problem = "receipt for an unknown message"
        elif not delivery:
            problem = f"receipt from {sender.idnps}, who is not a recipient of the message"
        elif outbox[0]["envelope_id"] != envelope:
            problem = "receipt for other content than the envelope sent"
        elif reason is not None and (not isinstance(reason, str) or len(reason) > 64):
            problem = "malformed rejection reason"
        if problem is not None:
            log.warning("ignoring a receipt: %s", problem)
            self.audit.append(
                "receipt-ignored",
                message_id=of if isinstance(of, str) else None,
                counterparty=sender.idnps,
                answer=problem,
            )
            with self.store.transaction() as db:
                db.execute(
                    "UPDATE inbox SET status = 'receipt-ignored', message_id = ?, reason = ?, envelope = NULL WHERE id = ?",
                    (manifest.message_id, problem, row["id"]),
                )
            return
        late = delivery[0]["status"] in ("expired", FAILED)
        with self.store.transaction() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO receipts VALUES (?, ?, ?, ?, ?, ?)",
                (of, sender.idnps, status, manifest.created.timestamp(), reason, int(late)),
            )
            fresh = cur.rowcount > 0
            db.execute(
                "UPDATE inbox SET status = 'receipt', message_id = ?, sender_idnps = ?, envelope = NULL WHERE id = ?",
                (manifest.message_id, sender.idnps, row["id"]),
            )
        if fresh:
            self.audit.append(
                "receipt",
                message_id=of,
                envelope_id=envelope,
                counterparty=sender.idnps,
                result=status,
                late=late or None,
                answer=reason,
            )
            if late:
                log.warning(
                    "late %s receipt for %s from %s (already %s)",
                    status,
                    of,
                    sender.idnps,
                    delivery[0]["status"],
                )
            self._event(str(of), sender.idnps, str(status), late=late, detail=reason)

    def _mark_read(self, row_id: int) -> None:
        rows = self.store.query("SELECT * FROM inbox WHERE id = ?", (row_id,))
        if (
            not rows
            or rows[0]["status"] not in ("received", "acked")
            or rows[0]["read_at"] is not None
        ):
            return
        row = rows[0]
        with self.store.transaction(durable=False) as db:
            db.execute("UPDATE inbox SET read_at = ? WHERE id = ?", (self._clock(), row_id))
        self.audit.append("read", message_id=row["message_id"], counterparty=row["sender_idnps"])
        if "read" in (row["receipts"] or "").split(",") and self.send_read_receipts:
            sender = Practitioner.model_validate_json(row["sender"])
            self._send_receipt(row["message_id"], row["envelope_id"], sender, "read")

    def _reject(self, row_id: int, reason: str) -> None:
        if reason not in REJECTION_CODES:
            raise ValueError(
                f"unknown rejection reason {reason!r}: expected one of {', '.join(REJECTION_CODES)}"
            )
        rows = self.store.query("SELECT * FROM inbox WHERE id = ?", (row_id,))
        if not rows or rows[0]["status"] != "received":
            return
        row = rows[0]
        self.audit.append(
            "reject", message_id=row["message_id"], counterparty=row["sender_idnps"], answer=reason
        )
        if row["receipts"]:
            self._send_receipt(
                row["message_id"],
                row["envelope_id"],
                Practitioner.model_validate_json(row["sender"]),
                "rejected",
                reason,
            )
        self._ack(row_id)

    def receive(self, *, limit: int | None = None) -> list[ReceivedMessage]:
        """Fetch, store, open and verify incoming envelopes (at most ``limit`` new ones per
        call); return every verified message not yet acknowledged, oldest first."""
        if limit is not None and limit < 1:
            raise ValueError("limit must be at least 1")
        with self._lock:
            budget = limit
            for t in self.transports:
                got = self._store_incoming(t, budget)
                if budget is not None:
                    budget = max(0, budget - got)
                    if budget == 0:
                        break
            done = 0
            with self.audit.batch():
                for row in self.store.query(
                    "SELECT * FROM inbox WHERE status IN ('fetched', 'verifying') ORDER BY id"
                ):
                    if limit is not None and done >= limit:
                        break
                    if self._claim(row):
                        try:
                            self._verify(row)
                        except BaseException:
                            with (
                                contextlib.suppress(MedsecureError),
                                self.store.transaction(durable=False) as db,
                            ):
                                db.execute(
                                    "UPDATE inbox SET status = 'fetched', claimer = NULL, claimed_at = NULL"
                                    " WHERE id = ? AND status = 'verifying'",
                                    (row["id"],),
                                )
                            raise
                        done += 1
            return [
                self._message(r)
                for r in self.store.query(
                    "SELECT * FROM inbox WHERE status = 'received' ORDER BY id"
                )
            ]

    def _message(self, row: Any) -> ReceivedMessage:
        path = self.store.inbox_dir / row["plaintext"]
        with path.open("rb") as fh:
            manifest, offset = read_manifest(fh, path.stat().st_size)
        docs = []
        for entry in manifest.documents:
            docs.append(_doc_from_entry(entry, path, offset))
            offset += entry["size"]
        return ReceivedMessage(
            message_id=manifest.message_id,
            subject=manifest.subject,
            body=manifest.body,
            sender=Practitioner.model_validate_json(row["sender"]),
            sender_key=PublicIdentity.from_text(row["sender_key"]),
            documents=tuple(docs),
            created=manifest.created,
            received_at=_ts(row["received_at"]),
            in_reply_to=manifest.in_reply_to,
            receipts_requested=manifest.receipts,
            _client=self,
            _row=row["id"],
        )

    def _ack(self, row_id: int) -> None:
        rows = self.store.query("SELECT * FROM inbox WHERE id = ?", (row_id,))
        if not rows or rows[0]["status"] != "received":
            return
        with self.store.transaction() as db:
            db.execute(
                "UPDATE inbox SET status = 'acked', plaintext = NULL, envelope = NULL WHERE id = ?",
                (row_id,),
            )
        self.audit.append(
            "ack", message_id=rows[0]["message_id"], counterparty=rows[0]["sender_idnps"]
        )
        for name in (rows[0]["plaintext"], rows[0]["envelope"]):
            if name:
                with contextlib.suppress(OSError):
                    (self.store.inbox_dir / name).unlink()

    def quarantine(self) -> list[QuarantinedEnvelope]:
        """Incoming envelopes that failed verification, with the reason."""
        return [
            QuarantinedEnvelope(
                r["id"],
                _ts(r["received_at"]),
                r["reason"] or "",
                self.store.quarantine_dir / (r["envelope"] or ""),
                r["message_id"],
            )
            for r in self.store.query(
                "SELECT * FROM inbox WHERE status = 'quarantined' ORDER BY id"
            )
        ]
