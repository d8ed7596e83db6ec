"""A strict, streaming MIME walker with bounded memory.

Theory of operation. ``email.message_from_bytes`` holds the whole message (and every decoded
part) in memory, and ``BytesFeedParser`` keeps each part's body as a list of lines until the
part ends, so neither is usable for a 200 MiB attachment. This walker reads the message once,
in chunks of 64 KiB:

* header blocks (the message's and each part's) are read line by line, bounded in size, and
  handed to the ``email`` package (``compat32`` policy) to be split into fields — that part of
  the standard library is small-input safe;
* bodies are scanned in bulk for a delimiter line (``CRLF "--" boundary``, RFC 2046 §5.1.1) of
  any enclosing multipart, and streamed through a transfer decoder (base64, quoted-printable
  or identity) into a sink chosen by the caller's handler; the buffer never holds more than a
  chunk plus one line.

It is strict where sloppiness could hide an attack or lose data: a body line longer than
``max_line``, a header block larger than its limit, more parts or deeper nesting than allowed,
a boundary that is missing, malformed or reused by a nested multipart, an enclosing boundary
inside an unterminated inner part, a missing close delimiter, invalid base64 or an unknown
transfer encoding all raise :class:`MailFormatError`. Both CRLF and bare LF line ends are
accepted (Maildir files use LF).
"""

from __future__ import annotations

import binascii
import email.parser
import re
from collections.abc import Callable
from dataclasses import dataclass
from email._policybase import Compat32
from email.message import Message
from email.utils import collapse_rfc2231_value
from typing import BinaryIO, Protocol

from ._errors import MailFormatError
from ._headers import decode_filename

__all__ = ["MailLimits", "PartInfo", "walk"]

READ_SIZE = 64 * 1024
_BCHARS = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_HEADER_LINE = re.compile(rb"[!-9;-~]+[ \t]*:|[ \t]")


@dataclass(frozen=True)
class MailLimits:
    """Bounds applied to every parsed message (hostile input stays cheap)."""

    max_message_bytes: int = 1 << 30
    """The raw message, all included (1 GiB: a 200 MiB envelope is about 274 MiB in base64)."""
    max_header_bytes: int = 256 * 1024
    """The message's header block (many ``Received:`` lines fit)."""
    max_part_header_bytes: int = 16 * 1024
    max_line: int = 16 * 1024
    """Any line, header or body (RFC 5322 says 998; real mailers exceed it in HTML parts)."""
    max_parts: int = 256
    max_depth: int = 8
    max_report_part: int = 256 * 1024
    """A delivery-status or disposition-notification part."""
    max_text: int = 256 * 1024
    """The first text/plain part kept for the caller (longer text is truncated)."""


@dataclass(frozen=True)
class PartInfo:
    """What the handler learns about a leaf part before its body is read."""

    headers: Message
    media_type: str
    filename: str | None
    disposition: str | None
    parents: tuple[str, ...]
    """Media types of the enclosing multiparts, outermost first."""
    report_type: str | None
    """``report-type`` of the nearest enclosing multipart/report, lower-cased."""


@dataclass(frozen=True)
class _Place:
    """Where an entity stands in the message: the boundaries of the enclosing multiparts (one
    list, shared down the tree), their media types, and the nearest report type."""

    stack: list[bytes]
    parents: tuple[str, ...]
    report_type: str | None


class Sink(Protocol):
    """Receives a leaf's decoded bytes."""

    def write(self, data: bytes) -> object: ...


Handler = Callable[[PartInfo], Sink | None]


class _Source:
    def __init__(self, stream: BinaryIO, limits: MailLimits) -> None:
        self._stream = stream
        self.buf = bytearray()
        self.eof = False
        self.total = 0
        self._max = limits.max_message_bytes

    def fill(self) -> bool:
        if self.eof:
            return False
        chunk = self._stream.read(READ_SIZE)
        if not chunk:
            self.eof = True
            return False
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError("the message must be read from a binary stream")
        self.total += len(chunk)
        if self.total > self._max:
            raise MailFormatError(f"the message is larger than {self._max} bytes")
        self.buf += chunk
        return True

    def readline(self, limit: int) -> bytes:
        start = 0
        while True:
            i = self.buf.find(b"\n", start)
            if i >= 0:
                if i + 1 > limit:
                    raise MailFormatError(f"a line is longer than {limit} bytes")
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return line
            if len(self.buf) > limit:
                raise MailFormatError(f"a line is longer than {limit} bytes")
            start = len(self.buf)
            if not self.fill():
                line = bytes(self.buf)
                self.buf.clear()
                return line


class _Decoder:
    def __init__(self, sink: Sink | None, cap: int | None, truncate: bool) -> None:
        self.sink = sink
        self.size = 0
        self.truncated = False
        self._cap = cap
        self._truncate = truncate

    def out(self, data: bytes) -> None:
        if not data:
            return
        if self._cap is not None and self.size + len(data) > self._cap:
            if not self._truncate:
                raise MailFormatError(f"a report part is larger than {self._cap} bytes")
            data = data[: max(0, self._cap - self.size)]
            self.truncated = True
        self.size += len(data)
        if self.sink is not None and data:
            self.sink.write(data)

    def feed(self, data: bytes) -> None:
        self.out(data)

    def close(self) -> None:
        pass


class _Base64(_Decoder):
    _WS = b" \t\r\n"

    def __init__(self, sink: Sink | None, cap: int | None, truncate: bool) -> None:
        super().__init__(sink, cap, truncate)
        self._carry = b""
        self._done = False

    def feed(self, data: bytes) -> None:
        data = self._carry + data.translate(None, self._WS)
        if not data:
            return
        if self._done:
            raise MailFormatError("invalid base64 body: data after the final padding")
        n = len(data) - len(data) % 4
        if n:
            block = data[:n]
            try:
                self.out(binascii.a2b_base64(block, strict_mode=True))
            except binascii.Error as exc:
                raise MailFormatError("invalid base64 body") from exc
            if block.endswith(b"="):
                self._done = True
        self._carry = data[n:]
        if self._done and self._carry:
            raise MailFormatError("invalid base64 body: data after the final padding")

    def close(self) -> None:
        if self._carry:
            raise MailFormatError("invalid base64 body: truncated")


class _QuotedPrintable(_Decoder):
    def __init__(self, sink: Sink | None, cap: int | None, truncate: bool) -> None:
        super().__init__(sink, cap, truncate)
        self._carry = b""

    def feed(self, data: bytes) -> None:
        data = self._carry + data
        last = data.rfind(b"\n")
        if last < 0:
            self._carry = data
            return
        self.out(binascii.a2b_qp(data[: last + 1]))
        self._carry = data[last + 1 :]

    def close(self) -> None:
        if self._carry:
            self.out(binascii.a2b_qp(self._carry))
            self._carry = b""


_DECODERS: dict[str, type[_Decoder]] = {
    "7bit": _Decoder,
    "8bit": _Decoder,
    "binary": _Decoder,
    "base64": _Base64,
    "quoted-printable": _QuotedPrintable,
}


@dataclass
class Decision:
    """What the handler wants done with a leaf's body."""

    sink: Sink | None
    cap: int | None = None
    truncate: bool = False


DecisionHandler = Callable[[PartInfo], Decision]


@dataclass
class LeafResult:
    """A leaf after its body was read."""

    info: PartInfo
    size: int
    truncated: bool


class _RawValues(Compat32):
    """``compat32`` that hands back header values as stored: 8-bit bytes stay
    surrogate-escaped (decoded later as UTF-8 or ISO-8859-1) instead of becoming U+FFFD."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        return value


_POLICY = _RawValues()


def parse_header_block(block: bytes) -> Message:
    """Split a header block into fields (``compat32``: lenient, never raises on content)."""
    for line in block.splitlines():
        if line and not _HEADER_LINE.match(line):
            raise MailFormatError("malformed header line (no field name)")
    parser = email.parser.BytesHeaderParser(policy=_POLICY)
    try:
        return parser.parsebytes(block + b"\r\n")
    except (ValueError, TypeError, IndexError, LookupError) as exc:
        raise MailFormatError("malformed header block") from exc


def media_type_of(msg: Message) -> str:
    """The lower-cased media type (``text/plain`` when absent or malformed, RFC 2045 §5.2)."""
    value = msg.get("Content-Type")
    if value is None:
        return "text/plain"
    main = str(value).split(";", 1)[0].strip().lower()
    if main.count("/") != 1 or not re.fullmatch(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+", main):
        return "text/plain"
    return main


def param_of(msg: Message, name: str, header: str = "content-type") -> str | None:
    """A MIME parameter as text (RFC 2231 decoded), or None."""
    try:
        value = msg.get_param(name, header=header)
    except (ValueError, TypeError, IndexError, LookupError):
        return None
    if value is None or value == "":
        return None if value is None else ""
    if isinstance(value, tuple):
        try:
            return collapse_rfc2231_value(value)
        except (LookupError, UnicodeError, ValueError):
            return None
    return str(value)


class _Walker:
    def __init__(self, src: _Source, limits: MailLimits, handler: DecisionHandler) -> None:
        self.src = src
        self.limits = limits
        self.handler = handler
        self.parts = 0
        self.leaves: list[LeafResult] = []
        self._carry = 0

    # -- bodies ----------------------------------------------------------------------------

    def _check_lines(self, data: bytes) -> None:
        limit = self.limits.max_line
        first = data.find(b"\n")
        if first < 0:
            self._carry += len(data)
            if self._carry > limit:
                raise MailFormatError(f"a line is longer than {limit} bytes")
            return
        if self._carry + first + 1 > limit:
            raise MailFormatError(f"a line is longer than {limit} bytes")
        last = data.rfind(b"\n")
        if last > first and last - first > limit:
            longest = max(map(len, data[first + 1 : last].split(b"\n")))
            if longest + 1 > limit:
                raise MailFormatError(f"a line is longer than {limit} bytes")
        self._carry = len(data) - last - 1

    def _emit(self, data: bytes, feed: Callable[[bytes], None]) -> None:
        if data:
            self._check_lines(data)
            feed(data)

    def scan(
        self, boundaries: list[bytes], feed: Callable[[bytes], None]
    ) -> tuple[int, bool] | None:
        """Stream body bytes to ``feed`` until a delimiter line of one of ``boundaries`` (the
        index of the matching boundary and whether it closes), or None at end of input."""
        src = self.src
        buf = src.buf
        at_start = True
        self._carry = 0
        while True:
            if not boundaries:
                if buf:
                    data = bytes(buf)
                    buf.clear()
                    self._emit(data, feed)
                if not src.fill():
                    return None
                continue
            found = self._find(buf, boundaries, at_start)
            if found is not None:
                kind, a, b, idx, close = found
                if kind == "delimiter":
                    data = bytes(buf[:a])
                    del buf[: b + 1]
                    self._emit(data, feed)
                    return idx, close
                # need more data: emit up to the start of the candidate's line
                if a > 0:
                    data = bytes(buf[:a])
                    del buf[:a]
                    self._emit(data, feed)
                    at_start = False
            else:
                last = buf.rfind(b"\n")
                if len(buf) - last - 1 > self.limits.max_line:
                    raise MailFormatError(f"a line is longer than {self.limits.max_line} bytes")
                if last >= 0:
                    cut = last - 1 if last > 0 and buf[last - 1] == 0x0D else last
                    if cut > 0:
                        data = bytes(buf[:cut])
                        del buf[:cut]
                        self._emit(data, feed)
                        at_start = False
            if not src.fill():
                if buf and not buf.endswith(b"\n"):
                    # a last delimiter line without its line break ("--b--" then EOF)
                    buf += b"\n"
                    continue
                if buf:
                    data = bytes(buf)
                    buf.clear()
                    self._emit(data, feed)
                return None

    def _find(
        self, buf: bytearray, boundaries: list[bytes], at_start: bool
    ) -> tuple[str, int, int, int, bool] | None:
        """Look for a delimiter line. Returns ("delimiter", data_end, line_end, idx, close),
        ("more", keep_from, 0, 0, False) when a candidate line is incomplete, or None."""
        if at_start and buf.startswith(b"--"):
            cand = 0
        else:
            i = buf.find(b"\n--")
            cand = i + 1 if i >= 0 else -1
        while cand >= 0:
            eol = buf.find(b"\n", cand)
            if cand == 0:
                data_end = 0
            else:
                data_end = cand - 1
                if data_end > 0 and buf[data_end - 1] == 0x0D:
                    data_end -= 1
            if eol < 0:
                if len(buf) - cand > self.limits.max_line:
                    raise MailFormatError(f"a line is longer than {self.limits.max_line} bytes")
                return ("more", data_end, 0, 0, False)
            line = bytes(buf[cand + 2 : eol]).rstrip(b" \t\r")
            for idx in range(len(boundaries) - 1, -1, -1):
                b = boundaries[idx]
                if line == b:
                    return ("delimiter", data_end, eol, idx, False)
                if line == b + b"--":
                    return ("delimiter", data_end, eol, idx, True)
            i = buf.find(b"\n--", cand)
            cand = i + 1 if i >= 0 else -1
        return None

    # -- structure -------------------------------------------------------------------------

    def read_headers(self, limit: int) -> Message:
        block = bytearray()
        while True:
            line = self.src.readline(self.limits.max_line)
            if not line or line in (b"\r\n", b"\n"):
                break
            block += line
            if len(block) > limit:
                raise MailFormatError(f"a header block is larger than {limit} bytes")
        return parse_header_block(bytes(block))

    def entity(self, headers: Message, at: _Place) -> tuple[int, bool] | None:
        media_type = media_type_of(headers)
        if media_type.startswith("multipart/"):
            return self._multipart(headers, media_type, at)
        return self._leaf(headers, media_type, at)

    def _multipart(self, headers: Message, media_type: str, at: _Place) -> tuple[int, bool] | None:
        stack, report_type = at.stack, at.report_type
        if len(at.parents) >= self.limits.max_depth:
            raise MailFormatError(f"multipart nesting deeper than {self.limits.max_depth}")
        boundary = param_of(headers, "boundary")
        if boundary is None or not _BCHARS.fullmatch(boundary):
            raise MailFormatError("a multipart has a missing or malformed boundary")
        raw = boundary.encode("ascii")
        if raw in stack:
            raise MailFormatError("a nested multipart reuses an enclosing boundary")
        if media_type == "multipart/report":
            report_type = (param_of(headers, "report-type") or "").lower() or None
        stack.append(raw)
        level = len(stack) - 1
        inner = _Place(stack, (*at.parents, media_type), report_type)
        preamble = self.scan(stack, _discard)
        if _closes(preamble, level, "a multipart has no delimiter (truncated message?)"):
            raise MailFormatError("a multipart has no body part")
        while True:
            self.parts += 1
            if self.parts > self.limits.max_parts:
                raise MailFormatError(f"more than {self.limits.max_parts} MIME parts")
            part_headers = self.read_headers(self.limits.max_part_header_bytes)
            found = self.entity(part_headers, inner)
            if _closes(found, level, "a multipart is not terminated (truncated message?)"):
                break
        stack.pop()
        return self.scan(stack, _discard)  # the epilogue, up to the parent's next delimiter

    def _leaf(self, headers: Message, media_type: str, at: _Place) -> tuple[int, bool] | None:
        cte = str(headers.get("Content-Transfer-Encoding", "7bit")).strip().lower()
        decoder_type = _DECODERS.get(cte)
        if decoder_type is None:
            raise MailFormatError("unknown Content-Transfer-Encoding")
        disposition = headers.get("Content-Disposition")
        disp = str(disposition).split(";", 1)[0].strip().lower() if disposition else None
        info = PartInfo(
            headers=headers,
            media_type=media_type,
            filename=decode_filename(headers),
            disposition=disp,
            parents=at.parents,
            report_type=at.report_type,
        )
        decision = self.handler(info)
        decoder = decoder_type(decision.sink, decision.cap, decision.truncate)
        found = self.scan(at.stack, decoder.feed)
        decoder.close()
        self.leaves.append(LeafResult(info, decoder.size, decoder.truncated))
        return found


def _closes(found: tuple[int, bool] | None, level: int, missing: str) -> bool:
    """Whether the delimiter a scan ended on closes the multipart at ``level``; it must be that
    multipart's own (``missing`` says what it means when there is none)."""
    if found is None:
        raise MailFormatError(missing)
    idx, close = found
    if idx != level:
        raise MailFormatError("misnested multipart boundaries")
    return close


def _discard(data: bytes) -> None:
    return None


def walk(
    stream: BinaryIO, handler: DecisionHandler, limits: MailLimits | None = None
) -> tuple[Message, list[LeafResult]]:
    """Walk a raw message once; ``handler`` chooses the sink of every leaf part. Returns the
    top-level header fields and the leaves in order."""
    limits = limits or MailLimits()
    src = _Source(stream, limits)
    walker = _Walker(src, limits, handler)
    top = walker.read_headers(limits.max_header_bytes)
    if not top.keys():
        raise MailFormatError("not a mail message: no header fields")
    found = walker.entity(top, _Place([], (), None))
    if found is not None:  # pragma: no cover - no boundary is active at top level
        raise MailFormatError("unexpected delimiter at top level")
    return top, walker.leaves
