"""Producing MIME messages as a stream of bytes.

Theory of operation. A message is a tree of parts; leaves carry a body *generator* (a function
returning an iterator of already transfer-encoded bytes), so nothing is read before the stream
is consumed and nothing large is ever held: a file attachment is read in chunks of
``57 × 1024`` bytes, each becoming 1024 base64 lines of 76 characters (RFC 2045 §6.8). The
output uses CRLF everywhere (RFC 5322 canonical form); the SMTP driver only dot-stuffs it.

Boundaries are ``=_ms_`` followed by 32 random hex digits: ``=_`` can appear neither in base64
nor in quoted-printable output, so no body can contain a delimiter.
"""

from __future__ import annotations

import binascii
import io
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

from ._headers import CRLF, params_header, raw_header_line

__all__ = ["Leaf", "MessageStream", "Multipart", "base64_body", "render", "text_body"]

RAW_CHUNK = 57 * 1024
_CRLF = b"\r\n"


def new_boundary() -> str:
    """A boundary no encoded body can contain."""
    return "=_ms_" + secrets.token_hex(16)


def _encode_b64(data: bytes | bytearray | memoryview) -> bytes:
    enc = binascii.b2a_base64(data, newline=False)
    lines = [enc[i : i + 76] for i in range(0, len(enc), 76)]
    lines.append(b"")
    return _CRLF.join(lines)


def base64_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Base64 of a byte stream given in chunks of any size, as CRLF-terminated 76-column lines.

    Input is regrouped into multiples of 57 bytes so that every line but the last is full.
    """
    pending = bytearray()
    for chunk in chunks:
        pending += chunk
        if len(pending) >= RAW_CHUNK:
            n = len(pending) - len(pending) % 57
            with memoryview(pending) as view:
                out = _encode_b64(view[:n])
            del pending[:n]
            yield out
    if pending:
        yield _encode_b64(pending)


def read_chunks(source: BinaryIO, size: int = RAW_CHUNK) -> Iterator[bytes]:
    """The content of a binary file object, chunk by chunk."""
    while True:
        chunk = source.read(size)
        if not chunk:
            return
        if not isinstance(chunk, (bytes, bytearray)):
            raise TypeError("the source must be opened in binary mode")
        yield bytes(chunk)


def base64_body(chunks: Callable[[], Iterable[bytes]]) -> Callable[[], Iterator[bytes]]:
    """A leaf body: the base64 of what ``chunks()`` yields, produced lazily."""

    def body() -> Iterator[bytes]:
        return base64_lines(chunks())

    return body


def text_body(text: str, charset: str = "utf-8") -> Callable[[], Iterator[bytes]]:
    """A leaf body: ``text`` in quoted-printable, CRLF line ends."""
    normalized = text.replace("\r\n", "\n").replace("\r", "\n")
    data = binascii.b2a_qp(normalized.encode(charset), istext=True)
    data = data.replace(b"\n", _CRLF)
    if not data.endswith(_CRLF):
        data += _CRLF

    def body() -> Iterator[bytes]:
        yield data

    return body


def bytes_body(data: bytes) -> Callable[[], Iterator[bytes]]:
    """A leaf body already in wire form (7-bit, CRLF line ends)."""
    if not data.endswith(_CRLF):
        data += _CRLF

    def body() -> Iterator[bytes]:
        yield data

    return body


@dataclass
class Leaf:
    """A body part: its header lines (wire form, CRLF-terminated) and its body generator."""

    headers: list[str]
    body: Callable[[], Iterator[bytes]]


@dataclass
class Multipart:
    """A multipart entity: ``subtype``, extra Content-Type parameters and its parts."""

    subtype: str
    parts: list[Leaf | Multipart]
    params: list[tuple[str, str]] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    boundary: str = field(default_factory=new_boundary)

    def content_type(self) -> str:
        return params_header(
            "Content-Type",
            f"multipart/{self.subtype}",
            [*self.params, ("boundary", self.boundary)],
        )


def leaf(
    media_type: str,
    body: Callable[[], Iterator[bytes]],
    *,
    encoding: str,
    params: list[tuple[str, str]] | None = None,
    disposition: str | None = None,
    filename: str | None = None,
    charset: str = "utf-8",
    extra: list[str] | None = None,
) -> Leaf:
    """A leaf with its Content-Type / Content-Disposition / Content-Transfer-Encoding."""
    ct_params = list(params or [])
    if filename is not None:
        ct_params.append(("name", filename))
    headers = [params_header("Content-Type", media_type, ct_params, charset=charset)]
    if disposition is not None:
        d_params = [("filename", filename)] if filename is not None else []
        headers.append(params_header("Content-Disposition", disposition, d_params, charset=charset))
    headers.append(raw_header_line("Content-Transfer-Encoding", encoding))
    headers.extend(extra or [])
    return Leaf(headers, body)


def _emit(part: Leaf | Multipart, top: bool) -> Iterator[bytes]:
    if isinstance(part, Leaf):
        if not top:
            yield "".join(part.headers).encode("ascii") + _CRLF
        yield from part.body()
        return
    if not top:
        yield ("".join(part.headers) + part.content_type()).encode("ascii") + _CRLF
    delimiter = b"--" + part.boundary.encode("ascii")
    if top:
        yield b"This is a multi-part message in MIME format." + _CRLF
    for child in part.parts:
        yield delimiter + _CRLF
        yield from _emit(child, False)
    yield delimiter + b"--" + _CRLF


def render(headers: list[str], body: Leaf | Multipart) -> Iterator[bytes]:
    """The whole message: top-level header lines, then the body tree."""
    if isinstance(body, Leaf):
        top = [*headers, "MIME-Version: 1.0" + CRLF, *body.headers]
    else:
        top = [*headers, *body.headers, "MIME-Version: 1.0" + CRLF, body.content_type()]
    yield "".join(top).encode("ascii") + _CRLF
    yield from _emit(body, True)


class MessageStream(io.RawIOBase):
    """A mail message produced on demand: ``read(n)`` like a file, or :meth:`iter_chunks`.

    ``message_id`` is the bare ``id@host`` of the Message-ID field; ``headers`` the top-level
    fields as they were given (decoded), for the caller's records. The stream can be consumed
    once. Memory stays bounded whatever the size of the attachments, as long as the caller
    reads in bounded amounts (``read()`` without a size reads everything into memory).
    """

    def __init__(
        self, chunks: Iterator[bytes], *, message_id: str, headers: Mapping[str, str]
    ) -> None:
        super().__init__()
        self._chunks = chunks
        self._pending = b""
        self._offset = 0
        self.message_id = message_id
        self.headers: Mapping[str, str] = dict(headers)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        while self._offset >= len(self._pending):
            nxt = next(self._chunks, None)
            if nxt is None:
                return 0
            self._pending, self._offset = nxt, 0
        n = min(len(view), len(self._pending) - self._offset)
        view[:n] = self._pending[self._offset : self._offset + n]
        self._offset += n
        return n

    def iter_chunks(self) -> Iterator[bytes]:
        """The remaining bytes as chunks of varying size (at most about 80 KiB each)."""
        if self._offset < len(self._pending):
            rest = self._pending[self._offset :]
            self._pending, self._offset = b"", 0
            yield rest
        yield from self._chunks

    def write_to(self, out: BinaryIO) -> int:
        """Write the remaining bytes to ``out``; return how many."""
        total = 0
        for chunk in self.iter_chunks():
            out.write(chunk)
            total += len(chunk)
        return total
