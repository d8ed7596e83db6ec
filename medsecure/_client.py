"""The client: the one place where identity, directory, trust, transports and storage meet.

    client = medsecure.Client(identity, directory, FileTransport(box), "~/.medsecure",
                              trust=AuthorityPolicy([authority]), me="rpps:10000005479")
    result = client.send(Document.from_path("cr.pdf"), to="rpps:10000000017", subject="CR")
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
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _receipts as receipts_rules
from ._closing import Closing
from ._document import Document, media_type_disagreement
from ._errors import (
    DirectoryUnavailable,
    MedsecureError,
    StorageError,
    TransportError,
    TransportUnavailable,
    UnknownMessage,
)
from ._identity import Identity
from ._inbox import Inbox
from ._outbox import (
    Outbox,
    RetryPolicy,
    compose,
    deadline_at,
    make_plan,
    plain_document,
    resolve,
)
from ._results import (
    OutboxEntry,
    QuarantinedEnvelope,
    ReceivedMessage,
    RecipientStatus,
    SendResult,
    StatusEvent,
)
from ._store import Store, default_home
from .audit import AuditLog
from .directory import Directory
from .envelope._message import Manifest
from .identifiers import parse
from .models import Practitioner
from .transports import Transport
from .trust import TrustDecision, TrustPolicy

if TYPE_CHECKING:
    from .mail import MssanteOptions

__all__ = ["Client", "default_home"]

log = logging.getLogger("medsecure.client")


class Client(Closing):
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
        self.unreachable: tuple[tuple[str, str], ...] = ()
        """The mailboxes the last :meth:`receive` could not read: (transport name, reason)."""
        self.mailbox_errors: tuple[tuple[str, TransportError], ...] = ()
        """The errors behind :attr:`unreachable`: (transport name, error). A
        :class:`TransportUnavailable` is worth retrying later (but not its subclass
        ``ClockSkew``: set the clock first); any other :class:`TransportError`, such as a
        :class:`DeliveryRejected` for a wrong relay URL, needs the configuration fixed."""
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

    # -- sending ---------------------------------------------------------------------------
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
        docs = [plain_document(d) for d in given]
        if self.me is None:
            raise ValueError("the client needs to know who it sends as: Client(..., me='rpps:…')")
        now = self._clock()
        deadline_ts = deadline_at(deadline, now)
        practitioners = resolve(self.directory, to)
        manifest = compose(
            docs,
            practitioners,
            sender=self.me,
            subject=subject,
            body=body,
            in_reply_to=in_reply_to,
            receipts=receipts,
            now=now,
        )
        patients = sorted(
            {self.audit.link(d.patient.ins.matricule) for d in docs if d.patient is not None}
        )
        fallback = self.mssante_fallback if mssante_fallback is None else mssante_fallback
        if fallback and self.mssante is None:
            raise ValueError("mssante_fallback needs Client(mssante=MssanteOptions(…))")
        with self._lock:
            result = self._submit(
                manifest,
                docs,
                practitioners,
                allow_classic=allow_classic,
                progress=progress,
                deadline=deadline_ts,
                patients=patients,
                plain=given if fallback else None,
            )
        for i, doc in enumerate(docs, 1):
            note = media_type_disagreement(doc)
            if note:  # by position: a file name may name the patient
                log.warning(
                    "document %d of %d: file name and content disagree on the media type (%s); "
                    "sent as is, as %s",
                    i,
                    len(docs),
                    note,
                    doc.media_type,
                )
        return result

    def _submit(
        self,
        manifest: Manifest,
        docs: Sequence[Document],
        practitioners: Sequence[Practitioner],
        *,
        plain: Sequence[Any] | None = None,
        **options: Any,
    ) -> SendResult:
        """Plan, seal into the outbox, commit, attempt delivery (messages and receipts)."""
        plan = make_plan(
            manifest,
            practitioners,
            trust=self.trust,
            transports=self.transports,
            audit=self.audit,
            on_trust=self._audit_trust,
            fallback=plain is not None,
        )
        return self._outbox.submit(
            manifest,
            docs,
            plan,
            identity=self.identity,
            transports=self.transports,
            plain=plain,
            mssante=self.mssante,
            **options,
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
        unreachable: list[tuple[str, TransportError]] = []
        for t in self.transports:
            try:
                got = self._inbox.take(t, budget, on_report=self._outbox.apply_report)
            except TransportError as exc:
                # one unreachable mailbox (an IMAP outage) does not keep the others unread
                log.warning("could not read the %s mailbox: %s", t.name, exc)
                unreachable.append((t.name, exc))
                continue
            except MedsecureError:
                raise  # this client's own storage failing
            except Exception as exc:
                # a transport's failure nobody foresaw (on an answer a hostile server crafted):
                # that mailbox is unreadable for now, the others are still read; only the
                # exception's type is said (its text could quote what the server sent)
                what = TransportUnavailable(f"its transport failed ({type(exc).__name__})")
                log.error("could not read the %s mailbox: %s", t.name, what)
                unreachable.append((t.name, what))
                continue
            if budget is not None:
                budget = max(0, budget - got)
                if budget == 0:
                    break
        self.unreachable = tuple((name, str(exc)) for name, exc in unreachable)
        self.mailbox_errors = tuple(unreachable)

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
