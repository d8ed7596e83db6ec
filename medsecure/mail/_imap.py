"""IMAP retrieval of messages from one folder (RFC 3501, RFC 6851 MOVE, RFC 4315 UIDPLUS), over
:mod:`imaplib`.

Theory of operation
-------------------
:class:`ImapMailbox` lists the messages of a folder by UID, lets the caller peek at their
headers (``BODY.PEEK[HEADER]``, the ``\\Seen`` flag untouched), copies one message to a binary
stream, and moves processed messages to another folder. It is format-agnostic: which messages are
medsecure envelopes or delivery reports is the caller's decision, and every message the caller
does not move stays exactly as it was (nothing is fetched with ``BODY[]``, which would set
``\\Seen``, and nothing is flagged or expunged but the moved message).

UIDs are only meaningful together with the folder's UIDVALIDITY (RFC 3501 §2.3.1.1): a handle
names both, and a handle whose UIDVALIDITY is no longer the folder's is refused instead of
touching whatever message now bears that UID.

Bounded memory. imaplib reads each literal whole (``read(size)`` with the size the server
announced) and refuses lines over ``imaplib._MAXLINE`` (1,000,000 bytes). A message is therefore
fetched in parts, ``BODY.PEEK[]<offset.length>`` (RFC 3501 §6.4.5 partial fetch), each part
written to the caller's stream before the next is asked for; and the connection class refuses any
literal larger than what was asked for, so a hostile server cannot make the client allocate more
than one part.

Security: IMAPS, or STARTTLS with the server refused when it does not offer it (or greets with
PREAUTH in clear); TLS settings from :mod:`._config`; AUTHENTICATE PLAIN (or LOGIN when PLAIN is
not offered) with a password read at each login, or XOAUTH2 with a token from a callable.
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import re
import ssl
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO, TypeVar

from .._errors import StorageError, TransportError, TransportUnavailable
from ._config import MailItem, MailServer, server_text, tls_failure
from ._connection import MailConnection

__all__ = ["ImapMailbox", "imap_utf7"]

T = TypeVar("T")
_Items = list[MailItem]  # ``list`` is also a method name of ImapMailbox

CHUNK_SIZE = 1 << 20
HEADER_LIMIT = 64 << 10
_HANDLE_RE = re.compile(r"imap:([0-9]{1,10}):([0-9]{1,10})")
_UID_RE = re.compile(rb"\bUID (\d{1,10})\b")
_SIZE_RE = re.compile(rb"\bRFC822\.SIZE (\d{1,20})\b")
_FLAGS_RE = re.compile(rb"\bFLAGS \(([^)]*)\)")
_EMPTY_PART_RE = re.compile(rb'BODY\[[A-Z]*\](?:<\d+>)? (?:""|NIL)')


def imap_utf7(name: str) -> str:
    """A folder name in IMAP's modified UTF-7 (RFC 3501 §5.1.3)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).rstrip(b"=").replace(b"/", b",").decode() + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def _folder_arg(name: str) -> str:
    if (
        not isinstance(name, str)
        or not name
        or len(name) > 255
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)
    ):
        raise ValueError("malformed folder name")
    encoded = imap_utf7(name)
    return '"' + encoded.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Bounded:
    """Bounds on what imaplib may read for one command: no literal over ``max_literal`` and no
    more than ``budget`` bytes in all (a server streaming endless responses is cut off)."""

    max_literal = HEADER_LIMIT
    budget = 1 << 20  # per instance once spent; enough for the greeting and CAPABILITY
    # Set when a bound was hit (imaplib re-wraps exceptions, so the reason is kept here).
    violation: str | None = None

    def _violate(self, reason: str) -> None:
        self.violation = reason
        raise imaplib.IMAP4.abort(reason)

    def _spend(self, n: int) -> None:
        self.budget -= n
        if self.budget < 0:
            self._violate("the server sent more than the command can need")

    def read(self, size: int) -> bytes:
        if size > self.max_literal:
            self._violate("the server announced a literal larger than asked for")
        self._spend(size)
        data: bytes = super().read(size)  # type: ignore[misc]
        return data

    def readline(self) -> bytes:
        line: bytes = super().readline()  # type: ignore[misc]
        self._spend(len(line))
        return line


class _IMAP4(_Bounded, imaplib.IMAP4):
    pass


class _IMAP4_SSL(_Bounded, imaplib.IMAP4_SSL):
    pass


class ImapMailbox(MailConnection[_IMAP4 | _IMAP4_SSL]):
    """Messages of one IMAP folder: list, peek at headers, fetch in parts, move.

    ``folder`` is the folder read (default ``INBOX``). ``chunk_size`` bounds each partial fetch
    (and so the memory used); ``max_message_size`` refuses larger messages (``None``: no limit);
    ``spool_dir`` is where :meth:`fetch` keeps its anonymous temporary files. Use as a context
    manager (or call :meth:`close`); one connection is kept and reopened when it drops.
    """

    protocol = "imap"

    def __init__(
        self,
        server: MailServer,
        *,
        folder: str = "INBOX",
        chunk_size: int = CHUNK_SIZE,
        header_limit: int = HEADER_LIMIT,
        max_message_size: int | None = None,
        spool_dir: str | None = None,
    ) -> None:
        super().__init__(server)
        if not 4096 <= chunk_size <= 64 << 20:
            raise ValueError("chunk_size must be between 4 KiB and 64 MiB")
        if not 1024 <= header_limit <= 8 << 20:
            raise ValueError("header_limit must be between 1 KiB and 8 MiB")
        self._folder_arg = _folder_arg(folder)
        self.folder = folder
        self._chunk = chunk_size
        self._header_limit = header_limit
        self._max_size = max_message_size
        self._spool = spool_dir
        self._caps: frozenset[str] = frozenset()
        self._created: set[str] = set()
        #: The folder's UIDVALIDITY at the last selection (``None`` before the first).
        self.uidvalidity: int | None = None

    def _detail(self) -> str:
        return f" {self.folder!r}"

    def _goodbye(self, imap: _IMAP4 | _IMAP4_SSL) -> None:
        with contextlib.suppress(imaplib.IMAP4.error, OSError, ValueError):
            imap.budget = 1 << 20
            imap.logout()
        with contextlib.suppress(OSError):
            imap.shutdown()

    def _cut(self, imap: _IMAP4 | _IMAP4_SSL) -> None:
        with contextlib.suppress(OSError, ValueError):
            imap.shutdown()

    # -- connection ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate imaplib, ssl and socket errors; a broken connection is dropped."""
        host = self.server.host
        try:
            yield
        except ssl.SSLError as exc:  # before ValueError: SSLCertVerificationError is one
            self._drop()
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise tls_failure(host, exc) from exc
            raise TransportUnavailable(
                f"TLS error with IMAP server {host}: {exc.reason or type(exc).__name__}"
            ) from exc
        except (TransportError, StorageError, TypeError, ValueError):
            raise
        except imaplib.IMAP4.abort as exc:
            self._drop()
            raise TransportUnavailable(
                f"IMAP connection to {host} broken while trying to {what}: {server_text(str(exc))}"
            ) from exc
        except imaplib.IMAP4.error as exc:
            raise TransportError(
                f"IMAP server {host} refused to {what}: {server_text(str(exc))}"
            ) from exc
        except OSError as exc:
            self._drop()
            reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror
            raise TransportUnavailable(
                f"cannot {what} on IMAP server {host}: {reason or type(exc).__name__}"
            ) from exc

    def _connect(self) -> _IMAP4 | _IMAP4_SSL:
        server, host, port = self.server, self.server.host, self.server.port_for("imap")
        imap: _IMAP4 | _IMAP4_SSL | None = None
        try:
            with self._errors("connect"):
                if server.security == "tls":
                    imap = _IMAP4_SSL(host, port, ssl_context=self._context, timeout=server.timeout)
                else:
                    imap = _IMAP4(host, port, timeout=server.timeout)
                self.connections += 1
                imap.budget = 1 << 20
                if server.security == "starttls":
                    if imap.state != "NONAUTH":
                        raise TransportError(
                            f"IMAP server {host} pre-authenticated the session in clear: refused"
                        )
                    if "STARTTLS" not in imap.capabilities:
                        raise TransportError(
                            f"IMAP server {host} does not offer STARTTLS: refusing to continue "
                            "without TLS"
                        )
                    imap.starttls(self._context)  # raises unless the server said OK
                if imap.state == "NONAUTH":
                    if not server.has_credentials:
                        raise TransportError(f"IMAP server {host} needs credentials")
                    self._authenticate(imap)
                imap.budget = 1 << 20
                typ, data = imap.capability()
                caps = data[-1] if typ == "OK" and data and isinstance(data[-1], bytes) else b""
                self._caps = frozenset(caps.decode("ascii", "replace").upper().split())
        except BaseException:
            if imap is not None:
                self._cut(imap)
            raise
        return imap

    def _authenticate(self, imap: _IMAP4 | _IMAP4_SSL) -> None:
        server, host = self.server, self.server.host
        caps = set(imap.capabilities)
        user = server.username or ""
        try:
            if server.oauth_token is not None:
                if "AUTH=XOAUTH2" not in caps:
                    raise TransportError(f"IMAP server {host} does not offer XOAUTH2")
                calls = [0]

                def xoauth2(challenge: bytes) -> bytes:
                    calls[0] += 1
                    if calls[0] > 1:
                        return b""  # answer the server's error challenge with an empty line
                    return f"user={user}\x01auth=Bearer {server.token()}\x01\x01".encode()

                imap.authenticate("XOAUTH2", xoauth2)
            elif "AUTH=PLAIN" in caps:

                def plain(challenge: bytes) -> bytes:
                    return f"\0{user}\0{server.secret()}".encode()

                imap.authenticate("PLAIN", plain)
            elif "LOGINDISABLED" not in caps:
                imap.login(user, server.secret())
                # imaplib keeps its last commands (with LOGIN's password) for debugging.
                if hasattr(imap, "_cmd_log"):
                    imap._cmd_log.clear()
            else:
                raise TransportError(f"IMAP server {host} offers no usable login")
        except imaplib.IMAP4.abort:
            raise
        except imaplib.IMAP4.error as exc:
            raise TransportError(
                f"IMAP server {host} refused the credentials: {server_text(str(exc))}"
            ) from exc
        except UnicodeEncodeError as exc:
            raise TransportError("the mail credentials cannot be encoded") from exc

    def _session(self, op: Callable[[_IMAP4 | _IMAP4_SSL], T], what: str) -> T:
        """Run ``op`` on a connection with the folder selected; when a reused connection turns
        out broken, reconnect once (every operation here is safe to repeat)."""
        with self._lock:
            for attempt in (1, 2):
                with self._errors(what):
                    imap, reused = self._opened()
                    try:
                        self._select(imap)
                        return op(imap)
                    except (imaplib.IMAP4.abort, OSError) as exc:
                        if imap.violation is not None:
                            # A hostile or broken server, not a broken network: no retry.
                            self._drop()
                            raise TransportError(
                                f"IMAP server {self.server.host} broke the protocol while "
                                f"trying to {what}: {imap.violation}"
                            ) from exc
                        if reused and attempt == 1:
                            self._drop()
                            continue
                        raise
            raise AssertionError("unreachable")  # pragma: no cover

    def _select(self, imap: _IMAP4 | _IMAP4_SSL) -> None:
        imap.budget = 1 << 20
        typ, data = imap.select(self._folder_arg, readonly=False)
        if typ != "OK":
            raise TransportError(
                f"IMAP server {self.server.host} cannot open the folder: "
                f"{server_text(data[-1] if data and isinstance(data[-1], bytes) else b'')}"
            )
        _, values = imap.response("UIDVALIDITY")
        try:
            value = values[-1]
            self.uidvalidity = int(value) if isinstance(value, bytes) else None
        except (TypeError, ValueError, IndexError):
            self.uidvalidity = None
        if self.uidvalidity is None:
            raise TransportError(f"IMAP server {self.server.host} gave no UIDVALIDITY")

    def _uid_of(self, item: MailItem) -> int:
        """The UID of ``item`` in the folder as selected now (refused if renumbered)."""
        m = _HANDLE_RE.fullmatch(item.handle) if isinstance(item, MailItem) else None
        if m is None:
            raise ValueError("not an item of an IMAP mailbox")
        if int(m.group(1)) != self.uidvalidity:
            raise TransportError(
                "the IMAP folder was renumbered (UIDVALIDITY changed) since it was listed: "
                "list it again"
            )
        return int(m.group(2))

    # -- operations ----------------------------------------------------------------------------

    def list(
        self, *, after_uid: int | None = None, headers: bool = False, limit: int | None = None
    ) -> list[MailItem]:
        """Messages of the folder by increasing UID (those marked ``\\Deleted`` left out).

        ``after_uid`` lists only messages with a larger UID (the caller keeps the last UID it
        examined together with :attr:`uidvalidity`; when UIDVALIDITY changed, list from the
        start). At most ``limit`` items are returned (the oldest). ``headers`` fills
        :attr:`MailItem.header` with the start of each header (``BODY.PEEK``: ``\\Seen`` stays
        as it was), fetched for the returned items only.
        """
        if after_uid is not None and (not isinstance(after_uid, int) or after_uid < 0):
            raise ValueError("after_uid must be a non-negative int")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError("limit must be a positive int")

        def op(imap: _IMAP4 | _IMAP4_SSL) -> list[MailItem]:
            _, exists = imap.response("EXISTS")
            if exists and exists[-1] == b"0":
                return []
            start = (after_uid or 0) + 1
            # One short line per message: the budget follows the folder's announced size.
            count = int(exists[-1]) if exists and exists[-1].isdigit() else 1 << 20
            imap.max_literal = 0
            imap.budget = (1 << 20) + count * 200
            typ, data = imap.uid("FETCH", f"{start}:*", "(UID RFC822.SIZE FLAGS)")
            if typ != "OK":
                raise TransportError(f"IMAP server {self.server.host} refused to list the folder")
            found: dict[int, int | None] = {}
            for text, _ in _responses(data):
                uid_m, size_m = _UID_RE.search(text), _SIZE_RE.search(text)
                if uid_m is None:
                    continue  # an unsolicited flag update of another session
                uid = int(uid_m.group(1))
                if uid < start:
                    continue  # "N:*" includes the last message even when its UID is below N
                flags_m = _FLAGS_RE.search(text)
                if flags_m and b"\\DELETED" in flags_m.group(1).upper():
                    continue
                found[uid] = int(size_m.group(1)) if size_m else None
            uids = sorted(found)[:limit]
            # Headers only for the messages returned, in batches: memory is bounded by
            # ``limit`` x ``header_limit``, not by the size of the folder.
            heads = self._fetch_headers(imap, uids) if headers else {}
            return [
                MailItem(
                    handle=f"imap:{self.uidvalidity}:{uid}",
                    size=found[uid],
                    header=heads.get(uid, b"") if headers else None,
                )
                for uid in uids
            ]

        return self._session(op, "list the folder")

    def _fetch_headers(self, imap: _IMAP4 | _IMAP4_SSL, uids: Sequence[int]) -> dict[int, bytes]:
        """The header start of each UID still in the folder, 100 UIDs a command."""
        wanted = set(uids)
        heads: dict[int, bytes] = {}
        for i in range(0, len(uids), 100):
            batch = uids[i : i + 100]
            imap.max_literal = self._header_limit
            imap.budget = (64 << 10) + len(batch) * (self._header_limit + 200)
            spec = f"(UID BODY.PEEK[HEADER]<0.{self._header_limit}>)"
            typ, data = imap.uid("FETCH", ",".join(map(str, batch)), spec)
            if typ != "OK":
                raise TransportError(
                    f"IMAP server {self.server.host} refused to read message headers"
                )
            for text, literals in _responses(data):
                uid_m = _UID_RE.search(text)
                if uid_m is not None and int(uid_m.group(1)) in wanted:
                    heads[int(uid_m.group(1))] = literals[0] if literals else b""
        return heads

    def peek(self, items: Sequence[MailItem]) -> _Items:
        """``items`` with :attr:`MailItem.header` filled (``BODY.PEEK``: ``\\Seen`` stays as
        it was), in batched commands; items no longer in the folder are left out. Memory is
        bounded by ``len(items)`` x ``header_limit``: callers pass bounded batches."""

        def op(imap: _IMAP4 | _IMAP4_SSL) -> _Items:
            uids = [self._uid_of(item) for item in items]
            heads = self._fetch_headers(imap, uids)
            return [
                MailItem(handle=item.handle, size=item.size, header=heads[uid])
                for item, uid in zip(items, uids, strict=True)
                if uid in heads
            ]

        return self._session(op, "read message headers")

    def headers(self, item: MailItem) -> bytes:
        """The start of the message header (at most ``header_limit`` bytes), without setting
        ``\\Seen``. Raises :class:`~medsecure.TransportError` if the message is gone."""

        def op(imap: _IMAP4 | _IMAP4_SSL) -> bytes:
            uid = self._uid_of(item)
            part = self._part(imap, uid, f"BODY.PEEK[HEADER]<0.{self._header_limit}>")
            if part is None:
                raise TransportError("the message is no longer in the IMAP folder")
            return part

        return self._session(op, "read a message header")

    def _part(self, imap: _IMAP4 | _IMAP4_SSL, uid: int, spec: str) -> bytes | None:
        """One partial fetch: the bytes, ``b""`` past the end, ``None`` if the UID is gone."""
        m = re.search(r"<\d+\.(\d+)>$", spec)
        limit = int(m.group(1)) if m else self._header_limit
        imap.max_literal = limit
        imap.budget = limit + (64 << 10)
        typ, data = imap.uid("FETCH", str(uid), f"({spec})")
        if typ != "OK":
            raise TransportError(f"IMAP server {self.server.host} refused to fetch a message")
        for text, literals in _responses(data):
            uid_m = _UID_RE.search(text)
            if uid_m is None or int(uid_m.group(1)) != uid:
                continue
            if literals:
                return literals[0]
            if _EMPTY_PART_RE.search(text):
                return b""
        return None

    def fetch_to(self, item: MailItem, out: BinaryIO) -> int:
        """Copy one message to ``out`` in parts of ``chunk_size`` bytes; return its size.

        The message is left as it was (``BODY.PEEK``: ``\\Seen`` is not set). Raises
        :class:`~medsecure.TransportError` when the message is gone or larger than
        ``max_message_size``, :class:`~medsecure.TransportUnavailable` when the connection
        breaks (``out`` then holds a partial copy: start again), and
        :class:`~medsecure.StorageError` when ``out`` cannot be written.
        """

        seekable = out.seekable()
        start = out.tell() if seekable else 0
        written = [0]

        def op(imap: _IMAP4 | _IMAP4_SSL) -> int:
            uid = self._uid_of(item)
            if written[0]:  # a retry after a broken connection: start the copy again
                if not seekable:
                    raise TransportUnavailable("the IMAP connection broke during a fetch")
                out.seek(start)
                out.truncate()
                written[0] = 0
            offset = 0
            while True:
                part = self._part(imap, uid, f"BODY.PEEK[]<{offset}.{self._chunk}>")
                if part is None:
                    raise TransportError("the message is no longer in the IMAP folder")
                if part:
                    if self._max_size is not None and offset + len(part) > self._max_size:
                        raise TransportError("the message is larger than max_message_size")
                    try:
                        out.write(part)
                    except OSError as exc:
                        raise StorageError("cannot write the fetched message") from exc
                    offset += len(part)
                    written[0] = offset
                if len(part) < self._chunk:
                    return offset

        try:
            return self._session(op, "fetch a message")
        except BaseException:
            if seekable:  # leave no partial copy behind
                with contextlib.suppress(OSError):
                    out.seek(start)
                    out.truncate()
            raise

    def fetch(self, item: MailItem) -> BinaryIO:
        """One message in an anonymous temporary file (mode 0600, no name on disk), at offset 0.

        The caller closes it. Errors as :meth:`fetch_to`.
        """
        try:
            spool: BinaryIO = tempfile.TemporaryFile(dir=self._spool)  # noqa: SIM115
        except OSError as exc:
            raise StorageError("cannot create a temporary file for a fetched message") from exc
        try:
            self.fetch_to(item, spool)
            spool.seek(0)
        except BaseException:
            spool.close()
            raise
        return spool

    def move(self, item: MailItem, folder: str) -> None:
        """Move one message to ``folder`` (created if missing): MOVE when the server offers it,
        else COPY, ``\\Deleted`` and, with UIDPLUS, ``UID EXPUNGE`` of that message alone
        (without UIDPLUS the message stays flagged ``\\Deleted`` and :meth:`list` skips it:
        a plain EXPUNGE would also remove messages other clients flagged). Moving a message
        that is already gone does nothing."""
        target = _folder_arg(folder)
        if folder == self.folder:
            raise ValueError("cannot move a message to the folder it is in")

        def op(imap: _IMAP4 | _IMAP4_SSL) -> None:
            uid = str(self._uid_of(item))
            imap.budget = 1 << 20
            imap.max_literal = 0
            if folder not in self._created:
                imap.create(target)  # NO when it exists: that is fine
                self._created.add(folder)
            if "MOVE" in self._caps:
                typ, data = imap.uid("MOVE", uid, target)
                self._check(typ, data, "move a message")
                return
            typ, data = imap.uid("COPY", uid, target)
            self._check(typ, data, "copy a message")
            typ, data = imap.uid("STORE", uid, "+FLAGS.SILENT", "(\\Deleted)")
            self._check(typ, data, "flag a moved message")
            if "UIDPLUS" in self._caps:
                typ, data = imap.uid("EXPUNGE", uid)
                self._check(typ, data, "expunge a moved message")

        self._session(op, "move a message")

    def _check(self, typ: str, data: Sequence[object], what: str) -> None:
        if typ != "OK":
            text = data[-1] if data and isinstance(data[-1], bytes) else b""
            raise TransportError(
                f"IMAP server {self.server.host} refused to {what}: {server_text(text)}"
            )


def _responses(data: list[object]) -> Iterator[tuple[bytes, list[bytes]]]:
    """imaplib's FETCH data as (response text, literals) pairs.

    imaplib gives a response with literals as ``(text-before, literal)`` tuples followed by the
    text after the last literal, and one without literals as a single ``bytes``.
    """
    texts: list[bytes] = []
    literals: list[bytes] = []
    for entry in data:
        if isinstance(entry, tuple) and len(entry) == 2:
            head, literal = entry
            if isinstance(head, bytes) and isinstance(literal, bytes):
                texts.append(head)
                literals.append(literal)
            continue
        if not isinstance(entry, bytes):
            continue
        if literals:
            texts.append(entry)
            yield b" ".join(texts), literals
            texts, literals = [], []
        else:
            yield entry, []
    if literals:
        yield b" ".join(texts), literals
