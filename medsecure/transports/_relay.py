"""Relay transports: :class:`RelayTransport` (on ``httpx.Client``) and its async twin
:class:`AsyncRelayTransport` (on ``httpx.AsyncClient``).

Theory of operation
-------------------
Every request is signed with the caller's identity (see :mod:`medsecure.relay._signing`); the
identity's self-signed key bundle is published on a relay before the first request to it, and
again if the relay answers ``unknown-key``.

* ``deliver`` streams the envelope (never read whole: its digest is computed in a first pass
  over the file, then the file is streamed again as the body) to
  ``PUT /v1/mailboxes/{mailbox}/messages/{message id}``. The message id is the idempotency key:
  a retry after a lost answer gets the first answer, never a second copy.
* Timeouts, connection failures, 5xx and 429 are retried with exponential backoff and jitter,
  honouring ``Retry-After``; each attempt is signed anew (new nonce) but names the same message.
  When the attempts are spent the error is :class:`TransportUnavailable` (the outbox retries
  later); a refusal that retrying cannot change is :class:`DeliveryRejected`.
* ``fetch`` returns a reader that resumes an interrupted download with ``Range`` and
  ``If-Range`` (the relay's ETag is the body's digest, so a resumed body is the same body).
* ``acknowledge`` names the message id (``DELETE``), so repeating it never removes another
  envelope.

The two classes share everything but the I/O: the request plans, the response classification
and the backoff are pure functions of :class:`_Core`; the sync and async drivers are the same
code line for line (a test suite runs against both).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import ipaddress
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import anyio
import httpx

from .._errors import (
    DeliveryRejected,
    IdentityError,
    StorageError,
    TransportError,
    TransportUnavailable,
)
from .._identity import Identity
from ..models import Endpoint
from ..relay._bundle import MAX_BUNDLE_BYTES, KeyBundle, sign_bundle
from ..relay._digest import EMPTY_DIGEST, StreamDigest
from ..relay._problems import parse_problem
from ..relay._signing import sign_request
from ._base import AsyncTransport, Incoming, Transport

__all__ = ["AsyncRelayTransport", "RelayTransport", "UploadState"]

log = logging.getLogger("medsecure.transports.relay")

_WARNED: set[str] = set()
_FP_RE = re.compile(r"ms1[a-z2-7]{52}")
_MID_RE = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")
_CURSOR_RE = re.compile(r"[0-9]{1,18}\.ms1[a-z2-7]{52}")
#: Pages of a key look-up by identifier read at most (a relay pages 100 bundles at a time).
_MAX_KEY_PAGES = 50
_CHUNK = 1 << 20
_MAX_JSON = 8 << 20
_SPOOL = 8 << 20
# Refusals that retrying cannot change (the outbox moves on to the next endpoint).
_REJECTED = {
    "bad-request",
    "digest-mismatch",
    "forbidden",
    "sender-not-allowed",
    "message-id-conflict",
    "length-required",
    "envelope-too-large",
    "signature-invalid",
    "not-found",
    "method-not-allowed",
    "unsupported-media-type",
}


@dataclass(frozen=True)
class UploadState:
    """What a relay says about one of the caller's uploads: ``waiting`` (not collected yet),
    ``collected`` or ``expired`` (deleted uncollected after the retention time)."""

    mailbox: str
    message_id: str
    state: str
    state_at: int


@dataclass(frozen=True)
class _Verdict:
    """What to do with one answer: ``ok``, ``retry`` (after ``wait`` s, None = backoff),
    ``publish`` (publish the key bundle, then retry) or ``fail`` (raise ``error``)."""

    action: str
    wait: float | None = None
    error: Exception | None = None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Core:
    """Everything of a relay transport but the I/O (shared by the sync and async drivers)."""

    def __init__(
        self,
        identity: Identity,
        url: str,
        *,
        identifiers: Sequence[str],
        statements: Sequence[Any],
        retries: int,
        backoff: float,
        max_backoff: float,
        max_retry_after: float,
    ) -> None:
        if not isinstance(identity, Identity):
            raise TypeError("identity must be an Identity")
        if retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("retries and backoff must not be negative")
        self.identity = identity
        self.url = self.base(url)
        self.mailbox = identity.fingerprint
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        self._identifiers = tuple(identifiers)
        self._statements = tuple(statements)
        self._bundle: KeyBundle | None = None
        self.published: set[str] = set()
        self._warned: set[str] = set()

    def base(self, url: str) -> str:
        if not isinstance(url, str):
            raise TypeError("a relay URL is a str")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("a relay URL is http(s)://host[:port][/prefix]")
        if parts.scheme == "http" and not _loopback(parts.hostname) and url not in _WARNED:
            _WARNED.add(url)
            log.warning(
                "relay %s is used over plain http: use https beyond loopback", parts.hostname
            )
        return url.rstrip("/")

    def bundle(self) -> KeyBundle:
        if self._bundle is None:
            self._bundle = sign_bundle(
                self.identity, identifiers=self._identifiers, statements=self._statements
            )
        return self._bundle

    # -- URLs ------------------------------------------------------------------------------
    def message_url(self, base: str, mailbox: str, message_id: str) -> str:
        return f"{base}/v1/mailboxes/{mailbox}/messages/{message_id}"

    def endpoint_target(self, endpoint: Endpoint, message_id: str) -> tuple[str, str]:
        if endpoint.kind != "relay" or not endpoint.url or not endpoint.mailbox:
            raise DeliveryRejected(f"RelayTransport cannot deliver to a {endpoint.kind} endpoint")
        if not _MID_RE.fullmatch(message_id):
            raise ValueError("malformed message id")
        if not _FP_RE.fullmatch(endpoint.mailbox):
            raise DeliveryRejected("the relay endpoint names a malformed mailbox")
        try:
            base = self.base(endpoint.url)
        except ValueError as exc:
            raise DeliveryRejected("the relay endpoint has a malformed URL") from exc
        return base, self.message_url(base, endpoint.mailbox, message_id)

    def headers(self, method: str, url: str, digest: bytes = EMPTY_DIGEST) -> dict[str, str]:
        return sign_request(self.identity, method, url, digest)

    # -- answers ---------------------------------------------------------------------------
    def delay(self, attempt: int) -> float:
        """Exponential backoff with jitter (attempt 0 is the first retry)."""
        ceiling = min(self.max_backoff, self.backoff * 2.0 ** min(attempt, 30))
        return ceiling * (0.5 + random.random() / 2)

    def classify(
        self, status: int, headers: httpx.Headers, body: bytes, ok: tuple[int, ...]
    ) -> _Verdict:
        if status in ok:
            return _Verdict("ok")
        slug = parse_problem(body) if body else None
        what = f"the relay answered {status}" + (f" ({slug})" if slug else "")
        if status == 429 or status >= 500:
            wait = _retry_after(headers.get("retry-after"))
            if wait is not None and wait > self.max_retry_after:
                return _Verdict(
                    "fail", error=TransportUnavailable(f"{what}; retry after {int(wait)} s")
                )
            if status == 507:
                return _Verdict("fail", error=TransportUnavailable(f"{what}: the mailbox is full"))
            return _Verdict("retry", wait, TransportUnavailable(what))
        if slug == "unknown-key":
            return _Verdict("publish", error=TransportUnavailable(what))
        if slug in ("nonce-replayed",):
            return _Verdict("retry", 0.0, TransportUnavailable(what))
        if slug == "signature-expired":
            return _Verdict(
                "fail", error=TransportUnavailable(f"{what}: is this computer's clock right?")
            )
        if slug in _REJECTED or slug is None:
            return _Verdict("fail", error=DeliveryRejected(what))
        return _Verdict("fail", error=TransportUnavailable(what))

    def waiting(self, body: bytes) -> list[Incoming]:
        doc = _json(body)
        out = []
        items = doc.get("messages") if isinstance(doc, dict) else None
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            mid, size = item.get("message_id"), item.get("size")
            if not isinstance(mid, str) or not _MID_RE.fullmatch(mid):
                continue
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                continue
            out.append(Incoming(handle=mid, message_id=mid, size=size))
        return out

    def states(self, body: bytes) -> list[UploadState]:
        doc = _json(body)
        out = []
        items = doc.get("uploads") if isinstance(doc, dict) else None
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, dict):
                continue
            mb, mid, state, at = (
                item.get("mailbox"),
                item.get("message_id"),
                item.get("state"),
                item.get("state_at"),
            )
            if (
                isinstance(mb, str)
                and _FP_RE.fullmatch(mb)
                and isinstance(mid, str)
                and _MID_RE.fullmatch(mid)
                and state in ("waiting", "collected", "expired")
                and isinstance(at, int)
            ):
                out.append(UploadState(mb, mid, str(state), at))
        return out

    def keys_url(
        self, base: str, fingerprint: str | None, identifier: str | None, after: str | None = None
    ) -> str:
        if (fingerprint is None) == (identifier is None):
            raise ValueError("give a fingerprint or an identifier")
        if fingerprint is not None:
            if not _FP_RE.fullmatch(fingerprint):
                raise ValueError("not an ms1… fingerprint")
            return f"{base}/v1/keys/{fingerprint}"
        query = {"identifier": identifier} | ({"after": after} if after is not None else {})
        return f"{base}/v1/keys?" + urllib.parse.urlencode(query)

    def next_keys(self, status: int, body: bytes, pages: int) -> str | None:
        """The cursor of the next page of a look-up by identifier (None: that was the last),
        after ``pages`` pages. A relay answers every claim of an identifier, a page at a time;
        an answer cut short would hide whoever is on the pages not read, so past
        ``_MAX_KEY_PAGES`` the look-up fails instead of answering in part."""
        if status != 200:
            return None
        doc = _json(body)
        cursor = doc.get("next") if isinstance(doc, dict) else None
        if not isinstance(cursor, str) or not _CURSOR_RE.fullmatch(cursor):
            return None
        if pages >= _MAX_KEY_PAGES:
            raise TransportError(
                f"the relay lists more than {pages} pages of key bundles claiming this"
                " identifier: refusing an incomplete answer"
            )
        return cursor

    def bundles(self, status: int, body: bytes, fingerprint: str | None) -> list[KeyBundle]:
        """Parse what a key lookup returned; bundles that do not verify are skipped."""
        if status == 404:
            return []
        if fingerprint is not None:
            raws = [body]
        else:
            doc = _json(body)
            items = doc.get("bundles") if isinstance(doc, dict) else None
            raws = []
            for text in items if isinstance(items, list) else []:
                if isinstance(text, str) and len(text) < 2 * MAX_BUNDLE_BYTES:
                    with contextlib.suppress(ValueError):
                        raws.append(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        out = []
        for raw in raws:
            try:
                bundle = KeyBundle.parse(raw)
            except IdentityError:
                log.warning("skipping a key bundle from the relay that does not verify")
                continue
            if fingerprint is None or bundle.fingerprint == fingerprint:
                out.append(bundle)
        return out

    def item_url(self, item: Incoming) -> str:
        if not isinstance(item, Incoming) or not _MID_RE.fullmatch(item.handle):
            raise ValueError("not an item of this transport")
        return self.message_url(self.url, self.mailbox, item.handle)

    def states_url(self, base: str, message_ids: Sequence[str]) -> str:
        if not 1 <= len(message_ids) <= 100 or not all(_MID_RE.fullmatch(m) for m in message_ids):
            raise ValueError("give 1 to 100 message ids")
        return f"{base}/v1/uploads?" + urllib.parse.urlencode(
            [("message_id", m) for m in message_ids]
        )


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    value = value.strip()
    if value.isdigit() and len(value) < 10:
        return float(value)
    with contextlib.suppress(TypeError, ValueError, IndexError):
        from email.utils import parsedate_to_datetime

        return max(0.0, float(parsedate_to_datetime(value).timestamp()) - time.time())
    return None


def _json(body: bytes) -> Any:
    if len(body) > _MAX_JSON:
        raise TransportError("the relay's answer is too large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise TransportError("the relay's answer is not valid JSON") from exc


def _decoded(response: httpx.Response, content: bytes) -> httpx.Response:
    """A read answer (its content already decoded by httpx, so without Content-Encoding)."""
    headers = [
        (k, v)
        for k, v in response.headers.multi_items()
        if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")
    ]
    return httpx.Response(response.status_code, headers=headers, content=content)


def _translate(exc: Exception) -> TransportUnavailable:
    return TransportUnavailable(f"relay unreachable: {type(exc).__name__}")


_TRANSIENT_HTTP = (httpx.TransportError, httpx.StreamError)


class _Spooled:
    """A seekable copy of a non-seekable envelope, in a private temporary file."""

    @staticmethod
    def seekable(envelope: BinaryIO) -> tuple[BinaryIO, bool]:
        try:
            envelope.seek(envelope.tell())
            return envelope, False
        except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
            spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL)  # noqa: SIM115 - closed by caller
            shutil.copyfileobj(envelope, spool, _CHUNK)
            spool.seek(0)
            return spool, True  # type: ignore[return-value]


# ==============================================================================================
# sync
# ==============================================================================================


class RelayTransport(Transport):
    """Deliver to relay mailboxes (``Endpoint(kind="relay", url=…, mailbox=…)``) and receive
    from the caller's own mailbox on the relay at ``url``.

    ``client`` may be given (connection reuse, proxies, TLS settings, tests); otherwise one
    ``httpx.Client`` is made and closed with the transport. ``identifiers`` (IDNPS) and
    ``statements`` go into the published key bundle so that others can find the key; they do not
    make it trusted. ``sleep`` is the wait between retries (tests pass a recorder).
    """

    kinds: ClassVar[frozenset[str]] = frozenset({"relay"})

    def __init__(
        self,
        identity: Identity,
        url: str,
        *,
        client: httpx.Client | None = None,
        identifiers: Sequence[str] = (),
        statements: Sequence[Any] = (),
        timeout: float = 30.0,
        retries: int = 6,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_retry_after: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._core = _Core(
            identity,
            url,
            identifiers=identifiers,
            statements=statements,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            max_retry_after=max_retry_after,
        )
        self._own_client = client is None
        self._client = client if client is not None else httpx.Client(timeout=timeout)
        self._sleep = sleep

    @property
    def url(self) -> str:
        """The relay holding this identity's mailbox."""
        return self._core.url

    @property
    def name(self) -> str:
        """``relay:<url>`` (this identity's mailbox on that relay)."""
        return f"relay:{self._core.url}"

    @property
    def mailbox(self) -> str:
        """This identity's mailbox name (its fingerprint)."""
        return self._core.mailbox

    def endpoint(self) -> Endpoint:
        """The endpoint others deliver to, to publish in a directory."""
        return Endpoint(kind="relay", url=self.url, mailbox=self.mailbox)

    def __repr__(self) -> str:
        return f"<RelayTransport {self.url!r} {self.mailbox}>"

    # -- the request loop ------------------------------------------------------------------
    def _send(
        self,
        method: str,
        url: str,
        *,
        ok: tuple[int, ...],
        base: str | None = None,
        body: Callable[[], Any] | None = None,
        digest: bytes = EMPTY_DIGEST,
        size: int = 0,
        extra: dict[str, str] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        core = self._core
        where = base or core.url
        if where not in core.published:
            self.publish(where)
        attempt = 0
        republished = False
        while True:
            headers = core.headers(method, url, digest)
            headers.update(extra or {})
            if body is not None:
                headers["Content-Length"] = str(size)
                headers.setdefault("Content-Type", "application/octet-stream")
            request = self._client.build_request(
                method, url, headers=headers, content=body() if body is not None else None
            )
            try:
                response = self._client.send(request, stream=True)
            except _TRANSIENT_HTTP as exc:
                verdict = _Verdict("retry", None, _translate(exc))
            else:
                if stream and response.status_code in ok:
                    return response
                try:
                    answer = b""
                    for part in response.iter_bytes(_CHUNK):
                        answer += part
                        if len(answer) > _MAX_JSON:
                            raise TransportError("the relay's answer is too large")
                except _TRANSIENT_HTTP as exc:
                    verdict = _Verdict("retry", None, _translate(exc))
                else:
                    verdict = core.classify(response.status_code, response.headers, answer, ok)
                    if verdict.action == "ok":
                        return _decoded(response, answer)
                finally:
                    response.close()
            if verdict.action == "publish" and not republished:
                republished = True
                self.publish(where)
                continue
            if verdict.action != "retry" or attempt >= core.retries:
                assert verdict.error is not None
                raise verdict.error
            self._sleep(verdict.wait if verdict.wait is not None else core.delay(attempt))
            attempt += 1

    def publish(self, base: str | None = None) -> None:
        """Publish this identity's key bundle on a relay (done before the first request)."""
        core = self._core
        where = core.base(base) if base else core.url
        raw = core.bundle().raw
        url = f"{where}/v1/keys/{core.mailbox}"
        core.published.add(where)
        try:
            self._send(
                "PUT",
                url,
                ok=(204,),
                base=where,
                body=lambda: raw,
                digest=StreamDigest.of([raw]).digest(),
                size=len(raw),
                extra={"Content-Type": "application/vnd.medsecure.key-bundle+cbor"},
            )
        except BaseException:
            core.published.discard(where)
            raise

    # -- Transport -------------------------------------------------------------------------
    def deliver(
        self, endpoint: Endpoint, envelope: BinaryIO, *, message_id: str, size: int
    ) -> None:
        base, url = self._core.endpoint_target(endpoint, message_id)
        source, spooled = _Spooled.seekable(envelope)
        try:
            start = source.tell()
            d = StreamDigest()
            while block := source.read(_CHUNK):
                d.update(block)

            def chunks() -> Iterator[bytes]:
                source.seek(start)
                while block := source.read(_CHUNK):
                    yield block

            self._send(
                "PUT", url, ok=(201,), base=base, body=chunks, digest=d.digest(), size=d.size
            )
        finally:
            if spooled:
                source.close()

    def list(self) -> Sequence[Incoming]:
        url = f"{self._core.url}/v1/mailboxes/{self._core.mailbox}/messages"
        return self._core.waiting(self._send("GET", url, ok=(200,)).content)

    def fetch(self, item: Incoming) -> BinaryIO:
        return io.BufferedReader(_Download(self, self._core.item_url(item), item.size), _CHUNK)

    def acknowledge(self, item: Incoming) -> None:
        with contextlib.suppress(DeliveryRejected):  # not-found: already acknowledged
            self._send("DELETE", self._core.item_url(item), ok=(204, 404))

    def upload_states(
        self, message_ids: Sequence[str], *, url: str | None = None
    ) -> Sequence[UploadState]:
        """States of this identity's uploads on a relay (default: its own): whether each was
        collected, is still waiting, or expired uncollected."""
        base = self._core.base(url) if url else self._core.url
        answer = self._send(
            "GET", self._core.states_url(base, list(message_ids)), ok=(200,), base=base
        )
        return self._core.states(answer.content)

    def poll(self, endpoint: Endpoint, message_ids: Sequence[str]) -> dict[str, str]:
        """States of uploads to ``endpoint``'s relay and mailbox (see Transport.poll)."""
        if endpoint.kind != "relay" or not endpoint.url or not message_ids:
            return {}
        return {
            s.message_id: s.state
            for s in self.upload_states(message_ids, url=endpoint.url)
            if s.mailbox == endpoint.mailbox
        }

    def find_keys(
        self,
        *,
        fingerprint: str | None = None,
        identifier: str | None = None,
        url: str | None = None,
    ) -> Sequence[KeyBundle]:
        """Key bundles published on a relay (default: this one) under a fingerprint, or every
        bundle claiming an identifier (IDNPS, ``rpps:…``; read page by page, or
        :class:`TransportError` if there are too many to read). Self-signed only: a trust policy
        decides."""
        base = self._core.base(url) if url else self._core.url
        found: dict[str, KeyBundle] = {}
        after: str | None = None
        pages = 0
        while True:
            target = self._core.keys_url(base, fingerprint, identifier, after)
            answer = self._send("GET", target, ok=(200, 404), base=base)
            for bundle in self._core.bundles(answer.status_code, answer.content, fingerprint):
                found.setdefault(bundle.fingerprint, bundle)
            pages += 1
            if fingerprint is not None:
                return list(found.values())
            after = self._core.next_keys(answer.status_code, answer.content, pages)
            if after is None:
                return list(found.values())

    def close(self) -> None:
        if self._own_client:
            self._client.close()


class _Download(io.RawIOBase):
    """A streamed download that resumes with Range after a broken connection."""

    def __init__(self, transport: RelayTransport, url: str, expected: int | None = None) -> None:
        self._t = transport
        self._url = url
        self._pos = 0
        # the listed size bounds what a (hostile) relay can make us read
        self._expected = expected
        self._size: int | None = None
        self._etag: str | None = None
        self._response: httpx.Response | None = None
        self._chunks: Iterator[bytes] | None = None
        self._pending = b""
        self._failures = 0

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        extra = {"Accept-Encoding": "identity"}
        if self._pos:
            extra["Range"] = f"bytes={self._pos}-"
            if self._etag:
                extra["If-Range"] = self._etag
        response = self._t._send("GET", self._url, ok=(200, 206), extra=extra, stream=True)
        if self._pos and response.status_code != 206:
            response.close()
            raise TransportUnavailable("the relay could not resume the download")
        if self._size is None:
            length = response.headers.get("content-length", "")
            self._size = int(length) if length.isdigit() else self._expected
            if self._expected is not None and self._size != self._expected:
                self._size = None
                response.close()
                raise TransportUnavailable("the relay sent another size than it listed")
            self._etag = response.headers.get("etag")
        self._response = response
        self._chunks = response.iter_raw(_CHUNK)

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        while not self._pending:
            if self._size is not None and self._pos >= self._size:
                return 0
            try:
                if self._chunks is None:
                    self._open()
                assert self._chunks is not None
                self._pending = next(self._chunks)[
                    : self._size - self._pos if self._size is not None else None
                ]
            except StopIteration:
                self._drop()
                if self._size is None:
                    return 0
                self._retry(TransportUnavailable("the download ended early"))
            except _TRANSIENT_HTTP as exc:
                self._drop()
                self._retry(_translate(exc))
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        self._pos += n
        return n

    def _retry(self, error: TransportUnavailable) -> None:
        core = self._t._core
        if self._failures >= core.retries:
            raise error
        self._t._sleep(core.delay(self._failures))
        self._failures += 1

    def _drop(self) -> None:
        if self._response is not None:
            self._response.close()
        self._response = None
        self._chunks = None

    def close(self) -> None:
        self._drop()
        super().close()


# ==============================================================================================
# async (the same driver, awaiting)
# ==============================================================================================


class AsyncRelayTransport(AsyncTransport):
    """The async twin of :class:`RelayTransport` on ``httpx.AsyncClient``: the same methods,
    awaitable; file reads and digests run off the event loop."""

    kinds: ClassVar[frozenset[str]] = frozenset({"relay"})

    def __init__(
        self,
        identity: Identity,
        url: str,
        *,
        client: httpx.AsyncClient | None = None,
        identifiers: Sequence[str] = (),
        statements: Sequence[Any] = (),
        timeout: float = 30.0,
        retries: int = 6,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_retry_after: float = 120.0,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self._core = _Core(
            identity,
            url,
            identifiers=identifiers,
            statements=statements,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            max_retry_after=max_retry_after,
        )
        self._own_client = client is None
        self._client = client if client is not None else httpx.AsyncClient(timeout=timeout)
        self._sleep = sleep

    @property
    def url(self) -> str:
        """The relay holding this identity's mailbox."""
        return self._core.url

    @property
    def name(self) -> str:
        """``relay:<url>`` (this identity's mailbox on that relay)."""
        return f"relay:{self._core.url}"

    @property
    def mailbox(self) -> str:
        """This identity's mailbox name (its fingerprint)."""
        return self._core.mailbox

    def accepts(self, endpoint: Endpoint) -> bool:
        """Whether this transport can deliver to ``endpoint``."""
        return endpoint.kind in self.kinds

    def endpoint(self) -> Endpoint:
        """The endpoint others deliver to, to publish in a directory."""
        return Endpoint(kind="relay", url=self.url, mailbox=self.mailbox)

    def __repr__(self) -> str:
        return f"<AsyncRelayTransport {self.url!r} {self.mailbox}>"

    async def _send(
        self,
        method: str,
        url: str,
        *,
        ok: tuple[int, ...],
        base: str | None = None,
        body: Callable[[], Any] | None = None,
        digest: bytes = EMPTY_DIGEST,
        size: int = 0,
        extra: dict[str, str] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        core = self._core
        where = base or core.url
        if where not in core.published:
            await self.publish(where)
        attempt = 0
        republished = False
        while True:
            # signing with ML-DSA takes about a millisecond: fine on the loop
            headers = core.headers(method, url, digest)
            headers.update(extra or {})
            if body is not None:
                headers["Content-Length"] = str(size)
                headers.setdefault("Content-Type", "application/octet-stream")
            request = self._client.build_request(
                method, url, headers=headers, content=body() if body is not None else None
            )
            try:
                response = await self._client.send(request, stream=True)
            except _TRANSIENT_HTTP as exc:
                verdict = _Verdict("retry", None, _translate(exc))
            else:
                if stream and response.status_code in ok:
                    return response
                try:
                    answer = b""
                    async for part in response.aiter_bytes(_CHUNK):
                        answer += part
                        if len(answer) > _MAX_JSON:
                            raise TransportError("the relay's answer is too large")
                except _TRANSIENT_HTTP as exc:
                    verdict = _Verdict("retry", None, _translate(exc))
                else:
                    verdict = core.classify(response.status_code, response.headers, answer, ok)
                    if verdict.action == "ok":
                        return _decoded(response, answer)
                finally:
                    await response.aclose()
            if verdict.action == "publish" and not republished:
                republished = True
                await self.publish(where)
                continue
            if verdict.action != "retry" or attempt >= core.retries:
                assert verdict.error is not None
                raise verdict.error
            await self._sleep(verdict.wait if verdict.wait is not None else core.delay(attempt))
            attempt += 1

    async def publish(self, base: str | None = None) -> None:
        """Publish this identity's key bundle on a relay (done before the first request)."""
        core = self._core
        where = core.base(base) if base else core.url
        raw = core.bundle().raw
        url = f"{where}/v1/keys/{core.mailbox}"
        core.published.add(where)

        async def once() -> AsyncIterator[bytes]:
            yield raw

        try:
            await self._send(
                "PUT",
                url,
                ok=(204,),
                base=where,
                body=once,
                digest=StreamDigest.of([raw]).digest(),
                size=len(raw),
                extra={"Content-Type": "application/vnd.medsecure.key-bundle+cbor"},
            )
        except BaseException:
            core.published.discard(where)
            raise

    async def deliver(
        self, endpoint: Endpoint, envelope: BinaryIO, *, message_id: str, size: int
    ) -> None:
        """Deliver one envelope (see :meth:`RelayTransport.deliver`)."""
        base, url = self._core.endpoint_target(endpoint, message_id)
        source, spooled = await anyio.to_thread.run_sync(_Spooled.seekable, envelope)
        try:
            start = source.tell()

            def digest() -> StreamDigest:
                d = StreamDigest()
                while block := source.read(_CHUNK):
                    d.update(block)
                return d

            d = await anyio.to_thread.run_sync(digest)

            async def chunks() -> AsyncIterator[bytes]:
                await anyio.to_thread.run_sync(source.seek, start)
                while block := await anyio.to_thread.run_sync(source.read, _CHUNK):
                    yield block

            await self._send(
                "PUT", url, ok=(201,), base=base, body=chunks, digest=d.digest(), size=d.size
            )
        finally:
            if spooled:
                source.close()

    async def list(self) -> Sequence[Incoming]:
        """Envelopes waiting in this identity's mailbox, oldest first."""
        url = f"{self._core.url}/v1/mailboxes/{self._core.mailbox}/messages"
        return self._core.waiting((await self._send("GET", url, ok=(200,))).content)

    def fetch(self, item: Incoming) -> AsyncDownload:
        """A resumable async reader of a waiting envelope (``async with``; ``await read(n)``)."""
        return AsyncDownload(self, self._core.item_url(item), item.size)

    async def take(self, item: Incoming, target: Path) -> None:
        """Download a waiting envelope (resumably) to ``target``: a new 0600 file, fsynced;
        disk writes run off the event loop."""
        fd = await asyncio.to_thread(
            os.open, target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        out = os.fdopen(fd, "wb")
        try:
            async with self.fetch(item) as download:
                async for chunk in download:
                    await asyncio.to_thread(out.write, chunk)
            await asyncio.to_thread(_flush_and_sync, out)
        except OSError as exc:
            out.close()
            target.unlink(missing_ok=True)
            raise StorageError(f"cannot store an incoming envelope: {exc.strerror}") from exc
        except BaseException:
            out.close()
            target.unlink(missing_ok=True)
            raise
        out.close()

    async def acknowledge(self, item: Incoming) -> None:
        """Remove an envelope the receiver has stored durably (by its message id)."""
        with contextlib.suppress(DeliveryRejected):
            await self._send("DELETE", self._core.item_url(item), ok=(204, 404))

    async def upload_states(
        self, message_ids: Sequence[str], *, url: str | None = None
    ) -> Sequence[UploadState]:
        """See :meth:`RelayTransport.upload_states`."""
        base = self._core.base(url) if url else self._core.url
        answer = await self._send(
            "GET", self._core.states_url(base, list(message_ids)), ok=(200,), base=base
        )
        return self._core.states(answer.content)

    async def poll(self, endpoint: Endpoint, message_ids: Sequence[str]) -> dict[str, str]:
        """See :meth:`RelayTransport.poll`."""
        if endpoint.kind != "relay" or not endpoint.url or not message_ids:
            return {}
        return {
            s.message_id: s.state
            for s in await self.upload_states(message_ids, url=endpoint.url)
            if s.mailbox == endpoint.mailbox
        }

    async def find_keys(
        self,
        *,
        fingerprint: str | None = None,
        identifier: str | None = None,
        url: str | None = None,
    ) -> Sequence[KeyBundle]:
        """See :meth:`RelayTransport.find_keys`."""
        base = self._core.base(url) if url else self._core.url
        found: dict[str, KeyBundle] = {}
        after: str | None = None
        pages = 0
        while True:
            target = self._core.keys_url(base, fingerprint, identifier, after)
            answer = await self._send("GET", target, ok=(200, 404), base=base)
            for bundle in self._core.bundles(answer.status_code, answer.content, fingerprint):
                found.setdefault(bundle.fingerprint, bundle)
            pages += 1
            if fingerprint is not None:
                return list(found.values())
            after = self._core.next_keys(answer.status_code, answer.content, pages)
            if after is None:
                return list(found.values())

    async def aclose(self) -> None:
        """Release the HTTP client if this transport made it."""
        if self._own_client:
            await self._client.aclose()

    async def __aenter__(self) -> AsyncRelayTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _flush_and_sync(out: BinaryIO) -> None:
    out.flush()
    os.fsync(out.fileno())


class AsyncDownload:
    """The async twin of the sync transport's resumable download."""

    def __init__(
        self, transport: AsyncRelayTransport, url: str, expected: int | None = None
    ) -> None:
        self._t = transport
        self._url = url
        self._pos = 0
        # the listed size bounds what a (hostile) relay can make us read
        self._expected = expected
        self._size: int | None = None
        self._etag: str | None = None
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._pending = b""
        self._failures = 0

    async def _open(self) -> None:
        extra = {"Accept-Encoding": "identity"}
        if self._pos:
            extra["Range"] = f"bytes={self._pos}-"
            if self._etag:
                extra["If-Range"] = self._etag
        response = await self._t._send("GET", self._url, ok=(200, 206), extra=extra, stream=True)
        if self._pos and response.status_code != 206:
            await response.aclose()
            raise TransportUnavailable("the relay could not resume the download")
        if self._size is None:
            length = response.headers.get("content-length", "")
            self._size = int(length) if length.isdigit() else self._expected
            if self._expected is not None and self._size != self._expected:
                self._size = None
                await response.aclose()
                raise TransportUnavailable("the relay sent another size than it listed")
            self._etag = response.headers.get("etag")
        self._response = response
        self._chunks = response.aiter_raw(_CHUNK)

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (``b""`` at the end); ``n < 0`` reads one chunk."""
        while not self._pending:
            if self._size is not None and self._pos >= self._size:
                return b""
            try:
                if self._chunks is None:
                    await self._open()
                assert self._chunks is not None
                chunk = await self._chunks.__anext__()
                self._pending = chunk[: self._size - self._pos if self._size is not None else None]
            except StopAsyncIteration:
                await self._drop()
                if self._size is None:
                    return b""
                await self._retry(TransportUnavailable("the download ended early"))
            except _TRANSIENT_HTTP as exc:
                await self._drop()
                await self._retry(_translate(exc))
        take = len(self._pending) if n < 0 else min(n, len(self._pending))
        data, self._pending = self._pending[:take], self._pending[take:]
        self._pos += len(data)
        return data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while data := await self.read():
            yield data

    async def _retry(self, error: TransportUnavailable) -> None:
        core = self._t._core
        if self._failures >= core.retries:
            raise error
        await self._t._sleep(core.delay(self._failures))
        self._failures += 1

    async def _drop(self) -> None:
        if self._response is not None:
            await self._response.aclose()
        self._response = None
        self._chunks = None

    async def aclose(self) -> None:
        """Stop the download."""
        await self._drop()

    async def __aenter__(self) -> AsyncDownload:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
