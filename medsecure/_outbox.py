"""The outbox: a sealed message waits on disk until every recipient has it or has failed.

Theory of operation
-------------------
*Accepted means on disk.* :meth:`Outbox.seal` writes the envelope to ``outbox/<id>.msec``
(temporary name, fsync, rename, fsync of the folder); :meth:`Outbox.accept` commits the message
row and one delivery row per recipient — its endpoints in the order they will be tried — in one
durable transaction. Only then is delivery attempted.

The rules are pure functions, so that every driver (``Client``, ``AsyncClient``) applies the
same ones:

* :func:`route` — a recipient's endpoints that a configured transport accepts, by their
  ``priority`` (lower first), ties broken by the order of the transports given to the client.
* :func:`after_attempt` — what one delivery attempt's outcome means: ``sent``; a permanent
  refusal (:class:`~medsecure.DeliveryRejected`) moves to the next endpoint at once (the
  recipient's status keeps why, :func:`skip_note`), or fails when there is none; a transient one (:class:`~medsecure.TransportUnavailable`, or anything
  unexpected from a transport) is retried later with exponential backoff and jitter, and fails
  after ``max_attempts``.
* receipts and delivery reports fold into each recipient's status (:mod:`._receipts`).

Delivery statuses of a recipient: ``queued`` → ``sent`` | ``failed``; ``expired`` when a deadline
passes without a ``delivered`` receipt. Status updates after an attempt are committed with
``synchronous=NORMAL``: losing one to a power cut only means delivering again, which every
transport makes idempotent and every inbox deduplicates.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import random
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _receipts as receipts
from ._document import Document
from ._errors import DeliveryRejected, MedsecureError, StorageError, TransportError, TrustError
from ._fs import atomic_output, removing_on_failure
from ._identity import Identity, PublicIdentity
from ._receipts import REQUESTABLE
from ._results import OutboxEntry, RecipientStatus, SendResult, StatusEvent
from ._store import Store
from .audit import AuditLog
from .directory import Directory
from .directory._base import normalize_ref
from .envelope._message import Manifest, MessageReader, new_message_id
from .envelope._seal import envelope_id, seal_stream
from .models import Endpoint, Practitioner
from .transports import DeliveryReport, Transport
from .trust import TrustDecision, TrustPolicy

if TYPE_CHECKING:
    from .mail import MssanteOptions

__all__ = ["Attempt", "Outbox", "RetryPolicy", "after_attempt", "route", "skip_note"]

log = logging.getLogger("medsecure.outbox")

QUEUED, SENT, FAILED, EXPIRED = "queued", "sent", "failed", "expired"


def route(practitioner: Practitioner, transports: Sequence[Transport]) -> list[Endpoint]:
    """The practitioner's endpoints some transport accepts, in the order they are tried:
    ``priority`` first (lower first), then the order of ``transports``. Raises TransportError
    when none is reachable."""

    def rank(endpoint: Endpoint) -> int | None:
        for i, t in enumerate(transports):
            if t.accepts(endpoint):
                return i
        return None

    usable = [
        (e.priority, r, n, e)
        for n, e in enumerate(practitioner.endpoints)
        if (r := rank(e)) is not None
    ]
    if not usable:
        kinds = sorted({e.kind for e in practitioner.endpoints}) or ["none"]
        raise TransportError(
            f"no configured transport can reach {practitioner.idnps} "
            f"(its endpoints: {', '.join(kinds)})"
        )
    return [e for _, _, _, e in sorted(usable, key=lambda x: x[:3])]


def vouched_endpoints(practitioner: Practitioner, trusted: Iterable[str]) -> Practitioner:
    """``practitioner`` with only the endpoints that came with a key in ``trusted``
    (fingerprints the trust policy accepted), see :attr:`Endpoint.keys`; an endpoint that does
    not say (its entry was never merged with another's) goes with the entry's keys. The
    endpoints kept no longer carry ``keys`` (the outbox stores and matches them as transports
    name them). Raises TransportError when the practitioner had endpoints and none is vouched."""
    accepted = set(trusted)
    kept = tuple(
        e.model_copy(update={"keys": None})
        for e in practitioner.endpoints
        if e.keys is None or accepted.intersection(e.keys)
    )
    if practitioner.endpoints and not kept:
        raise TransportError(
            f"no endpoint of {practitioner.idnps} came with a key the trust policy accepts"
        )
    return practitioner.model_copy(update={"endpoints": kept})


def plain_document(item: Any) -> Document:
    """The ``Document`` of what was given to ``send`` (a Document, or an XDM wrapper)."""
    if isinstance(item, Document):
        return item
    inner = getattr(item, "document", None)
    if isinstance(inner, Document) and type(item).__name__ == "XdmDocument":
        return inner
    raise TypeError("documents must be Document objects (or medsecure.mail.XdmDocument)")


def resolve(directory: Directory, to: Any) -> list[Practitioner]:
    """The practitioners ``to`` names (references looked up in one batch, objects as given),
    each once."""
    items = list(to) if isinstance(to, (list, tuple)) else [to]
    if not items:
        raise ValueError("at least one recipient is required")
    refs = [x for x in items if not isinstance(x, Practitioner)]
    for r in refs:
        if not isinstance(r, str):
            raise TypeError("recipients are references (str) or Practitioner objects")
    found = directory.lookup_many(refs) if refs else {}
    out: dict[str, Practitioner] = {}
    for x in items:
        p = x if isinstance(x, Practitioner) else found[normalize_ref(x)[0]]
        out.setdefault(p.idnps, p)
    return list(out.values())


def deadline_at(deadline: dt.timedelta | dt.datetime | None, now: float) -> float | None:
    """A ``send(deadline=…)`` as a timestamp."""
    if isinstance(deadline, dt.timedelta):
        return now + deadline.total_seconds()
    if isinstance(deadline, dt.datetime):
        if deadline.tzinfo is None:
            raise ValueError("deadline must be timezone-aware")
        return deadline.timestamp()
    if deadline is None:
        return None
    raise TypeError("deadline is a timedelta or a datetime")


def compose(
    docs: Sequence[Document],
    practitioners: Sequence[Practitioner],
    *,
    sender: str,
    subject: str | None,
    body: str | None,
    in_reply_to: str | None,
    receipts: Sequence[str],
    now: float,
) -> Manifest:
    """The manifest of a new message (its arguments checked)."""
    if not docs and body is None:
        raise ValueError("nothing to send: give documents or a body")
    bad = [r for r in receipts if r not in REQUESTABLE]
    if bad:
        raise ValueError(f"unknown receipt kind {bad[0]!r}: expected 'delivered' or 'read'")
    return Manifest(
        message_id=new_message_id(_ts(now)),
        created=_ts(now),
        sender_idnps=sender,
        recipients=tuple(p.idnps for p in practitioners),
        subject=subject,
        body=body,
        in_reply_to=in_reply_to,
        documents=tuple(d.describe(d.size) for d in docs),
        receipts=tuple(dict.fromkeys(receipts)),
    )


@dataclass(frozen=True)
class Plan:
    """Who gets what: the keys the envelope is sealed to, each recipient's endpoints in the
    order they are tried, and the recipients who get the MSSanté profile instead."""

    keys: tuple[PublicIdentity, ...]
    routes: tuple[tuple[str, tuple[Endpoint, ...]], ...]
    plain: tuple[Practitioner, ...] = ()


def make_plan(
    manifest: Manifest,
    practitioners: Sequence[Practitioner],
    *,
    trust: TrustPolicy,
    transports: Sequence[Transport],
    audit: AuditLog,
    on_trust: Callable[[TrustDecision], None],
    fallback: bool = False,
) -> Plan:
    """Every recipient's trusted keys and endpoints (a trust refusal is audited, then raised),
    and, with ``fallback``, the recipients who get the MSSanté profile instead: those whose
    entry has *no* medsecure key and an MSSanté mailbox a transport can reach. A recipient
    whose keys are merely untrusted is never downgraded to plain text."""
    keys: list[PublicIdentity] = []
    routes: list[tuple[str, tuple[Endpoint, ...]]] = []
    plain: list[Practitioner] = []
    try:
        for p in practitioners:
            if fallback and not p.keys and (p.mailboxes or any(e.address for e in p.endpoints)):
                endpoint = Endpoint(kind="mssante", address=mssante_address(p))
                only = p.model_copy(update={"endpoints": (endpoint,)})
                routes.append((p.idnps, tuple(route(only, transports))))
                plain.append(p)
                continue
            decisions = trust.decisions(p)
            for decision in decisions:
                on_trust(decision)
                if decision.key not in keys:
                    keys.append(decision.key)
            # an endpoint that came with a refused key is never used (Endpoint.keys)
            vouched = vouched_endpoints(p, (d.key.fingerprint for d in decisions))
            routes.append((p.idnps, tuple(route(vouched, transports))))
    except TrustError as exc:
        audit.append(
            "trust-refused",
            message_id=manifest.message_id,
            result=type(exc).__name__,
            answer=str(exc),
        )
        raise
    return Plan(tuple(keys), tuple(routes), tuple(plain))


def transport_for(endpoint: Endpoint, transports: Sequence[Transport]) -> Transport:
    """The first transport that accepts ``endpoint``."""
    for t in transports:
        if t.accepts(endpoint):
            return t
    raise DeliveryRejected(f"no configured transport for a {endpoint.kind} endpoint")


@dataclass(frozen=True)
class RetryPolicy:
    """How transient delivery failures are retried: exponential backoff with jitter."""

    max_attempts: int = 20
    base: float = 30.0
    cap: float = 6 * 3600.0

    def backoff(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (full jitter over the upper
        half, so clients that failed together do not retry together)."""
        ceiling = min(self.cap, self.base * 2 ** max(0, attempts - 1))
        return (rng or random).uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class Attempt:
    """What to do after one delivery attempt."""

    status: str
    """``sent``, ``failed``, or ``queued`` (retry later, or at once when :attr:`again`)."""
    index: int
    """The endpoint to use next."""
    next_attempt: float
    error: str | None
    again: bool = False
    """Try :attr:`index` now (a permanent refusal moved to the next endpoint)."""


def after_attempt(
    policy: RetryPolicy,
    *,
    error: BaseException | None,
    index: int,
    endpoints: int,
    attempts: int,
    now: float,
) -> Attempt:
    """The rule for one attempt's outcome (see the module docstring)."""
    if error is None:
        return Attempt(SENT, index, now, None)
    if isinstance(error, FileNotFoundError):
        return Attempt(FAILED, index, now, "the sealed envelope is missing from the outbox")
    if isinstance(error, DeliveryRejected):
        if index + 1 < endpoints:
            return Attempt(QUEUED, index + 1, now, str(error), again=True)
        return Attempt(FAILED, index, now, str(error))
    if isinstance(error, MedsecureError):
        text = str(error)
    elif isinstance(error, OSError):
        text = f"I/O error: {error.strerror or type(error).__name__}"
    else:  # a transport let a foreign exception escape: a bug there, retried as transient
        text = f"unexpected {type(error).__name__} in the transport"
    if attempts >= policy.max_attempts:
        return Attempt(FAILED, index, now, f"gave up after {attempts} attempts: {text}")
    return Attempt(QUEUED, index, now + policy.backoff(attempts), text)


def skip_note(endpoint: Endpoint, error: str | None) -> str:
    """Why ``endpoint`` was passed over, in one line: its kind, its URL if it has one (without
    credentials, query or fragment) and the refusal."""
    where = endpoint.kind
    if endpoint.url:
        parts = urllib.parse.urlsplit(endpoint.url)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        try:
            port = f":{parts.port}" if parts.port is not None else ""
        except ValueError:  # out of range (a directory's word): the note leaves it out
            port = ""
        where += f" {parts.scheme}://{host}{port}{parts.path.rstrip('/')}"
    return f"{where}: {error or 'refused'}"


def mssante_address(p: Practitioner) -> str:
    """The MSSanté address a message for ``p`` goes to: a mail endpoint's address, else the
    first personal mailbox the directory lists."""
    for e in p.endpoints:
        if e.kind in ("mail", "mssante") and e.address:
            return e.address
    boxes = sorted(p.mailboxes, key=lambda m: m.type != "PER")
    return boxes[0].address


def _ts(value: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, dt.UTC)


class Outbox:
    """The sending side of a client: the outbox rows and sealed envelopes, and the rules above
    applied to them. Status events are recorded and handed to ``on_status``."""

    def __init__(
        self,
        store: Store,
        audit: AuditLog,
        *,
        clock: Callable[[], float],
        policy: RetryPolicy,
        on_status: Callable[[StatusEvent], None] | None = None,
    ) -> None:
        self.store = store
        self.audit = audit
        self.clock = clock
        self.policy = policy
        self.on_status = on_status
        self._unnotified: list[StatusEvent] = []

    # -- accepting -------------------------------------------------------------------------
    def seal(
        self,
        manifest: Manifest,
        docs: Sequence[Document],
        *,
        identity: Identity,
        keys: Sequence[PublicIdentity],
        allow_classic: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[str, int, str]:
        """Seal the message into the outbox folder, durably; return (file name, size,
        envelope id). Nothing is promised yet: :meth:`accept` does that."""
        name = f"{manifest.message_id}.msec"
        path = self.store.outbox_dir / name
        with removing_on_failure(path):
            try:
                with (
                    MessageReader(manifest, docs, progress=progress) as src,
                    # 0644: the envelope is encrypted; drop folders may hard-link it for others
                    atomic_output(path, mode=0o644) as out,
                ):
                    seal_stream(
                        src,  # type: ignore[arg-type]
                        out,
                        sender=identity,
                        recipients=keys,
                        allow_classic=allow_classic,
                    )
                size = path.stat().st_size
                with path.open("rb") as fh:
                    eid = envelope_id(fh)
            except OSError as exc:
                raise StorageError(f"cannot write the outbox: {exc.strerror}") from exc
        return name, size, eid

    def write_mssante(
        self,
        manifest: Manifest,
        documents: Sequence[Any],
        recipients: Sequence[Practitioner],
        options: MssanteOptions,
        *,
        now: float,
    ) -> tuple[str, int, str]:
        """Write the MSSanté message (TLS only) for ``recipients`` into the outbox, 0600 and
        durably; return (file name, size, SHA-256 hex). Its Message-ID is the medsecure
        message id at the sender's domain, so MDNs and DSNs find their way back."""
        from .mail import build_mssante_message  # the mail formats load only when used

        addresses = [mssante_address(p) for p in recipients]
        stream = build_mssante_message(
            sender=options.address,
            recipients=addresses,
            body=manifest.body or options.body,
            date=dt.datetime.fromtimestamp(now, dt.UTC),
            message_id=f"{manifest.message_id}@{options.address.rpartition('@')[2]}",
            product_reference=options.product_reference,
            documents=documents,
            submission=options.submission,
            subject=manifest.subject,
            sender_name=options.sender_name,
            read_receipt="read" in manifest.receipts,
            patient_may_reply=options.patient_may_reply,
            patient_opposition=options.patient_opposition,
            identify_patient_in_subject=options.identify_patient_in_subject,
        )
        name = f"{manifest.message_id}.mssante.eml"
        path = self.store.outbox_dir / name
        digest = hashlib.sha256()
        try:
            with atomic_output(path, mode=0o600) as out:
                for chunk in stream.iter_chunks():
                    digest.update(chunk)
                    out.write(chunk)
            size = path.stat().st_size
        except OSError as exc:
            raise StorageError(f"cannot write the outbox: {exc.strerror}") from exc
        return name, size, digest.hexdigest()

    def accept(
        self,
        manifest: Manifest,
        sealed: tuple[str, int, str],
        plans: Sequence[tuple[str, Sequence[Endpoint]]],
        *,
        deadline: float | None = None,
        payloads: Mapping[str, str] | None = None,
    ) -> None:
        """Promise the sealed message: commit it and its delivery plan in one durable
        transaction (or remove the sealed files and raise). ``payloads`` names, per recipient,
        a file of the outbox delivered instead of the envelope (an MSSanté message)."""
        name, size, eid = sealed
        payloads = payloads or {}
        now = self.clock()
        files = [self.store.outbox_dir / file for file in {name, *payloads.values()}]
        with removing_on_failure(*files), self.store.transaction() as db:
            db.execute(
                "INSERT INTO outbox (message_id, created, envelope, size, envelope_id,"
                " receipts, deadline, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    manifest.message_id,
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
                "INSERT INTO deliveries (message_id, recipient, endpoints, endpoint_index,"
                " status, attempts, next_attempt, last_error, updated, payload)"
                " VALUES (?, ?, ?, 0, ?, 0, ?, NULL, ?, ?)",
                [
                    (
                        manifest.message_id,
                        idnps,
                        json.dumps([e.model_dump(mode="json", exclude_defaults=True) for e in eps]),
                        QUEUED,
                        now,
                        now,
                        payloads.get(idnps),
                    )
                    for idnps, eps in plans
                ],
            )

    def submit(
        self,
        manifest: Manifest,
        docs: Sequence[Document],
        plan: Plan,
        *,
        identity: Identity,
        transports: Sequence[Transport],
        plain: Sequence[Any] | None = None,
        mssante: MssanteOptions | None = None,
        allow_classic: bool = False,
        progress: Callable[[int], None] | None = None,
        deadline: float | None = None,
        patients: Sequence[str] = (),
    ) -> SendResult:
        """Seal (and write the MSSanté message for ``plan.plain``), accept, audit, and make one
        delivery attempt per recipient. ``plain`` is the documents as given (XDM wrappers)."""
        payloads: dict[str, str] = {}
        mss_file: tuple[str, int, str] | None = None
        if plan.plain:
            if plain is None or mssante is None:
                raise ValueError("the MSSanté profile needs MssanteOptions")
            mss_file = self.write_mssante(manifest, plain, plan.plain, mssante, now=self.clock())
            payloads = {p.idnps: mss_file[0] for p in plan.plain}
        try:
            sealed = mss_file
            if plan.keys:
                sealed = self.seal(
                    manifest,
                    docs,
                    identity=identity,
                    keys=plan.keys,
                    allow_classic=allow_classic,
                    progress=progress,
                )
            assert sealed is not None
        except BaseException:
            if mss_file is not None:
                (self.store.outbox_dir / mss_file[0]).unlink(missing_ok=True)
            raise
        self.accept(manifest, sealed, plan.routes, deadline=deadline, payloads=payloads)
        log.info("message %s accepted for %d recipient(s)", manifest.message_id, len(plan.routes))
        # From here on the message is accepted: a failure of the audit log or of a delivery's
        # bookkeeping must not make the caller believe the send failed (and send it again).
        try:
            with self.audit.batch():
                if plan.plain:
                    self.audit.append(
                        "send-mssante",
                        message_id=manifest.message_id,
                        counterparty=[p.idnps for p in plan.plain],
                        documents=len(docs),
                        result="tls-only",
                        patients=list(patients) or None,
                    )
                self.audit.append(
                    "send" if manifest.kind == "message" else "receipt-send",
                    message_id=manifest.message_id,
                    envelope_id=sealed[2],
                    counterparty=[idnps for idnps, _ in plan.routes if idnps not in payloads],
                    keys=[k.fingerprint for k in plan.keys],
                    documents=len(docs),
                    size=sealed[1],
                    receipts=list(manifest.receipts) or None,
                    patients=list(patients) or None,
                    of=(manifest.extra or {}).get("of"),
                    result=(manifest.extra or {}).get("status"),
                )
                for row in self.due(message_id=manifest.message_id):
                    self.deliver(row, transports)
            return SendResult(manifest.message_id, tuple(self.statuses(manifest.message_id)))
        except MedsecureError as exc:
            log.error(
                "message %s is accepted but its delivery attempt failed (%s); flush() retries it",
                manifest.message_id,
                exc,
            )
            return SendResult(
                manifest.message_id,
                tuple(RecipientStatus(idnps, QUEUED, error=str(exc)) for idnps, _ in plan.routes),
            )

    # -- delivering ------------------------------------------------------------------------
    def due(self, *, message_id: str | None = None, force: bool = False) -> list[sqlite3.Row]:
        """Queued deliveries whose time has come (all of them with ``force``), or those of one
        message."""
        if message_id is not None:
            return self.store.query(
                "SELECT * FROM deliveries WHERE message_id = ? AND status = ?",
                (message_id, QUEUED),
            )
        if force:
            return self.store.query(
                "SELECT * FROM deliveries WHERE status = ? ORDER BY message_id", (QUEUED,)
            )
        return self.store.query(
            "SELECT * FROM deliveries WHERE status = ? AND next_attempt <= ? ORDER BY message_id",
            (QUEUED, self.clock()),
        )

    def plan_of(self, row: sqlite3.Row) -> tuple[list[Endpoint], Path, int]:
        """A delivery row's endpoints, the file it delivers (the sealed envelope, or its own
        payload) and that file's size."""
        endpoints = [Endpoint.model_validate(e) for e in json.loads(row["endpoints"])]
        if row["payload"]:
            path = self.store.outbox_dir / row["payload"]
            try:
                return endpoints, path, path.stat().st_size
            except FileNotFoundError:
                return endpoints, path, 0  # after_attempt fails it: the payload is missing
        env = self.store.query(
            "SELECT envelope, size FROM outbox WHERE message_id = ?", (row["message_id"],)
        )
        return endpoints, self.store.outbox_dir / env[0]["envelope"], int(env[0]["size"])

    def deliver(self, row: sqlite3.Row, transports: Sequence[Transport]) -> None:
        """Attempt one queued delivery (the synchronous driver of :func:`after_attempt`)."""
        endpoints, path, size = self.plan_of(row)
        index, attempts = int(row["endpoint_index"]), int(row["attempts"])
        skipped: list[str] = []
        while True:
            attempts += 1
            error: BaseException | None = None
            try:
                transport = transport_for(endpoints[index], transports)
                with path.open("rb") as fh:
                    transport.deliver(endpoints[index], fh, message_id=row["message_id"], size=size)
            except Exception as exc:  # classified by after_attempt
                error = exc
            step = after_attempt(
                self.policy,
                error=error,
                index=index,
                endpoints=len(endpoints),
                attempts=attempts,
                now=self.clock(),
            )
            if step.again:
                log.info(
                    "message %s: %s endpoint refused, trying the next one",
                    row["message_id"],
                    endpoints[index].kind,
                )
                skipped.append(skip_note(endpoints[index], step.error))
                index = step.index
                continue
            self.record(row, step, attempts, endpoints[step.index].kind, skipped)
            return

    def record(
        self,
        row: sqlite3.Row,
        step: Attempt,
        attempts: int,
        kind: str,
        skipped: Sequence[str] = (),
    ) -> None:
        """Store an attempt's outcome (shared by every driver), with the reasons endpoints were
        ``skipped`` on the way (:func:`skip_note`), added to those already recorded."""
        message_id, recipient = row["message_id"], row["recipient"]
        notes = [*json.loads(row["skipped"] or "[]"), *skipped]
        with self.store.transaction(durable=False) as db:
            db.execute(
                "UPDATE deliveries SET status = ?, attempts = ?, endpoint_index = ?,"
                " next_attempt = ?, last_error = ?, updated = ?, skipped = ?"
                " WHERE message_id = ? AND recipient = ? AND status = ?",
                (
                    step.status,
                    attempts,
                    step.index,
                    step.next_attempt,
                    step.error,
                    self.clock(),
                    json.dumps(notes) if notes else None,
                    message_id,
                    recipient,
                    QUEUED,
                ),
            )
        self.audit.append(
            "deliver",
            message_id=message_id,
            counterparty=recipient,
            endpoint=kind,
            attempt=attempts,
            result=step.status,
            answer=step.error,
            skipped=list(skipped) or None,
        )
        if step.status == FAILED:
            log.warning("message %s to %s failed: %s", message_id, recipient, step.error)
        if step.status in (SENT, FAILED):
            self.event(message_id, recipient, step.status, detail=step.error)

    def poll(self, transports: Sequence[Transport], *, limit: int = 500) -> int:
        """Ask the transports what became of deliveries still ``sent`` (a relay knows whether
        an upload was collected or expired uncollected) and fold the answers in as reports.
        Returns how many answers changed a status. A transport that cannot answer is skipped."""
        rows = self.store.query(
            "SELECT * FROM deliveries d WHERE d.status = ? AND NOT EXISTS (SELECT 1 FROM receipts r"
            " WHERE r.message_id = d.message_id AND r.recipient = d.recipient"
            " AND r.status IN ('delivered', 'read', 'rejected')) ORDER BY d.updated LIMIT ?",
            (SENT, limit),
        )
        groups: dict[str, tuple[Endpoint, list[str]]] = {}
        for row in rows:
            endpoints = [Endpoint.model_validate(e) for e in json.loads(row["endpoints"])]
            endpoint = endpoints[min(row["endpoint_index"], len(endpoints) - 1)]
            key = endpoint.model_dump_json()
            groups.setdefault(key, (endpoint, []))[1].append(row["message_id"])
        changed = 0
        for endpoint, ids in groups.values():
            try:
                states = transport_for(endpoint, transports).poll(endpoint, ids)
            except (MedsecureError, ValueError) as exc:
                log.info("could not poll a %s endpoint: %s", endpoint.kind, exc)
                continue
            for message_id, state in states.items():
                status = {"expired": EXPIRED, "collected": "delivered"}.get(state)
                if status is None or message_id not in ids:
                    continue
                report = DeliveryReport(
                    message_id=message_id,
                    recipient=endpoint.address or endpoint.mailbox,
                    status=status,
                    source=endpoint.kind,
                )
                changed += self.apply_report(report, endpoint=endpoint)
        return changed

    # -- statuses --------------------------------------------------------------------------
    def statuses(self, message_id: str) -> list[RecipientStatus]:
        got: dict[str, list[sqlite3.Row]] = {}
        for r in self.store.query(
            "SELECT * FROM receipts WHERE message_id = ? ORDER BY at", (message_id,)
        ):
            got.setdefault(r["recipient"], []).append(r)
        out = []
        for r in self.store.query(
            "SELECT * FROM deliveries WHERE message_id = ? ORDER BY recipient", (message_id,)
        ):
            eps = json.loads(r["endpoints"])
            kind = eps[min(r["endpoint_index"], len(eps) - 1)]["kind"] if eps else None
            folded = receipts.fold(r["status"], got.get(r["recipient"], []))
            out.append(
                RecipientStatus(
                    r["recipient"],
                    folded.status,
                    kind,
                    r["attempts"],
                    r["last_error"],
                    receipts=folded.on_time,
                    late_receipts=folded.late,
                    reason=folded.reason,
                    skipped=tuple(json.loads(r["skipped"] or "[]")),
                )
            )
        return out

    def entries(self) -> list[OutboxEntry]:
        return [
            OutboxEntry(
                r["message_id"], _ts(r["created"]), r["size"], tuple(self.statuses(r["message_id"]))
            )
            for r in self.store.query(
                "SELECT * FROM outbox WHERE kind = 'message' ORDER BY created, message_id"
            )
        ]

    def expire(self) -> list[RecipientStatus]:
        """Mark ``expired`` every recipient whose deadline passed without a receipt."""
        now = self.clock()
        rows = self.store.query(
            "SELECT d.message_id, d.recipient FROM deliveries d"
            " JOIN outbox o ON o.message_id = d.message_id"
            " WHERE o.deadline IS NOT NULL AND o.deadline < ? AND d.status IN (?, ?)"
            " AND NOT EXISTS (SELECT 1 FROM receipts r WHERE r.message_id = d.message_id"
            " AND r.recipient = d.recipient AND r.status IN ('delivered', 'read', 'rejected'))",
            (now, QUEUED, SENT),
        )
        if not rows:
            return []
        with self.store.transaction() as db:
            db.executemany(
                "UPDATE deliveries SET status = ?, updated = ? WHERE message_id = ? AND recipient = ?",
                [(EXPIRED, now, r["message_id"], r["recipient"]) for r in rows],
            )
        with self.audit.batch():
            for r in rows:
                self.audit.append(
                    "expire",
                    message_id=r["message_id"],
                    counterparty=r["recipient"],
                    result=EXPIRED,
                )
        for r in rows:
            self.event(r["message_id"], r["recipient"], EXPIRED)
        return [
            s for mid in dict.fromkeys(r["message_id"] for r in rows) for s in self.statuses(mid)
        ]

    # -- receipts and reports --------------------------------------------------------------
    def apply_receipt(self, db: sqlite3.Connection, manifest: Manifest, signer: str) -> str | None:
        """Apply a verified receipt inside the inbox's transaction ``db``; return why it is
        ignored, or None. Its status event is handed to ``on_status`` by :meth:`notify`."""
        extra = manifest.extra or {}
        of = extra.get("of")
        sent = db.execute("SELECT * FROM outbox WHERE message_id = ?", (of,)).fetchone()
        delivery = (
            db.execute(
                "SELECT * FROM deliveries WHERE message_id = ? AND recipient = ?", (of, signer)
            ).fetchone()
            if sent is not None
            else None
        )
        problem = receipts.check(extra, sender_idnps=signer, sent=sent, delivery=delivery)
        if problem is not None:
            return problem
        assert delivery is not None
        status, reason = str(extra["status"]), extra.get("reason")
        late = receipts.is_late(delivery["status"])
        if late and (delivery["ended_by"] or "").startswith("report:"):
            # the delivery was ended by an unsigned report (a DSN or MDN anyone could forge, a
            # relay's "expired"): the recipient's signed receipt outranks it
            db.execute(
                "UPDATE deliveries SET status = ?, ended_by = NULL, updated = ?"
                " WHERE message_id = ? AND recipient = ?",
                (SENT, self.clock(), of, signer),
            )
            self.audit.append(
                "report-overruled",
                message_id=of,
                counterparty=signer,
                result=status,
                answer=delivery["ended_by"],
            )
            late = False
        fresh = (
            db.execute(
                "INSERT OR IGNORE INTO receipts (message_id, recipient, status, at, reason, late,"
                " source) VALUES (?, ?, ?, ?, ?, ?, 'signed')",
                (of, signer, status, manifest.created.timestamp(), reason, int(late)),
            ).rowcount
            > 0
        )
        if fresh:
            self.audit.append(
                "receipt",
                message_id=of,
                envelope_id=extra.get("envelope"),
                counterparty=signer,
                result=status,
                late=late or None,
                answer=reason,
            )
            if late:
                log.warning(
                    "late %s receipt for %s from %s (already %s)",
                    status,
                    of,
                    signer,
                    delivery["status"],
                )
            self.event(str(of), signer, status, late=late, detail=reason, db=db)
        return None

    def apply_report(self, report: DeliveryReport, *, endpoint: Endpoint | None = None) -> bool:
        """Fold a transport's delivery report (a mail DSN or MDN) into the outbox. Reports are
        unsigned hints: one about an unknown message or recipient is ignored; ``failed`` ends
        a delivery that is still ``queued`` or ``sent``; ``delivered``/``read`` are recorded
        like receipts (late when the delivery already ended). True when it changed anything."""
        rows = self.store.query(
            "SELECT * FROM deliveries WHERE message_id = ?", (report.message_id,)
        )
        if endpoint is not None:
            wanted = endpoint.model_dump(mode="json", exclude_defaults=True)
            rows = [r for r in rows if wanted in json.loads(r["endpoints"])]
        elif report.recipient is not None:
            rows = [
                r
                for r in rows
                if any(
                    e.get("address", "").lower() == report.recipient.lower()
                    for e in json.loads(r["endpoints"])
                )
                or r["recipient"] == report.recipient
            ]
        if len(rows) != 1:
            self.audit.append(
                "report-ignored",
                message_id=report.message_id,
                result=report.status,
                answer=f"{report.source} report for an unknown message or recipient",
            )
            return False
        row = rows[0]
        changed = False
        with self.store.transaction(durable=False) as db:
            # an unsigned failure never overrides a receipt already recorded (as expire() and
            # poll() do not): anyone who saw the message id can forge a DSN or an MDN
            answered = db.execute(
                "SELECT 1 FROM receipts WHERE message_id = ? AND recipient = ?"
                " AND status IN ('delivered', 'read', 'rejected')",
                (row["message_id"], row["recipient"]),
            ).fetchone()
            if (
                report.status in ("failed", EXPIRED)
                and row["status"] in (QUEUED, SENT)
                and answered is None
            ):
                final = FAILED if report.status == "failed" else EXPIRED
                default = "delivery failed" if final == FAILED else "not collected in time"
                changed = (
                    db.execute(
                        "UPDATE deliveries SET status = ?, last_error = ?, updated = ?,"
                        " ended_by = ? WHERE message_id = ? AND recipient = ? AND status = ?",
                        (
                            final,
                            f"{report.source}: {report.reason or default}",
                            self.clock(),
                            f"report:{report.source}",
                            row["message_id"],
                            row["recipient"],
                            row["status"],
                        ),
                    ).rowcount
                    == 1
                )
                if changed:
                    self.event(
                        row["message_id"], row["recipient"], final, detail=report.reason, db=db
                    )
            elif report.status in ("delivered", "read"):
                late = receipts.is_late(row["status"])
                changed = (
                    db.execute(
                        "INSERT OR IGNORE INTO receipts (message_id, recipient, status, at,"
                        " reason, late, source) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            row["message_id"],
                            row["recipient"],
                            report.status,
                            self.clock(),
                            None,
                            int(late),
                            report.source,
                        ),
                    ).rowcount
                    > 0
                )
                if changed:
                    self.event(row["message_id"], row["recipient"], report.status, late=late, db=db)
        self.audit.append(
            "report",
            message_id=row["message_id"],
            counterparty=row["recipient"],
            result=report.status,
            answer=report.source,
        )
        self.notify()
        return changed

    # -- events ----------------------------------------------------------------------------
    def event(
        self,
        message_id: str,
        recipient: str,
        status: str,
        *,
        late: bool = False,
        detail: str | None = None,
        db: sqlite3.Connection | None = None,
    ) -> None:
        """Record a status change. Inside the transaction ``db`` it is handed to ``on_status``
        by :meth:`notify`, once the caller committed; without one, in a transaction of its own,
        and handed on at once."""
        if db is None:
            with self.store.transaction(durable=False) as own:
                self.event(message_id, recipient, status, late=late, detail=detail, db=own)
            self.notify()
            return
        at = self.clock()
        cur = db.execute(
            "INSERT INTO events (message_id, recipient, status, at, late, detail)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (message_id, recipient, status, at, int(late), detail),
        )
        self._unnotified.append(
            StatusEvent(
                int(cur.lastrowid or 0), message_id, recipient, status, _ts(at), late, detail
            )
        )

    def notify(self) -> None:
        """Hand recorded events to ``on_status`` (after their transaction committed)."""
        events, self._unnotified = self._unnotified, []
        if self.on_status is None:
            return
        for event in events:
            try:
                self.on_status(event)
            except Exception:  # the application's callback must not break delivery
                log.exception("on_status callback failed")

    def events(self, *, after: int = 0) -> list[StatusEvent]:
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
