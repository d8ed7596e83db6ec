"""The inbox: what arrives is taken in durably, verified, and kept until the application acks.

Theory of operation
-------------------
Anyone who can put bytes where a transport collects can put *anything* there, so the inbox
treats every envelope as hostile until its signature, its sender and the sender's key have been
checked, and it never lets one envelope stop the others:

* **Take in.** Each waiting item is copied (or hard-linked) into ``inbox/`` and its row
  committed *before* the transport copy is removed. Items that are not envelopes (a symbolic
  link, a FIFO, a foreign file) are reported once — a warning and an audit record — and left
  alone. An envelope whose id (hash of its header) matches an already *verified* one is a
  duplicate: dropped, and audited.
* **Verify.** A row is claimed (compare-and-swap, so clients sharing a home never open one
  envelope twice), opened, its manifest validated completely, its sender looked up and its key
  checked by the trust policy. Any failure — including an exception nobody foresaw — moves that
  row to ``quarantined`` with its reason; a transient one (directory outage, full disk) puts it
  back to ``fetched`` to be retried later, and quarantines it after ``max_attempts``.
* **Deduplicate.** A message is the same message when the *verified sender* and the message id
  are the same; the check and the state change happen in one write transaction. A different
  sender reusing an id is a different message.

The states of a row and the only moves between them (:data:`TRANSITIONS`)::

    fetched ──claim──► verifying ──accept──────► received ──ack──► acked
       ▲                   │ ├──duplicate────► duplicate
       └─────retry─────────┤ ├──receipt──────► receipt
       ▲                   │ ├──ignore───────► receipt-ignored
       │                   └─┴──quarantine───► quarantined ──release──┐
       └──────────────────────────────────────────────────────────────┘

Every ``UPDATE`` of a row's status goes through :meth:`Inbox._move`, which checks the move
against the table and applies it as a compare-and-swap on the expected state.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import secrets
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from . import _receipts as receipts
from ._errors import (
    DirectoryError,
    DirectoryUnavailable,
    EnvelopeError,
    MedsecureError,
    PractitionerNotFound,
    StorageError,
    TransportUnavailable,
    TrustError,
)
from ._fs import fsync_dir, removing_on_failure
from ._identity import Identity, PublicIdentity
from ._results import QuarantinedEnvelope, ReceivedDocument, ReceivedMessage
from ._store import Store
from .audit import AuditLog
from .directory import Directory
from .envelope._message import Manifest
from .envelope._message import read_manifest as read_manifest_structure
from .envelope._seal import envelope_id, unseal_stream
from .identifiers import parse as parse_identifier
from .models import Code, Patient, Practitioner
from .transports import DeliveryReport, Incoming, Transport
from .transports._base import UnsupportedItem
from .trust import TrustDecision, TrustPolicy

__all__ = [
    "TRANSITIONS",
    "Inbox",
    "InvalidTransition",
    "check_manifest_models",
    "next_state",
    "read_manifest",
]

log = logging.getLogger("medsecure.inbox")

FETCHED = "fetched"
VERIFYING = "verifying"
RECEIVED = "received"
ACKED = "acked"
QUARANTINED = "quarantined"
DUPLICATE = "duplicate"
RECEIPT = "receipt"
RECEIPT_IGNORED = "receipt-ignored"

#: state -> {event: next state}. A row moves only along these edges.
TRANSITIONS: Mapping[str, Mapping[str, str]] = {
    FETCHED: {"claim": VERIFYING, "quarantine": QUARANTINED},
    VERIFYING: {
        "claim": VERIFYING,  # taking over the claim of a process that died
        "retry": FETCHED,
        "accept": RECEIVED,
        "duplicate": DUPLICATE,
        "receipt": RECEIPT,
        "ignore": RECEIPT_IGNORED,
        "quarantine": QUARANTINED,
    },
    RECEIVED: {"ack": ACKED},
    QUARANTINED: {"release": FETCHED},
    ACKED: {},
    DUPLICATE: {},
    RECEIPT: {},
    RECEIPT_IGNORED: {},
}
#: States whose row holds a verified sender and message id (what duplicates are checked
#: against).
VERIFIED = (RECEIVED, ACKED, RECEIPT, RECEIPT_IGNORED)
#: How long a claim may last before another process takes it over.
CLAIM_TIMEOUT = 600.0


class InvalidTransition(RuntimeError):
    """A move the state table does not allow (a bug in medsecure, never an input's fault)."""


def next_state(state: str, event: str) -> str:
    """The state a row in ``state`` moves to on ``event``."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise InvalidTransition(f"inbox: no move {event!r} from {state!r}") from None


def retry_delay(attempts: int) -> float:
    """Seconds before a transiently failed verification is tried again (doubling, capped)."""
    return float(min(3600, 30 * 2 ** max(0, attempts - 1)))


class _Refused(Exception):
    """Internal: this envelope goes to quarantine with ``reason``."""

    def __init__(self, reason: str, manifest: Manifest | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.manifest = manifest


class _Transient(Exception):
    """Internal: this envelope cannot be verified now; try again later."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Inbox:
    """The receiving side of a client: its rows in the store and the envelope files."""

    store: Store
    identity: Identity
    directory: Directory
    trust: TrustPolicy
    audit: AuditLog
    clock: Callable[[], float]
    on_trust: Callable[[TrustDecision], None]
    apply_receipt: Callable[[sqlite3.Connection, Manifest, str], str | None]
    """Called inside the inbox's transaction with a verified receipt and its signer's IDNPS;
    returns why it is ignored, or None once applied (the outbox's rule)."""
    max_attempts: int = 10
    _reported: set[tuple[str, str]] = field(default_factory=set)

    # -- moving rows ---------------------------------------------------------------------
    def _move(
        self, db: sqlite3.Connection, row_id: int, state: str, event: str, **columns: Any
    ) -> bool:
        """Apply ``event`` to row ``row_id`` if it is still in ``state`` (compare-and-swap);
        set ``columns`` with it. True when the row moved."""
        target = next_state(state, event)
        sets = ", ".join(f"{name} = ?" for name in columns)
        sql = (
            f"UPDATE inbox SET status = ?{', ' + sets if sets else ''} WHERE id = ? AND status = ?"  # noqa: S608 - column names are ours
        )
        cur = db.execute(sql, (target, *columns.values(), row_id, state))
        return cur.rowcount == 1

    # -- taking in -------------------------------------------------------------------------
    def take(
        self,
        transport: Transport,
        limit: int | None,
        *,
        on_report: Callable[[DeliveryReport], object] | None = None,
    ) -> int:
        """Store what ``transport`` holds (at most ``limit`` envelopes); return how many.
        Delivery reports go to ``on_report`` (the outbox), then are acknowledged."""
        stored = 0
        for item in transport.list():
            if limit is not None and stored >= limit:
                break
            if item.kind == "unsupported":
                self._report_unsupported(transport, item, item.problem or "not an envelope")
                continue
            if item.kind == "report":
                if item.report is not None and on_report is not None:
                    on_report(item.report)
                    transport.acknowledge(item)
                continue
            try:
                if self._take_one(transport, item):
                    stored += 1
            except UnsupportedItem as exc:
                self._report_unsupported(transport, item, str(exc))
            except TransportUnavailable:
                continue  # taken meanwhile by another reader, or the mailbox is unreachable
            except StorageError as exc:
                # our disk is full or failing: this item stays in the mailbox (nothing lost)
                # and the others are still tried (a smaller one may fit)
                log.error("an incoming envelope stays in the mailbox for now: %s", exc)
            except Exception as exc:  # a transport's failure nobody foresaw
                # (one's own transport raising OSError or anything else): the item stays where
                # it is, the others are still taken; only the exception's type is logged (its
                # text could quote a file name)
                log.error(
                    "an incoming envelope stays in the %s mailbox for now: its transport failed"
                    " (%s)",
                    transport.name,
                    type(exc).__name__,
                )
        return stored

    def _report_unsupported(self, transport: Transport, item: Incoming, problem: str) -> None:
        key = (transport.name, item.handle)
        if key in self._reported:
            return
        self._reported.add(key)
        with self.store.transaction(durable=False) as db:
            fresh = (
                db.execute(
                    "INSERT OR IGNORE INTO ignored (source, handle, reason, at) VALUES (?, ?, ?, ?)",
                    (transport.name, item.handle, problem, self.clock()),
                ).rowcount
                == 1
            )
        if fresh:
            # the handle is a file name in the mailbox chosen by whoever put it there: it is
            # not repeated (it could name a patient); the audit record keeps its hash
            log.warning(
                "left alone in the mailbox (%s): an item that is %s", transport.name, problem
            )
            self.audit.append(
                "ignored",
                item=self.audit.link(f"{transport.name}\x00{item.handle}"),
                result="ignored",
                answer=problem,
            )

    def _take_one(self, transport: Transport, item: Incoming) -> bool:
        tmp = self.store.inbox_dir / f".medsecure-in-{os.getpid()}-{secrets.token_hex(6)}"
        with removing_on_failure(tmp):  # also what a transport's failed take() left
            transport.take(item, tmp)
        with removing_on_failure(tmp):
            try:
                with tmp.open("rb") as fh:
                    eid = envelope_id(fh)
            except EnvelopeError:
                eid = "unparsable-" + secrets.token_hex(16)  # quarantined when verified
            except OSError as exc:
                raise StorageError(f"cannot read an incoming envelope: {exc.strerror}") from exc
            known = self.store.query(
                "SELECT id FROM inbox WHERE envelope_id = ? AND status IN (?, ?, ?, ?, ?)",
                (eid, *VERIFIED, DUPLICATE),
            )
            if known:
                tmp.unlink(missing_ok=True)
                transport.acknowledge(item)  # already received by an earlier run: idempotent
                self.audit.append(
                    "duplicate", envelope_id=eid, inbox=known[0]["id"], result="dropped"
                )
                return False
            with self.store.transaction() as db:
                row_id = db.execute(
                    "INSERT INTO inbox (envelope_id, status, received_at) VALUES (?, ?, ?)",
                    (eid, FETCHED, self.clock()),
                ).lastrowid
                name = f"{row_id}.msec"
                os.replace(tmp, self.store.inbox_dir / name)
                fsync_dir(self.store.inbox_dir)
                db.execute("UPDATE inbox SET envelope = ? WHERE id = ?", (name, row_id))
        transport.acknowledge(item)
        return True

    # -- verifying -------------------------------------------------------------------------
    def pending(self) -> list[sqlite3.Row]:
        """Rows waiting for verification whose retry time has come, oldest first."""
        return self.store.query(
            "SELECT * FROM inbox WHERE status IN (?, ?) AND (claimed_at IS NULL OR status = ?"
            " OR claimed_at <= ?) ORDER BY id",
            (FETCHED, VERIFYING, VERIFYING, self.clock()),
        )

    def claim(self, row: sqlite3.Row) -> bool:
        """Take a row for verification (compare-and-swap on the claim). A claim left by a
        process that died is taken over; so is one older than :data:`CLAIM_TIMEOUT`."""
        if row["status"] == VERIFYING:
            alive = True
            if os.name != "nt":  # on Windows os.kill would terminate the process: rely on age
                try:
                    os.kill(int(row["claimer"]), 0)
                except (ProcessLookupError, TypeError, ValueError, OverflowError):
                    alive = False
                except PermissionError:
                    pass
            stale = (row["claimed_at"] or 0) < self.clock() - CLAIM_TIMEOUT
            if alive and not stale:
                return False
        with self.store.transaction(durable=False) as db:
            cur = db.execute(
                "UPDATE inbox SET status = ?, claimer = ?, claimed_at = ? WHERE id = ? AND status = ?"
                " AND claimer IS ? AND claimed_at IS ?",
                (
                    next_state(row["status"], "claim"),
                    os.getpid(),
                    self.clock(),
                    row["id"],
                    row["status"],
                    row["claimer"],
                    row["claimed_at"],
                ),
            )
            return cur.rowcount == 1

    def unclaim(self, row_id: int) -> None:
        """Give a claimed row back untouched (the verification was interrupted)."""
        with contextlib.suppress(MedsecureError), self.store.transaction(durable=False) as db:
            db.execute(
                "UPDATE inbox SET status = ?, claimer = NULL, claimed_at = NULL"
                " WHERE id = ? AND status = ? AND claimer = ?",
                (FETCHED, row_id, VERIFYING, os.getpid()),
            )

    def verify(self, row: sqlite3.Row) -> None:
        """Open, check and record one claimed row. Never raises because of the envelope: it
        ends received, duplicate, a receipt, quarantined, or back in the queue for a later
        attempt. Only a failure of the store itself (its database) propagates."""
        plain = self.store.inbox_dir / f"{row['id']}.msg"
        try:
            self._verify(row, plain)
        except _Refused as refused:
            plain.unlink(missing_ok=True)
            self._quarantine(row, refused.reason, refused.manifest)
        except _Transient as transient:
            plain.unlink(missing_ok=True)
            self._retry(row, transient.reason)
        except StorageError as exc:
            # our disk (full, failing): not the envelope's fault, but retried a bounded number
            # of times so that one envelope too large for the disk cannot stall the inbox
            plain.unlink(missing_ok=True)
            log.error("incoming envelope %d will be verified later: %s", row["id"], exc)
            self._retry(row, f"could not be stored ({exc})")
        except Exception as exc:  # an input must never stop the inbox
            plain.unlink(missing_ok=True)
            log.error(
                "incoming envelope %d: unexpected %s while verifying it (quarantined)",
                row["id"],
                type(exc).__name__,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            self._quarantine(row, f"could not be verified (unexpected {type(exc).__name__})")

    def _verify(self, row: sqlite3.Row, plain: Path) -> None:
        env_path = self.store.inbox_dir / (row["envelope"] or f"{row['id']}.msec")
        try:
            with env_path.open("rb") as src:
                opened = unseal_stream(src, plain, identity=self.identity)
        except EnvelopeError as exc:
            raise _Refused(f"envelope refused: {exc}") from exc
        except FileNotFoundError as exc:
            raise _Refused("envelope file missing") from exc
        except OSError as exc:
            raise StorageError(f"cannot read an incoming envelope: {exc.strerror}") from exc
        try:
            with plain.open("rb") as fh:
                manifest, _ = read_manifest(fh, opened.size)
        except EnvelopeError as exc:
            raise _Refused(f"message refused: {exc}") from exc
        if manifest.sender_idnps is None:
            raise _Refused("the sender did not identify themselves", manifest)
        try:
            sender = self.directory.lookup(f"idnps:{manifest.sender_idnps}")
        except PractitionerNotFound as exc:
            raise _Refused(
                f"sender {manifest.sender_idnps} is unknown to the directory", manifest
            ) from exc
        except DirectoryUnavailable as exc:
            raise _Transient("the directory is unavailable") from exc
        except DirectoryError as exc:
            raise _Refused(f"the directory cannot vouch for the sender: {exc}", manifest) from exc
        try:
            decision = self.trust.check(sender, opened.sender)
        except TrustError as exc:
            self._refuse_untrusted(row, manifest, sender, exc)
            raise _Refused(
                f"sender key not trusted for {manifest.sender_idnps}: {exc}", manifest
            ) from exc
        self.on_trust(decision)
        if manifest.kind == "receipt":
            self._record_receipt(row, manifest, sender, opened.sender)
            plain.unlink(missing_ok=True)
            return
        self._record_message(row, manifest, sender, opened.sender, plain)

    def _refuse_untrusted(
        self, row: sqlite3.Row, manifest: Manifest, sender: Practitioner, exc: TrustError
    ) -> None:
        """Remember to tell the practitioner the directory knows (never the unverified key)
        that something sent in their name failed verification, when receipts were asked."""
        if not (manifest.receipts and manifest.kind == "message"):
            return
        with self.store.transaction() as db:
            db.execute(
                "UPDATE inbox SET message_id = ?, sender_idnps = ?, sender = ? WHERE id = ?",
                (manifest.message_id, sender.idnps, sender.model_dump_json(), row["id"]),
            )
            self._queue_receipt(db, row["id"], "rejected", "verification-failed")

    def _is_duplicate(
        self, db: sqlite3.Connection, row_id: int, sender_idnps: str, message_id: str
    ) -> sqlite3.Row | None:
        row: sqlite3.Row | None = db.execute(
            "SELECT id FROM inbox WHERE sender_idnps = ? AND message_id = ? AND id != ?"
            " AND status IN (?, ?, ?, ?, ?)",
            (sender_idnps, message_id, row_id, *VERIFIED, DUPLICATE),
        ).fetchone()
        return row

    def _record_message(
        self,
        row: sqlite3.Row,
        manifest: Manifest,
        sender: Practitioner,
        key: PublicIdentity,
        plain: Path,
    ) -> None:
        # Check and record (sender, message id) in one write transaction: two processes
        # verifying copies of the same message concurrently cannot both record it.
        with self.store.transaction() as db:
            dup = self._is_duplicate(db, row["id"], sender.idnps, manifest.message_id)
            common = {
                "message_id": manifest.message_id,
                "kind": "message",
                "sender_idnps": sender.idnps,
                "claimer": None,
            }
            if dup is not None:
                moved = self._move(db, row["id"], VERIFYING, "duplicate", envelope=None, **common)
            else:
                moved = self._move(
                    db,
                    row["id"],
                    VERIFYING,
                    "accept",
                    plaintext=plain.name,
                    sender=sender.model_dump_json(),
                    sender_key=str(key),
                    receipts=",".join(manifest.receipts),
                    **common,
                )
                if moved and "delivered" in manifest.receipts:
                    self._queue_receipt(db, row["id"], "delivered")
        if not moved:
            return  # another process took the claim over and recorded it
        if dup is not None:
            plain.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                (self.store.inbox_dir / row["envelope"]).unlink()
            self.audit.append(
                "duplicate",
                message_id=manifest.message_id,
                envelope_id=row["envelope_id"],
                counterparty=sender.idnps,
                inbox=dup["id"],
                result="dropped",
            )
            return
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

    def _record_receipt(
        self, row: sqlite3.Row, manifest: Manifest, sender: Practitioner, key: PublicIdentity
    ) -> None:
        extra = manifest.extra or {}
        with self.store.transaction() as db:
            common = {
                "message_id": manifest.message_id,
                "kind": "receipt",
                "sender_idnps": sender.idnps,
                "claimer": None,
                "envelope": None,
            }
            dup = self._is_duplicate(db, row["id"], sender.idnps, manifest.message_id)
            if dup is not None:
                self._move(db, row["id"], VERIFYING, "duplicate", **common)
                problem: str | None = "duplicate"
            else:
                problem = self.apply_receipt(db, manifest, sender.idnps)
                if problem is None:
                    self._move(db, row["id"], VERIFYING, "receipt", **common)
                else:
                    self._move(db, row["id"], VERIFYING, "ignore", reason=problem, **common)
        with contextlib.suppress(OSError):
            (self.store.inbox_dir / row["envelope"]).unlink()
        if problem == "duplicate":
            self.audit.append(
                "duplicate",
                message_id=manifest.message_id,
                envelope_id=row["envelope_id"],
                counterparty=sender.idnps,
                of=extra.get("of"),
                result="dropped",
            )
        elif problem is not None:
            log.warning("ignoring a receipt: %s", problem)
            self.audit.append(
                "receipt-ignored",
                message_id=extra.get("of"),
                counterparty=sender.idnps,
                answer=problem,
            )

    def _retry(self, row: sqlite3.Row, reason: str) -> None:
        attempts = int(row["attempts"] or 0) + 1
        if attempts >= self.max_attempts:
            self._quarantine(row, f"{reason}; gave up after {attempts} attempts")
            return
        with self.store.transaction(durable=False) as db:
            # claimed_at doubles as "not before" for a row back in the queue
            self._move(
                db,
                row["id"],
                VERIFYING,
                "retry",
                claimer=None,
                claimed_at=self.clock() + retry_delay(attempts),
                attempts=attempts,
                reason=reason,
            )
        log.info("incoming envelope %d will be verified later: %s", row["id"], reason)

    def _quarantine(self, row: sqlite3.Row, reason: str, manifest: Manifest | None = None) -> None:
        src = self.store.inbox_dir / (row["envelope"] or f"{row['id']}.msec")
        dst = self.store.quarantine_dir / f"{row['id']}.msec"
        try:
            os.replace(src, dst)
            fsync_dir(self.store.quarantine_dir)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot move an envelope to quarantine: {exc.strerror}") from exc
        with self.store.transaction() as db:
            moved = self._move(
                db,
                row["id"],
                VERIFYING,
                "quarantine",
                reason=reason,
                envelope=dst.name,
                plaintext=None,
                claimer=None,
            ) or self._move(db, row["id"], FETCHED, "quarantine", reason=reason, envelope=dst.name)
        if not moved:
            return
        log.warning("incoming envelope %d quarantined: %s", row["id"], reason)
        self.audit.append(
            "quarantine",
            inbox=row["id"],
            message_id=manifest.message_id if manifest is not None else None,
            result="quarantined",
            answer=reason,
        )

    # -- receipts to send ------------------------------------------------------------------
    def _queue_receipt(
        self, db: sqlite3.Connection, row_id: int, status: str, reason: str | None = None
    ) -> None:
        db.execute(
            "INSERT OR IGNORE INTO receipts_out (inbox_id, status, reason, state, at)"
            " VALUES (?, ?, ?, 'due', ?)",
            (row_id, status, reason, self.clock()),
        )

    def receipts_due(self) -> list[tuple[receipts.ReceiptRequest, Practitioner, int]]:
        """Receipts decided but not yet handed to the outbox: (request, to, inbox row)."""
        out = []
        for r in self.store.query(
            "SELECT o.inbox_id, o.status, o.reason, i.message_id, i.envelope_id, i.sender"
            " FROM receipts_out o JOIN inbox i ON i.id = o.inbox_id WHERE o.state = 'due'"
            " ORDER BY o.at"
        ):
            if r["sender"] is None or r["message_id"] is None:
                continue
            to = Practitioner.model_validate_json(r["sender"])
            out.append(
                (
                    receipts.ReceiptRequest(
                        r["message_id"], r["envelope_id"], r["status"], r["reason"]
                    ),
                    to,
                    int(r["inbox_id"]),
                )
            )
        return out

    def receipt_queued(self, row_id: int, status: str, state: str = "sent") -> None:
        """The outbox accepted (``sent``) or refused for good (``failed``) a due receipt."""
        with self.store.transaction(durable=False) as db:
            db.execute(
                "UPDATE receipts_out SET state = ?, at = ? WHERE inbox_id = ? AND status = ?",
                (state, self.clock(), row_id, status),
            )

    # -- the application's side -----------------------------------------------------------
    def row(self, row_id: int) -> sqlite3.Row | None:
        rows = self.store.query("SELECT * FROM inbox WHERE id = ?", (row_id,))
        return rows[0] if rows else None

    def received(self) -> list[sqlite3.Row]:
        return self.store.query("SELECT * FROM inbox WHERE status = ? ORDER BY id", (RECEIVED,))

    def ack(self, row_id: int) -> None:
        """Mark a received message processed and remove its files."""
        row = self.row(row_id)
        if row is None or row["status"] != RECEIVED:
            return
        with self.store.transaction() as db:
            moved = self._move(db, row_id, RECEIVED, "ack", plaintext=None, envelope=None)
        if not moved:
            return
        self.audit.append("ack", message_id=row["message_id"], counterparty=row["sender_idnps"])
        for name in (row["plaintext"], row["envelope"]):
            if name:
                with contextlib.suppress(OSError):
                    (self.store.inbox_dir / name).unlink()

    def mark_read(self, row_id: int, *, send_receipt: bool) -> None:
        row = self.row(row_id)
        if row is None or row["status"] not in (RECEIVED, ACKED) or row["read_at"] is not None:
            return
        with self.store.transaction() as db:
            db.execute(
                "UPDATE inbox SET read_at = ? WHERE id = ? AND read_at IS NULL",
                (self.clock(), row_id),
            )
            if send_receipt and "read" in (row["receipts"] or "").split(","):
                self._queue_receipt(db, row_id, "read")
        self.audit.append("read", message_id=row["message_id"], counterparty=row["sender_idnps"])

    def reject(self, row_id: int, reason: str) -> None:
        if reason not in receipts.REJECTION_CODES:
            raise ValueError(
                f"unknown rejection reason {reason!r}: expected one of "
                + ", ".join(receipts.REJECTION_CODES)
            )
        row = self.row(row_id)
        if row is None or row["status"] != RECEIVED:
            return
        self.audit.append(
            "reject", message_id=row["message_id"], counterparty=row["sender_idnps"], answer=reason
        )
        if row["receipts"]:
            with self.store.transaction() as db:
                self._queue_receipt(db, row_id, "rejected", reason)
        self.ack(row_id)

    def release(self, row_id: int) -> bool:
        """Put a quarantined envelope back in the queue to be verified again (after the cause
        was fixed: a directory entry added, a key trusted). True if it was in quarantine."""
        row = self.row(row_id)
        if row is None or row["status"] != QUARANTINED or not row["envelope"]:
            return False
        src = self.store.quarantine_dir / row["envelope"]
        dst = self.store.inbox_dir / row["envelope"]
        try:
            os.replace(src, dst)
            fsync_dir(self.store.inbox_dir)
        except OSError as exc:
            raise StorageError(f"cannot release a quarantined envelope: {exc.strerror}") from exc
        with self.store.transaction() as db:
            moved = self._move(
                db,
                row_id,
                QUARANTINED,
                "release",
                reason=None,
                attempts=0,
                claimer=None,
                claimed_at=None,
                message_id=None,
            )
        if moved:
            self.audit.append("release", inbox=row_id, result="released")
        return moved

    def quarantined(self) -> list[QuarantinedEnvelope]:
        return [
            QuarantinedEnvelope(
                r["id"],
                _ts(r["received_at"]),
                r["reason"] or "",
                self.store.quarantine_dir / (r["envelope"] or ""),
                r["message_id"],
            )
            for r in self.store.query(
                "SELECT * FROM inbox WHERE status = ? ORDER BY id", (QUARANTINED,)
            )
        ]

    def message(
        self,
        row: sqlite3.Row,
        *,
        ack: Callable[[], None],
        mark_read: Callable[[], None],
        reject: Callable[[str], None],
    ) -> ReceivedMessage:
        """The application's view of a received row."""
        path = self.store.inbox_dir / row["plaintext"]
        with path.open("rb") as fh:
            manifest, offset = read_manifest(fh, path.stat().st_size)
        docs = []
        for entry in manifest.documents:
            docs.append(_document(entry, path, offset))
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
            _ack=ack,
            _mark_read=mark_read,
            _reject=reject,
        )


def _ts(value: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, dt.UTC)


def read_manifest(fh: BinaryIO, total: int) -> tuple[Manifest, int]:
    """Read the manifest at the start of a message plaintext and validate it completely: its
    structure (the envelope core's parser), then what needs the models
    (:func:`check_manifest_models`). Return it and the offset of the first document."""
    manifest, offset = read_manifest_structure(fh, total)
    check_manifest_models(manifest)
    return manifest, offset


def check_manifest_models(manifest: Manifest) -> None:
    """The checks of a manifest that need the identifiers and the models, which the envelope
    core does not load: the sender names a practitioner's identifier, and each document's
    patient and type validate as models. Raise :class:`EnvelopeError` like the structural
    parser (``malformed message: …``), never quoting the input."""
    if manifest.sender_idnps is not None:
        try:
            if not parse_identifier(manifest.sender_idnps).is_professional:
                raise ValueError("not a professional")
        except ValueError as exc:
            raise EnvelopeError("malformed message: the sender's identifier is malformed") from exc
    try:
        for entry in manifest.documents:
            if "patient" in entry:
                Patient.model_validate(entry["patient"])
            if "document_type" in entry:
                Code.model_validate(entry["document_type"])
    except ValueError as exc:  # pydantic's ValidationError; it never quotes the input here
        raise EnvelopeError("malformed message: bad patient or document type") from exc


def _document(entry: Mapping[str, Any], file: Path, offset: int) -> ReceivedDocument:
    """A document of a verified manifest (whose entries :func:`read_manifest` validated)."""
    return ReceivedDocument(
        id=entry["id"],
        media_type=entry["media_type"],
        size=entry["size"],
        filename=entry.get("filename"),
        title=entry.get("title"),
        document_type=Code.model_validate(entry["document_type"])
        if "document_type" in entry
        else None,
        created=dt.datetime.fromisoformat(entry["created"]) if "created" in entry else None,
        author=entry.get("author"),
        patient=Patient.model_validate(entry["patient"]) if "patient" in entry else None,
        confidentiality=str(entry.get("confidentiality", "N")),
        replaces=entry.get("replaces"),
        _file=file,
        _offset=offset,
    )
