"""The client: the one place where identity, directory, trust, transports and storage meet.

    client = medsecure.Client(identity, directory, FileTransport(box), "~/.medsecure",
                              trust=AuthorityPolicy([authority]), me="rpps:10000005479")
    result = client.send(Document.from_path("cr.pdf"), to="rpps:10000000019", subject="CR")
    for message in client.receive():
        ...
        message.ack()

``Client`` is a thin driver: the outbox (:mod:`._outbox`), the inbox (:mod:`._inbox`) and the
receipts (:mod:`._receipts`) hold the rules and their tables; the client resolves recipients,
checks keys with the trust policy, and hands work to them.

Sending: recipients are resolved through the directory (batched), every key is checked by the
trust policy, the documents are sealed once for all recipients' keys into the durable outbox,
and only then is delivery attempted (:mod:`._outbox` explains retries and transport selection).

Receiving: envelopes are stored durably before the transport copy is acknowledged, opened,
and their sender verified through the directory and the trust policy; one envelope that fails
in any way is quarantined (:meth:`Client.quarantine`) and never stops the others
(:mod:`._inbox`). Messages stay in ``receive()``'s answer until ``message.ack()``
(at-least-once; a message is the same message when its verified sender and id are).
Receipts a message asked for are queued durably in the same transaction that records it, and
sent through the outbox after the envelopes were verified.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from . import _receipts as receipts_rules
from ._document import Document
from ._errors import (
    DirectoryUnavailable,
    MedsecureError,
    StorageError,
    TransportUnavailable,
    TrustError,
    UnknownMessage,
)
from ._identity import Identity, PublicIdentity
from ._inbox import Inbox
from ._outbox import QUEUED, Outbox, RetryPolicy, mssante_address, route
from ._results import (
    OutboxEntry,
    QuarantinedEnvelope,
    ReceivedMessage,
    RecipientStatus,
    SendResult,
    StatusEvent,
)
from ._store import Store
from .audit import AuditLog
from .directory import Directory
from .directory._base import normalize_ref
from .envelope._message import Manifest, new_message_id
from .identifiers import parse
from .models import Endpoint, Practitioner
from .transports import Transport
from .trust import TrustDecision, TrustPolicy

if TYPE_CHECKING:
    from .mail import MssanteOptions

__all__ = ["Client", "default_home"]

log = logging.getLogger("medsecure.client")


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


def _ts(value: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, dt.UTC)


def _plain_document(item: Any) -> Document:
    """The ``Document`` of what was given to ``send`` (a Document, or an XDM wrapper)."""
    if isinstance(item, Document):
        return item
    inner = getattr(item, "document", None)
    if isinstance(inner, Document) and type(item).__name__ == "XdmDocument":
        return inner
    raise TypeError("documents must be Document objects (or medsecure.mail.XdmDocument)")


def _mssante_endpoint(p: Practitioner) -> Endpoint | None:
    """Where an MSSanté message for ``p`` goes: a mail endpoint's address, else the first
    personal MSSanté mailbox the directory lists."""
    if not p.mailboxes and not any(e.address for e in p.endpoints):
        return None
    return Endpoint(kind="mssante", address=mssante_address(p))


class Client:
    """Send and receive health documents for one identity (see the module docstring).

    ``trust`` decides which keys belong to which practitioner; it is required (or comes from
    the home's configuration with :func:`medsecure.client_from_home`). ``me`` is the sender's
    own reference (``rpps:…``), which recipients look up to verify it. ``transport`` is one
    transport or a list; for each recipient the endpoints some transport accepts are tried by
    priority, then in the order of this list.
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
        max_verify_attempts: int = 10,
        mssante: MssanteOptions | None = None,
        mssante_fallback: bool = False,
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
                "no trust policy: pass trust=AuthorityPolicy([...]) (or an explicitly Unsafe "
                "policy), or configure one in the home (medsecure.client_from_home)"
            )
        if not isinstance(trust, TrustPolicy):
            raise TypeError("trust must be a TrustPolicy")
        if max_attempts < 1 or max_verify_attempts < 1:
            raise ValueError("max_attempts and max_verify_attempts must be at least 1")
        self.identity = identity
        self.directory = directory
        self.transports = transports
        self.trust = trust
        self.me = parse(me).idnps if me is not None else None
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.send_read_receipts = send_read_receipts
        if mssante_fallback and mssante is None:
            raise ValueError("mssante_fallback needs mssante=MssanteOptions(address=…, …)")
        self.mssante = mssante
        self.mssante_fallback = mssante_fallback
        self._clock = clock or Store.now
        self._lock = threading.RLock()
        self._closed = False
        self.store = Store(self.home, busy_timeout=busy_timeout)
        self.audit = AuditLog(
            self.home / "audit",
            identity=identity,
            actor_id=self.me,
            checkpoint_every=audit_checkpoint_every,
            retention_days=audit_retention_days,
        )
        self._outbox = Outbox(
            self.store,
            self.audit,
            clock=self._clock,
            policy=RetryPolicy(max_attempts, retry_base, retry_cap),
            on_status=on_status,
        )
        self._inbox = Inbox(
            store=self.store,
            identity=identity,
            directory=directory,
            trust=trust,
            audit=self.audit,
            clock=self._clock,
            on_trust=self._audit_trust,
            apply_receipt=self._outbox.apply_receipt,
            max_attempts=max_verify_attempts,
        )
        self.store.recover()

    @property
    def on_status(self) -> Callable[[StatusEvent], None] | None:
        """Called with every :class:`StatusEvent` once recorded."""
        return self._outbox.on_status

    @on_status.setter
    def on_status(self, callback: Callable[[StatusEvent], None] | None) -> None:
        self._outbox.on_status = callback

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Checkpoint the audit log (and apply its retention), then close the store. A second
        call does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self.audit.purge()  # retention; a crash at any point leaves a verifiable log
        except MedsecureError as exc:
            log.warning("audit retention not applied: %s", exc)
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

    # -- sending ---------------------------------------------------------------------------
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
        mssante_fallback: bool | None = None,
    ) -> SendResult:
        """Seal ``documents`` for every recipient in ``to`` and deliver them.

        Returns once the envelope and its delivery plan are durably stored and one delivery
        attempt per recipient was made. Raises before storing anything if a recipient is
        unknown, has no trusted key or no reachable endpoint. ``progress`` is called with the
        number of bytes sealed since its previous call (for progress bars). With ``receipts``,
        each recipient signs and returns ``delivered`` / ``read`` receipts; with ``deadline``, a
        recipient whose ``delivered`` receipt has not come by then is marked ``expired``.

        With ``mssante_fallback`` (default: the client's), a recipient with an MSSanté mailbox
        and no medsecure key gets a standard MSSanté message instead (TLS only; audited);
        documents may then be ``medsecure.mail.XdmDocument`` wrappers carrying the XDS codes
        of CDA documents.
        """
        given = [documents] if not isinstance(documents, (list, tuple)) else list(documents)
        docs = [_plain_document(d) for d in given]
        if not docs and body is None:
            raise ValueError("nothing to send: give documents or a body")
        if self.me is None:
            raise ValueError("the client needs to know who it sends as: Client(..., me='rpps:…')")
        bad = [r for r in receipts if r not in receipts_rules.REQUESTABLE]
        if bad:
            raise ValueError(f"unknown receipt kind {bad[0]!r}: expected 'delivered' or 'read'")
        deadline_ts = self._deadline(deadline)
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
        fallback = self.mssante_fallback if mssante_fallback is None else mssante_fallback
        if fallback and self.mssante is None:
            raise ValueError("mssante_fallback needs Client(mssante=MssanteOptions(…))")
        with self._lock:
            return self._submit(
                manifest,
                docs,
                practitioners,
                allow_classic=allow_classic,
                progress=progress,
                deadline=deadline_ts,
                patients=patients,
                plain=given if fallback else None,
            )

    def _deadline(self, deadline: dt.timedelta | dt.datetime | None) -> float | None:
        if isinstance(deadline, dt.timedelta):
            return self._clock() + deadline.total_seconds()
        if isinstance(deadline, dt.datetime):
            if deadline.tzinfo is None:
                raise ValueError("deadline must be timezone-aware")
            return deadline.timestamp()
        if deadline is None:
            return None
        raise TypeError("deadline is a timedelta or a datetime")

    def _plan(
        self,
        manifest: Manifest,
        practitioners: Sequence[Practitioner],
        *,
        fallback: bool = False,
    ) -> tuple[list[PublicIdentity], list[tuple[str, list[Endpoint]]], list[Practitioner]]:
        """Every recipient's trusted keys and endpoints (trust refusals are audited), and, with
        ``fallback``, the recipients who get the MSSanté profile instead: those whose entry has
        no medsecure key at all and an MSSanté mailbox a transport can reach. A recipient whose
        keys are merely untrusted is never downgraded to plain text."""
        keys: list[PublicIdentity] = []
        plans: list[tuple[str, list[Endpoint]]] = []
        plain: list[Practitioner] = []
        try:
            for p in practitioners:
                if fallback and not p.keys:
                    endpoint = _mssante_endpoint(p)
                    if endpoint is not None:
                        plans.append(
                            (
                                p.idnps,
                                route(
                                    p.model_copy(update={"endpoints": (endpoint,)}), self.transports
                                ),
                            )
                        )
                        plain.append(p)
                        continue
                for decision in self.trust.decisions(p):
                    self._audit_trust(decision)
                    if decision.key not in keys:
                        keys.append(decision.key)
                plans.append((p.idnps, route(p, self.transports)))
        except TrustError as exc:
            self.audit.append(
                "trust-refused",
                message_id=manifest.message_id,
                result=type(exc).__name__,
                answer=str(exc),
            )
            raise
        return keys, plans, plain

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
        plain: Sequence[Any] | None = None,
    ) -> SendResult:
        """Seal into the outbox, commit the delivery plan, attempt delivery (shared by messages
        and receipts). ``plain`` (the documents as given, XDM wrappers included) allows the
        MSSanté fallback."""
        keys, plans, fallback = self._plan(manifest, practitioners, fallback=plain is not None)
        payloads: dict[str, str] = {}
        mss_file: tuple[str, int, str] | None = None
        if fallback:
            assert plain is not None and self.mssante is not None
            mss_file = self._outbox.write_mssante(
                manifest, plain, fallback, self.mssante, now=self._clock()
            )
            payloads = {p.idnps: mss_file[0] for p in fallback}
        try:
            if keys:
                sealed = self._outbox.seal(
                    manifest,
                    docs,
                    identity=self.identity,
                    keys=keys,
                    allow_classic=allow_classic,
                    progress=progress,
                )
            else:
                assert mss_file is not None
                sealed = mss_file
        except BaseException:
            if mss_file is not None:
                (self.store.outbox_dir / mss_file[0]).unlink(missing_ok=True)
            raise
        self._outbox.accept(manifest, sealed, plans, deadline=deadline, payloads=payloads)
        log.info("message %s accepted for %d recipient(s)", manifest.message_id, len(plans))
        # From here on the message is accepted: a failure of the audit log or of a delivery's
        # bookkeeping must not make the caller believe the send failed (and send it again).
        try:
            with self.audit.batch():
                if fallback:
                    self.audit.append(
                        "send-mssante",
                        message_id=manifest.message_id,
                        counterparty=[p.idnps for p in fallback],
                        documents=len(docs),
                        result="tls-only",
                        patients=list(patients) or None,
                    )
                self.audit.append(
                    "send" if manifest.kind == "message" else "receipt-send",
                    message_id=manifest.message_id,
                    envelope_id=sealed[2],
                    counterparty=[idnps for idnps, _ in plans if idnps not in payloads],
                    keys=[k.fingerprint for k in keys],
                    documents=len(docs),
                    size=sealed[1],
                    receipts=list(manifest.receipts) or None,
                    patients=list(patients) or None,
                    of=(manifest.extra or {}).get("of"),
                    result=(manifest.extra or {}).get("status"),
                )
                for row in self._outbox.due(message_id=manifest.message_id):
                    self._outbox.deliver(row, self.transports)
            return SendResult(
                manifest.message_id, tuple(self._outbox.statuses(manifest.message_id))
            )
        except MedsecureError as exc:
            log.error(
                "message %s is accepted but its delivery attempt failed (%s); flush() retries it",
                manifest.message_id,
                exc,
            )
            return SendResult(
                manifest.message_id,
                tuple(RecipientStatus(idnps, QUEUED, error=str(exc)) for idnps, _ in plans),
            )

    def _audit_trust(self, decision: TrustDecision) -> None:
        if decision.newly_pinned or decision.reason in ("rotation", "new-authority-statement"):
            self.audit.append(
                "trust",
                counterparty=decision.idnps,
                key=decision.key.fingerprint,
                result=decision.reason,
                authority=decision.authority,
            )

    def flush(
        self, *, force: bool = False, progress: Callable[[int, int], None] | None = None
    ) -> list[RecipientStatus]:
        """Attempt every queued delivery that is due (all of them with ``force=True``), after
        marking expired the recipients whose deadline passed. ``progress(done, total)`` is called
        after each attempt (for progress bars). Deliveries already handed over are polled where
        the transport can tell (a relay says when an envelope expired uncollected)."""
        with self._lock:
            self._outbox.expire()
            self._outbox.poll(self.transports)
            rows = self._outbox.due(force=force)
            with self.audit.batch():
                for done, row in enumerate(rows, 1):
                    self._outbox.deliver(row, self.transports)
                    if progress is not None:
                        progress(done, len(rows))
            ids = list(dict.fromkeys(r["message_id"] for r in rows))
            return [s for mid in ids for s in self._outbox.statuses(mid)]

    def outbox(self) -> list[OutboxEntry]:
        """Every message of the outbox, oldest first, with its recipients' statuses."""
        return self._outbox.entries()

    def status(self, message_id: str) -> list[RecipientStatus]:
        """The recipients' statuses of one sent message (receipts and deadlines included).
        Raises :class:`~medsecure.UnknownMessage` for an id the outbox does not hold."""
        self._outbox.expire()
        statuses = self._outbox.statuses(message_id)
        if not statuses:
            raise UnknownMessage("no message with this id in the outbox")
        return statuses

    def events(self, *, after: int = 0) -> list[StatusEvent]:
        """Recorded status changes with an id above ``after`` (poll with the last id seen)."""
        return self._outbox.events(after=after)

    def expire(self) -> list[RecipientStatus]:
        """Mark ``expired`` every recipient whose deadline passed without a delivered receipt."""
        return self._outbox.expire()

    # -- receiving -------------------------------------------------------------------------
    def receive(self, *, limit: int | None = None) -> list[ReceivedMessage]:
        """Fetch, store, open and verify incoming envelopes (at most ``limit`` new ones per
        call); return every verified message not yet acknowledged, oldest first.

        One envelope that fails (forged, malformed, from an unknown or untrusted sender, or
        failing in a way nobody foresaw) is quarantined and never stops the others; only a
        failure of this client's own storage raises."""
        if limit is not None and limit < 1:
            raise ValueError("limit must be at least 1")
        with self._lock:
            self._take(limit)
            done = 0
            with self.audit.batch():
                for row in self._inbox.pending():
                    if limit is not None and done >= limit:
                        break
                    if not self._inbox.claim(row):
                        continue
                    try:
                        self._inbox.verify(row)
                    except BaseException:
                        self._inbox.unclaim(row["id"])
                        raise
                    finally:
                        self._outbox.notify()
                    done += 1
            self._send_due_receipts()
            messages = []
            for row in self._inbox.received():
                try:
                    messages.append(self._message(row))
                except FileNotFoundError:
                    continue  # acknowledged meanwhile by another client sharing this home
            return messages

    def _take(self, limit: int | None) -> None:
        budget = limit
        for t in self.transports:
            got = self._inbox.take(t, budget, on_report=self._outbox.apply_report)
            if budget is not None:
                budget = max(0, budget - got)
                if budget == 0:
                    break

    def _send_due_receipts(self) -> None:
        """Seal and deliver the receipts the inbox queued (never raises: a receipt that cannot
        be sent now stays due and is tried at the next receive)."""
        if self.me is None:
            if self._inbox.receipts_due():
                log.warning("cannot send receipts: the client does not know who it is (me=)")
            return
        for request, to, row_id in self._inbox.receipts_due():
            manifest = receipts_rules.build(
                request, sender_idnps=self.me, to_idnps=to.idnps, now=self._clock()
            )
            try:
                self._submit(manifest, [], [to])
            except MedsecureError as exc:
                log.warning(
                    "could not send the %s receipt for %s: %s", request.status, request.of, exc
                )
                self.audit.append(
                    "receipt-failed",
                    message_id=request.of,
                    counterparty=to.idnps,
                    result=request.status,
                    answer=str(exc),
                )
                if not isinstance(exc, (DirectoryUnavailable, StorageError, TransportUnavailable)):
                    self._inbox.receipt_queued(row_id, request.status, "failed")
                continue
            self._inbox.receipt_queued(row_id, request.status)

    def _message(self, row: Any) -> ReceivedMessage:
        row_id = int(row["id"])
        return self._inbox.message(
            row,
            ack=lambda: self._ack(row_id),
            mark_read=lambda: self._mark_read(row_id),
            reject=lambda reason: self._reject(row_id, reason),
        )

    def _ack(self, row_id: int) -> None:
        with self._lock:
            self._inbox.ack(row_id)

    def _mark_read(self, row_id: int) -> None:
        with self._lock:
            self._inbox.mark_read(row_id, send_receipt=self.send_read_receipts)
            self._send_due_receipts()

    def _reject(self, row_id: int, reason: str) -> None:
        with self._lock:
            self._inbox.reject(row_id, reason)
            self._send_due_receipts()

    def quarantine(self) -> list[QuarantinedEnvelope]:
        """Incoming envelopes that failed verification, with the reason."""
        return self._inbox.quarantined()

    def release(self, quarantine_id: int) -> bool:
        """Put a quarantined envelope back to be verified at the next :meth:`receive` (once the
        cause is fixed: the sender added to the directory, its key trusted…). True if it was
        in quarantine."""
        with self._lock:
            return self._inbox.release(quarantine_id)
