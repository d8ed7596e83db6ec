"""The mail transport: medsecure envelopes and MSSanté messages over SMTP, received from IMAP or
a Maildir, with delivery reports (DSN, MDN) handed to the outbox.

Theory of operation
-------------------
Sending (:meth:`MailTransport.deliver`), to endpoints of two kinds:

* ``Endpoint(kind="mail", address=…)``, a medsecure user's mailbox: the sealed envelope is
  wrapped with :func:`~medsecure.mail.build_e2e_message` — From this transport's own address,
  Message-ID ``<message id@domain>`` so that a retry carries the same one, nothing about the
  patient or the document in what servers see — and submitted with
  :class:`~medsecure.mail._smtp.SmtpSubmitter` (one connection reused across deliveries,
  ``ENVID`` = the message id, ``NOTIFY=SUCCESS,FAILURE``). The message is produced while it is
  sent: a 200 MiB envelope is never held whole.
* ``Endpoint(kind="mssante", address=…)``, a practitioner without a medsecure key: the outbox
  file is already a complete MSSanté message the client built (TLS hop by hop only: the
  client asked for it and audited it); it is submitted as it is.

Replies: 4xx and a lost connection are :class:`~medsecure.TransportUnavailable` (the outbox
retries); 5xx is :class:`~medsecure.DeliveryRejected` with the server's text, every mail
address in it masked.

Receiving (:meth:`list`, :meth:`take`, :meth:`acknowledge`) from one IMAP folder or one
Maildir, which may also hold a person's ordinary mail:

* :meth:`list` lists the folder (one short line per message), peeks at the header of each
  message it has not classified yet (``BODY.PEEK``: nothing is marked read) and keeps what
  the pure rules of :mod:`._mailrules` claim: medsecure messages, and delivery reports about
  messages this client sent (read whole — they are small — and parsed). Every other message
  is never listed, never read whole, flagged or moved. Classifications are remembered per
  handle (an IMAP handle names UIDVALIDITY and UID, so a message never changes under it).
* :meth:`take` copies the message to a spool file beside the target (IMAP: in parts of
  ``chunk_size`` bytes) and decodes the envelope attachment to the target in bounded memory,
  fsynced, mode 0600. A malformed message, or one too large for the limits, is moved to the
  quarantine folder — never lost, never deleted — and :class:`UnsupportedItem` is raised.
* :meth:`acknowledge` moves the message to the processed folder (folders are created when
  missing). A move the server refuses now is retried at the next :meth:`list`, and the message
  is not listed meanwhile: acknowledging never fails because of the server, and a message moved
  late is at worst taken again and dropped by the inbox as a duplicate.

A DSN may report on several recipients: each becomes one ``report`` item
(``<handle>#<n>``), and the message is moved once every one of them was acknowledged.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from .._errors import (
    ConfigError,
    DeliveryRejected,
    MailFormatError,
    StorageError,
    TransportError,
    TransportUnavailable,
)
from .._fs import removing_on_failure
from ..envelope._labels import ENVELOPE_MAGIC
from ..envelope._message import MESSAGE_ID_RE
from ..mail import MailLimits, MssanteOptions, build_e2e_message, parse_message
from ..mail._config import MailItem, MailServer, discover
from ..mail._headers import check_address
from ..mail._imap import ImapMailbox
from ..mail._maildir import MaildirFolder
from ..mail._smtp import SmtpSubmitter
from ..models import Endpoint
from ._base import DeliveryReport, Incoming, Transport, UnsupportedItem
from ._mailrules import Peek, classify_header, delivery_reports

__all__ = ["MailTransport"]

log = logging.getLogger("medsecure.transports.mail")

DEFAULT_PROCESSED = "medsecure-processed"
DEFAULT_QUARANTINE = "medsecure-quarantine"
#: Largest delivery report read while listing (a DSN returning a whole message may be large;
#: one larger than this is left alone as foreign).
MAX_REPORT_SIZE = 16 << 20
_PEEK_BATCH = 100
_HEADER_PEEK = 16 << 10
_PART_RE = re.compile(r"(.+)#([0-9]{1,4})")
_Items = list[MailItem]  # ``list`` is also a method name of MailTransport


@dataclass(frozen=True)
class _Known:
    """What a listed message was found to be (remembered per handle)."""

    kind: str  # "envelope", "report", "foreign"
    message_id: str | None = None
    reports: tuple[DeliveryReport, ...] = ()


class _CappedWriter:
    """A file wrapper for :meth:`ImapMailbox.fetch_to` that refuses to grow past ``limit``
    (a message larger than the limits goes to quarantine instead of filling the disk)."""

    def __init__(self, inner: BinaryIO, limit: int) -> None:
        self.inner = inner
        self.limit = limit

    def write(self, data: bytes) -> int:
        if self.inner.tell() + len(data) > self.limit:
            raise MailFormatError("the message is larger than the mail limits allow")
        return self.inner.write(data)

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.inner.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.inner.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        return self.inner.truncate(size)


def _e2e_size(envelope_size: int) -> int:
    """An upper estimate of the end-to-end message's size (SMTP SIZE): base64 in 76-column
    lines of 57 bytes each, plus headers and the text part."""
    return ((envelope_size + 56) // 57) * 78 + 4096


class MailTransport(Transport):
    """Deliver to ``mail`` and ``mssante`` endpoints over SMTP; receive from IMAP or a Maildir.

    ``address`` is this mailbox (From of every message sent, and where answers come back).
    ``smtp`` is the submission server (without it the transport only receives); ``imap`` or
    ``maildir`` (one of them, or neither to only send) is where incoming mail is read, in
    ``inbox_folder``; processed messages move to ``processed_folder``, malformed ones to
    ``quarantine_folder`` (IMAP folder names, or Maildir++ sub-folders of ``maildir``).
    ``product_reference`` is the MSSanté product reference (``X-MSS-NIL``) put on every
    end-to-end message; ``mssante_fallback`` says whether this configuration allows the
    TLS-only MSSanté profile for recipients without a medsecure key (the client reads it).
    ``spool_dir`` holds the temporary copies of fetched messages (default: beside the target
    of :meth:`take`). Construction opens no connection; unreadable TLS files raise
    :class:`~medsecure.ConfigError` at once.
    """

    kinds: ClassVar[frozenset[str]] = frozenset({"mail", "mssante"})

    def __init__(
        self,
        address: str,
        *,
        smtp: MailServer | None = None,
        imap: MailServer | None = None,
        maildir: str | os.PathLike[str] | None = None,
        inbox_folder: str = "INBOX",
        processed_folder: str = DEFAULT_PROCESSED,
        quarantine_folder: str = DEFAULT_QUARANTINE,
        product_reference: str | None = None,
        mssante_fallback: bool = False,
        spool_dir: str | os.PathLike[str] | None = None,
        limits: MailLimits | None = None,
        max_report_size: int = MAX_REPORT_SIZE,
        chunk_size: int = 1 << 20,
        local_hostname: str | None = None,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        check_address(address, "the transport's address")
        if imap is not None and maildir is not None:
            raise ValueError("give imap or maildir, not both")
        for folder in (processed_folder, quarantine_folder):
            if not isinstance(folder, str) or not folder or folder == inbox_folder:
                raise ValueError("the processed and quarantine folders must differ from the inbox")
        if processed_folder == quarantine_folder:
            raise ValueError("the processed and quarantine folders must differ")
        if product_reference is not None and (
            not product_reference.strip() or not product_reference.isascii()
        ):
            raise ValueError("product_reference (X-MSS-NIL) must be a non-empty ASCII reference")
        if max_report_size < 1024:
            raise ValueError("max_report_size must be at least 1 KiB")
        self.address = address
        self.product_reference = product_reference.strip() if product_reference else None
        self.mssante_fallback = bool(mssante_fallback)
        self.processed_folder = processed_folder
        self.quarantine_folder = quarantine_folder
        self._spool = Path(spool_dir) if spool_dir is not None else None
        self._limits = limits or MailLimits()
        self._max_report = max_report_size
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._submitter = (
            SmtpSubmitter(smtp, local_hostname=local_hostname) if smtp is not None else None
        )
        self._box: ImapMailbox | MaildirFolder | None = None
        self._maildir_root: MaildirFolder | None = None
        if imap is not None:
            self._box = ImapMailbox(
                imap,
                folder=inbox_folder,
                chunk_size=chunk_size,
                header_limit=_HEADER_PEEK,
                spool_dir=str(self._spool) if self._spool is not None else None,
            )
        elif maildir is not None:
            box = MaildirFolder(maildir)
            if inbox_folder != "INBOX":
                box = MaildirFolder(box.subfolder(inbox_folder))
            self._box = box
            self._maildir_root = MaildirFolder(maildir)
        self._lock = threading.RLock()
        self._known: dict[str, _Known] = {}
        self._parts: dict[str, set[int]] = {}  # report message -> parts not yet acknowledged
        self._pending_moves: dict[str, str] = {}  # handle -> folder, retried at list()

    def __repr__(self) -> str:
        return f"<MailTransport {self.address!r}>"

    @property
    def name(self) -> str:
        return f"mail:{self.address}"

    def accepts(self, endpoint: Endpoint) -> bool:
        """``mail`` and ``mssante`` endpoints with an address, when SMTP is configured."""
        return (
            self._submitter is not None
            and endpoint.kind in self.kinds
            and endpoint.address is not None
        )

    def mssante_options(self, **kwargs: Any) -> MssanteOptions:
        """The client's MSSanté settings for this mailbox (``Client(mssante=…)``): this
        address as the sender and the configured product reference; ``kwargs`` add the
        other :class:`~medsecure.mail.MssanteOptions` fields (an XDM submission…)."""
        if self.product_reference is None:
            raise ValueError("the MSSanté profile needs product_reference (X-MSS-NIL)")
        return MssanteOptions(
            address=self.address, product_reference=self.product_reference, **kwargs
        )

    def close(self) -> None:
        """Close the SMTP and IMAP connections."""
        if self._submitter is not None:
            self._submitter.close()
        if isinstance(self._box, ImapMailbox):
            self._box.close()

    # -- sending ---------------------------------------------------------------------------
    def deliver(
        self, endpoint: Endpoint, envelope: BinaryIO, *, message_id: str, size: int
    ) -> None:
        """Submit one message (see the module docstring for the profiles and the errors)."""
        if not MESSAGE_ID_RE.fullmatch(message_id):
            raise ValueError("malformed message id")
        if self._submitter is None or not self.accepts(endpoint):
            raise DeliveryRejected(
                f"this mail transport cannot deliver to a {endpoint.kind} endpoint"
            )
        to = endpoint.address
        assert to is not None
        stream: BinaryIO
        if endpoint.kind == "mail":
            try:
                stream = build_e2e_message(  # type: ignore[assignment]
                    envelope,
                    sender=self.address,
                    recipients=[to],
                    message_id=message_id,
                    date=self._clock(),
                    product_reference=self.product_reference,
                )
            except ValueError as exc:
                # the address comes from a directory: a bad one is that endpoint's refusal
                raise DeliveryRejected("the endpoint's mail address cannot be used") from exc
            estimate = _e2e_size(size)
        else:
            try:
                head = envelope.read(len(ENVELOPE_MAGIC))
                envelope.seek(0)
            except OSError as exc:
                raise StorageError("cannot read the message to submit") from exc
            if head == ENVELOPE_MAGIC:
                # a sealed envelope routed to an MSSanté endpoint would reach the reader as
                # binary noise: only a message the client built for this profile goes there
                raise DeliveryRejected(
                    "an mssante endpoint takes a ready-made MSSanté message, not an envelope"
                )
            stream, estimate = envelope, size
        try:
            self._submitter.submit(
                stream,
                sender=self.address,
                recipients=[to],
                envid=message_id,
                size=estimate,
                dsn=True,
            )
        except ValueError as exc:
            raise DeliveryRejected("the endpoint's mail address cannot be used for SMTP") from exc

    # -- receiving -------------------------------------------------------------------------
    def list(self) -> Sequence[Incoming]:
        """medsecure messages and reports about this client's messages, oldest first."""
        box = self._box
        if box is None:
            return []
        with self._lock:
            self._retry_moves()
            items = box.list()
            present = {item.handle for item in items}
            for table in (self._known, self._parts):
                for handle in [h for h in table if h not in present]:
                    del table[handle]
            unknown = [
                i
                for i in items
                if i.handle not in self._known and i.handle not in self._pending_moves
            ]
            for start in range(0, len(unknown), _PEEK_BATCH):
                for item in self._peek(box, unknown[start : start + _PEEK_BATCH]):
                    assert item.header is not None
                    self._known[item.handle] = self._examine(
                        box, item, classify_header(item.header)
                    )
            out: list[Incoming] = []
            for item in items:
                known = self._known.get(item.handle)
                if known is None or item.handle in self._pending_moves:
                    continue
                if known.kind == "envelope":
                    out.append(Incoming(item.handle, known.message_id, item.size))
                elif known.kind == "report":
                    parts = self._parts.setdefault(item.handle, set(range(len(known.reports))))
                    for n, report in enumerate(known.reports):
                        if n in parts:
                            out.append(
                                Incoming(
                                    f"{item.handle}#{n}",
                                    report.message_id,
                                    kind="report",
                                    report=report,
                                )
                            )
            return out

    @staticmethod
    def _peek(box: ImapMailbox | MaildirFolder, batch: Sequence[MailItem]) -> _Items:
        if isinstance(box, ImapMailbox):
            return box.peek(batch)
        out: _Items = []
        for item in batch:
            try:
                out.append(MailItem(item.handle, item.size, box.headers(item, limit=_HEADER_PEEK)))
            except TransportError:
                continue  # gone meanwhile, or no longer a regular file: not listed
        return out

    def _examine(self, box: ImapMailbox | MaildirFolder, item: MailItem, peek: Peek) -> _Known:
        """The classification of one peeked message; a report is read whole and parsed."""
        if peek.kind != "report":
            return _Known(peek.kind, peek.message_id)
        if item.size is not None and item.size > self._max_report:
            log.info("a large delivery report is left alone in the mailbox (not read)")
            return _Known("foreign")
        try:
            with self._spooled(box, item, self._spool, cap=self._max_report) as source:
                parsed = parse_message(source, limits=self._limits)
        except MailFormatError as exc:
            # a broken report cannot be tied to a message of ours: it stays where it is
            log.info("a malformed delivery report is left alone in the mailbox: %s", exc)
            return _Known("foreign")
        except TransportUnavailable:
            raise
        except TransportError:
            return _Known("foreign")  # gone meanwhile: the next listing says what remains
        reports = tuple(delivery_reports(parsed.reports)) if parsed.kind == "report" else ()
        return _Known("report", reports=reports) if reports else _Known("foreign")

    @contextlib.contextmanager
    def _spooled(
        self,
        box: ImapMailbox | MaildirFolder,
        item: MailItem,
        spool_dir: Path | None,
        *,
        cap: int,
    ) -> Iterator[BinaryIO]:
        """The raw message as a readable file: the Maildir file itself, or (IMAP) a 0600
        anonymous spool file filled in parts. Larger than ``cap``: MailFormatError."""
        if isinstance(box, MaildirFolder):
            with box.fetch(item) as f:
                st = os.fstat(f.fileno())
                if st.st_size > cap:
                    raise MailFormatError("the message is larger than the mail limits allow")
                yield f
            return
        try:
            spool: BinaryIO = tempfile.TemporaryFile(dir=spool_dir)  # noqa: SIM115
        except OSError as exc:
            raise StorageError(f"cannot create a spool file: {exc.strerror}") from exc
        with spool:
            box.fetch_to(item, _CappedWriter(spool, cap))  # type: ignore[arg-type]
            spool.seek(0)
            yield spool

    def take(self, item: Incoming, target: Path) -> None:
        """Decode the envelope of a waiting medsecure message to ``target`` (0600, fsynced).
        Raises :class:`UnsupportedItem` for a malformed message (moved to quarantine),
        :class:`~medsecure.TransportUnavailable` if it is gone or the server is unreachable,
        :class:`~medsecure.StorageError` if the local disk fails."""
        mail_item = self._envelope_item(item)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot store an incoming envelope: {exc.strerror}") from exc
        with removing_on_failure(target), os.fdopen(fd, "wb") as out:
            self._extract(mail_item, out, self._spool or target.parent)
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as exc:
                raise StorageError(f"cannot store an incoming envelope: {exc.strerror}") from exc

    def fetch(self, item: Incoming) -> BinaryIO:
        """The envelope of a waiting medsecure message, in an anonymous temporary file."""
        mail_item = self._envelope_item(item)
        try:
            out: BinaryIO = tempfile.TemporaryFile(dir=self._spool)  # noqa: SIM115
        except OSError as exc:
            raise StorageError(f"cannot create a spool file: {exc.strerror}") from exc
        try:
            self._extract(mail_item, out, self._spool)
            out.seek(0)
        except BaseException:
            out.close()
            raise
        return out

    def _envelope_item(self, item: Incoming) -> MailItem:
        if self._box is None:
            raise ValueError("this mail transport has no incoming mailbox")
        if item.kind != "envelope" or "#" in item.handle:
            raise ValueError("not an envelope item of this transport")
        return MailItem(item.handle, item.size)

    def _extract(self, item: MailItem, out: BinaryIO, spool_dir: Path | None) -> None:
        box = self._box
        assert box is not None
        try:
            with self._spooled(box, item, spool_dir, cap=self._limits.max_message_bytes) as src:
                parsed = parse_message(src, envelope_out=out, limits=self._limits)
            if parsed.kind != "medsecure" or parsed.envelope_size is None:
                raise MailFormatError("the message carries no medsecure envelope")
        except MailFormatError as exc:
            self._quarantine(item, str(exc))
        except (TransportUnavailable, StorageError):
            raise
        except TransportError as exc:
            # gone (taken by another reader), renumbered, refused for now: it stays in the
            # folder and the next listing says what remains
            raise TransportUnavailable(str(exc)) from exc
        except OSError as exc:
            raise StorageError(
                f"cannot store an incoming envelope: {exc.strerror or type(exc).__name__}"
            ) from exc

    def _quarantine(self, item: MailItem, reason: str) -> None:
        """Move a malformed message to the quarantine folder; always raises UnsupportedItem."""
        where = f"the quarantine folder {self.quarantine_folder!r}"
        try:
            self._move(item, self.quarantine_folder)
        except TransportUnavailable as exc:
            raise UnsupportedItem(
                f"a malformed mail message ({reason}) stays in the mailbox for now: it could "
                f"not be moved to {where} ({exc})"
            ) from exc
        except TransportError as exc:
            self._known[item.handle] = _Known("foreign")  # left where it is, not listed again
            raise UnsupportedItem(
                f"a malformed mail message ({reason}) stays in the mailbox: {where} refused it "
                f"({exc})"
            ) from exc
        self._known.pop(item.handle, None)
        log.warning("a malformed mail message was moved to %s: %s", where, reason)
        raise UnsupportedItem(f"a malformed mail message was moved to {where}: {reason}")

    def acknowledge(self, item: Incoming) -> None:
        """Move a stored message (or, once all its parts are acknowledged, a report) to the
        processed folder; a move the server refuses now is retried at the next listing."""
        if self._box is None:
            raise ValueError("this mail transport has no incoming mailbox")
        with self._lock:
            handle = item.handle
            if item.kind == "report":
                m = _PART_RE.fullmatch(handle)
                if m is None:
                    raise ValueError("not a report item of this transport")
                handle = m.group(1)
                parts = self._parts.get(handle)
                if parts is not None:
                    parts.discard(int(m.group(2)))
                    if parts:
                        return  # other recipients of this report are still to be handed over
            elif item.kind != "envelope" or "#" in handle:
                raise ValueError("not an item of this transport")
            try:
                self._move(MailItem(handle), self.processed_folder)
            except TransportError as exc:
                self._pending_moves[handle] = self.processed_folder
                log.warning("a processed mail message will be moved later: %s", exc)
                return
            self._known.pop(handle, None)
            self._parts.pop(handle, None)

    def _move(self, item: MailItem, folder: str) -> None:
        box = self._box
        if isinstance(box, ImapMailbox):
            box.move(item, folder)
        elif isinstance(box, MaildirFolder):
            assert self._maildir_root is not None
            box.move(item, self._maildir_root.subfolder(folder))

    def _retry_moves(self) -> None:
        for handle, folder in list(self._pending_moves.items()):
            try:
                self._move(MailItem(handle), folder)
            except TransportUnavailable:
                return  # still down: the next listing tries again
            except TransportError as exc:
                # renumbered or refused for good: the message is listed again and, if it was
                # an envelope already stored, dropped by the inbox as a duplicate
                log.warning("gave up moving a processed mail message: %s", exc)
            del self._pending_moves[handle]
            self._known.pop(handle, None)

    # -- configuration ---------------------------------------------------------------------
    @staticmethod
    def config_section(
        address: str,
        *,
        smtp: str | None = None,
        imap: str | None = None,
        maildir: str | os.PathLike[str] | None = None,
        security: str = "starttls",
        username: str | None = None,
        password_env: str = "MEDSECURE_MAIL_PASSWORD",  # noqa: S107 - a variable name
        ca_file: str | os.PathLike[str] | None = None,
        discover: bool = False,
        product_reference: str | None = None,
        mssante_fallback: bool = False,
    ) -> dict[str, Any]:
        """A home configuration's mail section from command-line style settings (what
        ``medsecure init --mail-address … --smtp HOST[:PORT] --imap HOST[:PORT]`` writes):
        ``smtp`` / ``imap`` as ``HOST`` or ``HOST:PORT``, one ``security``, ``username`` and
        password variable for both, paths made absolute. ValueError for a bad combination;
        :meth:`from_config` validates the rest."""
        if imap and maildir:
            raise ValueError("give an IMAP server or a Maildir, not both")
        if not smtp and not discover:
            raise ValueError("the mail transport needs an SMTP server (HOST[:PORT]) or discover")
        if mssante_fallback and not product_reference:
            raise ValueError("the MSSanté fallback needs the product reference (X-MSS-NIL)")

        def server(spec: str | None) -> dict[str, Any]:
            out: dict[str, Any] = {}
            if spec:
                host, sep, port = spec.rpartition(":") if spec.count(":") == 1 else ("", "", "")
                if sep and not (port.isascii() and port.isdigit()):
                    raise ValueError("a server is HOST or HOST:PORT")
                out = {"host": host, "port": int(port)} if sep else {"host": spec}
            out.update(security=security, username=username or address, password_env=password_env)
            if ca_file:
                out["ca_file"] = str(Path(ca_file).expanduser().resolve())
            return out

        section: dict[str, Any] = {"kind": "mail", "address": address, "smtp": server(smtp)}
        if maildir:
            section["maildir"] = str(Path(maildir).expanduser().resolve())
        elif imap or discover:
            section["imap"] = server(imap)
        if discover:
            section["discover"] = True
        if product_reference:
            section["product_reference"] = product_reference
        if mssante_fallback:
            section["mssante_fallback"] = True
        return section

    @classmethod
    def from_config(cls, section: Mapping[str, Any], *, base: Path | None = None) -> MailTransport:
        """Build a transport from a home configuration's ``{"kind": "mail", …}`` section
        (``docs/mail-transport.md`` lists its fields); relative paths are taken from ``base``.
        Raises :class:`~medsecure.ConfigError` for a section it cannot use."""
        known = {
            "kind",
            "address",
            "smtp",
            "imap",
            "maildir",
            "folders",
            "product_reference",
            "mssante_fallback",
            "discover",
            "spool",
        }
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(f"unknown field(s) in the mail transport section: {unknown}")
        address = section.get("address")
        if not isinstance(address, str):
            raise ConfigError("the mail transport section needs 'address' (this mailbox)")
        try:
            check_address(address, "address")
        except ValueError as exc:
            raise ConfigError(f"the mail transport's address is malformed: {exc}") from exc
        auto = section.get("discover", False)
        if isinstance(auto, dict):
            ns = auto.get("nameserver")
            port = auto.get("port", 53)
            if set(auto) - {"nameserver", "port"} or not isinstance(ns, str):
                raise ConfigError("'discover' is true, or {'nameserver': address, 'port': n}")
            if isinstance(port, bool) or not isinstance(port, int):
                raise ConfigError("'discover.port' is a port number")
            auto = (ns, port)
        elif not isinstance(auto, bool):
            raise ConfigError("'discover' is true or false")
        domain = address.rsplit("@", 1)[1]
        smtp = _server(section.get("smtp"), "smtp", domain, auto, base)
        imap = _server(section.get("imap"), "imap", domain, auto, base)
        maildir = section.get("maildir")
        if maildir is not None and not isinstance(maildir, str):
            raise ConfigError("'maildir' is the path of a Maildir folder")
        folders = section.get("folders") or {}
        if not isinstance(folders, dict) or set(folders) - {"inbox", "processed", "quarantine"}:
            raise ConfigError("'folders' has 'inbox', 'processed' and 'quarantine' names only")
        if not all(isinstance(v, str) for v in folders.values()):
            raise ConfigError("folder names are strings")
        fallback = section.get("mssante_fallback", False)
        if not isinstance(fallback, bool):
            raise ConfigError("'mssante_fallback' is true or false")
        nil = section.get("product_reference")
        if nil is not None and not isinstance(nil, str):
            raise ConfigError("'product_reference' is the MSSanté product reference (a string)")
        spool = section.get("spool")
        if spool is not None and not isinstance(spool, str):
            raise ConfigError("'spool' is a folder path")
        try:
            return cls(
                address,
                smtp=smtp,
                imap=imap,
                maildir=_path(maildir, base) if maildir else None,
                inbox_folder=folders.get("inbox", "INBOX"),
                processed_folder=folders.get("processed", DEFAULT_PROCESSED),
                quarantine_folder=folders.get("quarantine", DEFAULT_QUARANTINE),
                product_reference=nil,
                mssante_fallback=fallback,
                spool_dir=_path(spool, base) if spool else None,
            )
        except ValueError as exc:
            raise ConfigError(f"the mail transport section is not usable: {exc}") from exc


_SERVER_FIELDS = {
    "host",
    "port",
    "security",
    "username",
    "password_env",
    "oauth_token_env",
    "ca_file",
    "client_cert",
    "client_key",
    "client_key_password_env",
    "timeout",
}


def _path(value: str, base: Path | None) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() or base is None else base / p)


def _from_env(name: str, what: str) -> Callable[[], str]:
    """A secret read from the environment at each use (never kept)."""

    def read() -> str:
        value = os.environ.get(name, "")
        if not value:
            raise ConfigError(f"the {what} variable {name} is not set")
        return value

    return read


def _server(
    spec: object,
    protocol: str,
    domain: str,
    auto: bool | tuple[str, int],
    base: Path | None,
) -> MailServer | None:
    """A :class:`MailServer` from a section's ``smtp`` / ``imap`` object (ConfigError if
    unusable); with ``discover`` and no ``host``, the host comes from RFC 6186 SRV records
    of the mail domain, and only a target inside that domain is taken without confirmation."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ConfigError(f"'{protocol}' is an object of server settings")
    unknown = sorted(set(spec) - _SERVER_FIELDS)
    if unknown:
        raise ConfigError(f"unknown field(s) in the '{protocol}' settings: {unknown}")
    fields: dict[str, Any] = {
        k: v for k, v in spec.items() if k in ("host", "port", "security", "username", "timeout")
    }
    if "password_env" in spec:
        fields["password_env"] = spec["password_env"]
    if "oauth_token_env" in spec:
        fields["oauth_token"] = _from_env(str(spec["oauth_token_env"]), "OAuth token")
    if "client_key_password_env" in spec:
        fields["client_key_password"] = _from_env(
            str(spec["client_key_password_env"]), "client key password"
        )
    for name in ("ca_file", "client_cert", "client_key"):
        if name in spec:
            if not isinstance(spec[name], str):
                raise ConfigError(f"'{protocol}.{name}' is a file path")
            fields[name] = _path(spec[name], base)
    if "host" not in fields:
        if not auto:
            raise ConfigError(f"'{protocol}' needs 'host' (or 'discover': true)")
        nameserver = auto if isinstance(auto, tuple) else None
        found = [
            s
            for s in discover(domain, protocols=(protocol,), nameserver=nameserver)  # type: ignore[arg-type]
            if s.in_domain
        ]
        if not found:
            raise ConfigError(
                f"no {protocol} server inside {domain} is published in DNS (RFC 6186): "
                "give its host in the configuration"
            )
        fields.update(host=found[0].host, port=found[0].port, security=found[0].security)
    try:
        return MailServer(**fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the '{protocol}' settings are not usable: {exc}") from exc
