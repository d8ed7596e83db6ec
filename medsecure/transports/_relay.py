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
  later); a refusal that retrying cannot change is :class:`DeliveryRejected`, raised at once:
  among them a configuration to fix (a 404 or 405 on the relay's own routes means the URL's
  path is wrong; ``https://`` to a server that answers in plain HTTP). A signature time outside
  the relay's window is :class:`ClockSkew` (nothing is wrong with the message: set the clock),
  and so is a key bundle refused for a publication time ahead of the relay's clock (the bundle
  is signed anew at the next publication).
  Answers are classified by the problem's stable ``type``, then the status, never by its text.
* ``fetch`` returns a reader that resumes an interrupted download with ``Range`` and
  ``If-Range`` (the relay's ETag is the body's digest, so a resumed body is the same body).
* ``acknowledge`` names the message id (``DELETE``), so repeating it never removes another
  envelope.

The two classes share everything but the I/O. :class:`_Core` holds the rules: which request
each operation makes (:class:`_Request`), how an answer is read, and the request loop itself
(:meth:`_Core.exchange`, a generator that says when to send, to wait or to publish the key
bundle); :class:`_Resume` is the state of a resumable download. The sync and async drivers
only perform what these ask for, with blocking or awaiting I/O (a test suite runs against both).
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
import ssl
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Generic, NoReturn, TypeVar

import anyio
import httpx

from .._closing import AsyncClosing
from .._errors import (
    ClockSkew,
    DeliveryRejected,
    IdentityError,
    StorageError,
    TransportError,
    TransportUnavailable,
)
from .._fs import removing_on_failure
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
#: An answer read whole must arrive within this many times the transport's timeout.
_ANSWER_DEADLINES = 4
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
    "unauthenticated",
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


@dataclass(frozen=True)
class _Request:
    """One signed request an operation makes: to the relay at ``base``, with a body of ``size``
    bytes whose digest is ``digest`` (``size`` None: no body); ``ok`` are the answers that end
    it; with ``stream`` a good answer is handed over unread (a download). A 404 means the relay
    has no such route (a wrong URL) unless ``resource`` (then: no such envelope)."""

    method: str
    url: str
    ok: tuple[int, ...]
    base: str
    digest: bytes = EMPTY_DIGEST
    size: int | None = None
    extra: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    resource: bool = False


@dataclass(frozen=True)
class _Step:
    """What the request loop asks its driver to do next: ``send`` the request signed with
    ``headers`` (and answer with the verdict), ``publish`` the key bundle, or ``sleep``."""

    action: str
    headers: dict[str, str] = field(default_factory=dict)
    wait: float = 0.0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_relay_url(url: str) -> str:
    """``url`` as a relay's base URL, ``http(s)://host[:port][/prefix]`` without a trailing
    slash; ``ValueError`` otherwise, in words that never repeat the URL.

    A relay authenticates requests by their signatures, never by the URL: user information
    (``user:password@``) could only be a secret, and the URL is shown and kept (the transport's
    name ``relay:<url>``, the inbox, ``Client.unreachable``, logs, errors; httpx would also send
    it as Basic authentication). A query string or a fragment cannot be part of a base URL that
    paths are appended to."""
    if not isinstance(url, str):
        raise TypeError("a relay URL is a str")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("a relay URL is http(s)://host[:port][/prefix]")
    if "@" in parts.netloc:
        raise ValueError(
            "a relay URL carries no user name or password (…@): a relay authenticates requests"
            " by their signatures"
        )
    if "?" in url or "#" in url:
        raise ValueError("a relay URL has no query string or fragment (?…, #…)")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise ValueError("a relay URL's port is not a port number") from None
    return url.rstrip("/")


class _Core:
    """Everything of a relay transport but the I/O (shared by the sync and async drivers)."""

    def __init__(
        self,
        identity: Identity,
        url: str,
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

    def base(self, url: str) -> str:
        base = check_relay_url(url)
        parts = urllib.parse.urlsplit(base)
        host = parts.hostname or ""
        if parts.scheme == "http" and not _loopback(host) and base not in _WARNED:
            _WARNED.add(base)
            log.warning("relay %s is used over plain http: use https beyond loopback", host)
        return base

    def bundle(self) -> KeyBundle:
        if self._bundle is None:
            self._bundle = sign_bundle(
                self.identity, identifiers=self._identifiers, statements=self._statements
            )
        return self._bundle

    def endpoint(self) -> Endpoint:
        return Endpoint(kind="relay", url=self.url, mailbox=self.mailbox)

    # -- the requests of each operation ----------------------------------------------------
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

    @contextlib.contextmanager
    def publication(self, base: str | None) -> Iterator[tuple[_Request, bytes]]:
        """The request that publishes this identity's key bundle on a relay (default: its
        own), and the bundle. The relay counts as published from now on (the request's own
        loop must not publish first), unless the block fails."""
        where = self.base(base) if base else self.url
        raw = self.bundle().raw
        self.published.add(where)
        try:
            yield (
                _Request(
                    "PUT",
                    f"{where}/v1/keys/{self.mailbox}",
                    (204,),
                    where,
                    StreamDigest.of([raw]).digest(),
                    len(raw),
                    {"Content-Type": "application/vnd.medsecure.key-bundle+cbor"},
                ),
                raw,
            )
        except BaseException as exc:
            self.published.discard(where)
            if isinstance(exc, ClockSkew):  # its time was refused: sign anew next time
                self._bundle = None
            raise

    def upload(self, target: tuple[str, str], digest: StreamDigest) -> _Request:
        """The PUT of an envelope to ``target`` (:meth:`endpoint_target`'s relay and URL)."""
        base, url = target
        return _Request("PUT", url, (201,), base, digest.digest(), digest.size)

    def listing(self) -> _Request:
        return _Request("GET", f"{self.url}/v1/mailboxes/{self.mailbox}/messages", (200,), self.url)

    def item_url(self, item: Incoming) -> str:
        if not isinstance(item, Incoming) or not _MID_RE.fullmatch(item.handle):
            raise ValueError("not an item of this transport")
        return self.message_url(self.url, self.mailbox, item.handle)

    def removal(self, item: Incoming) -> _Request:
        return _Request("DELETE", self.item_url(item), (204, 404), self.url)

    def states_request(self, message_ids: Sequence[str], url: str | None) -> _Request:
        base = self.base(url) if url else self.url
        ids = list(message_ids)
        if not 1 <= len(ids) <= 100 or not all(_MID_RE.fullmatch(m) for m in ids):
            raise ValueError("give 1 to 100 message ids")
        query = urllib.parse.urlencode([("message_id", m) for m in ids])
        return _Request("GET", f"{base}/v1/uploads?{query}", (200,), base)

    def poll_request(self, endpoint: Endpoint, message_ids: Sequence[str]) -> _Request | None:
        """The states request for uploads to ``endpoint``, or None if there is nothing to ask."""
        if endpoint.kind != "relay" or not endpoint.url or not message_ids:
            return None
        return self.states_request(message_ids, endpoint.url)

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

    # -- the request loop ------------------------------------------------------------------
    def exchange(self, request: _Request) -> Generator[_Step, _Verdict | None, NoReturn]:
        """The request loop, without I/O. Each ``send`` step is answered with the verdict on
        what came back (the driver stops asking once the verdict is ``ok``); the other steps
        with None. Raises the last error when retrying is over or cannot help."""
        if request.base not in self.published:
            yield _Step("publish")
        attempt = 0
        republished = False
        while True:
            # signing with ML-DSA takes about a millisecond: fine on an event loop too
            headers = sign_request(self.identity, request.method, request.url, request.digest)
            headers.update(request.extra)
            if request.size is not None:
                headers["Content-Length"] = str(request.size)
                headers.setdefault("Content-Type", "application/octet-stream")
            verdict = yield _Step("send", headers)
            assert verdict is not None
            if verdict.action == "publish" and not republished:
                republished = True
                yield _Step("publish")
                continue
            if verdict.action != "retry" or attempt >= self.retries:
                assert verdict.error is not None
                raise verdict.error
            wait = verdict.wait if verdict.wait is not None else self.delay(attempt)
            yield _Step("sleep", wait=wait)
            attempt += 1

    def delay(self, attempt: int) -> float:
        """Exponential backoff with jitter (attempt 0 is the first retry)."""
        ceiling = min(self.max_backoff, self.backoff * 2.0 ** min(attempt, 30))
        return ceiling * (0.5 + random.random() / 2)

    def judge(
        self, request: _Request, response: httpx.Response, answer: bytes
    ) -> httpx.Response | _Verdict:
        """A read answer: itself if it is one of the request's good answers, else the verdict."""
        verdict = self.classify(
            response.status_code, response.headers, answer, request.ok, resource=request.resource
        )
        return _decoded(response, answer) if verdict.action == "ok" else verdict

    def classify(
        self,
        status: int,
        headers: httpx.Headers,
        body: bytes,
        ok: tuple[int, ...],
        *,
        resource: bool = False,
    ) -> _Verdict:
        """What an answer means (by the problem's ``type``, then the status). ``resource``: a
        404 means the thing asked for is gone, not that the relay has no such route."""
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
                "fail",
                error=ClockSkew(
                    f"{what}: the request's time is outside the relay's window;"
                    " check this computer's clock"
                ),
            )
        if slug == "bundle-time-invalid":
            return _Verdict(
                "fail",
                error=ClockSkew(
                    f"{what}: the key bundle's publication time is ahead of the relay's clock;"
                    " check this computer's clock"
                ),
            )
        if status == 405 or (status == 404 and not resource):
            # every route of the protocol exists on a relay: it has none under this URL
            return _Verdict(
                "fail",
                error=DeliveryRejected(
                    f"{what}: there is no medsecure relay route there;"
                    " check the relay URL, path included"
                ),
            )
        if slug in ("unauthenticated", "signature-invalid"):
            return _Verdict(
                "fail",
                error=DeliveryRejected(
                    f"{what}: the relay does not accept the request's signature; check the"
                    " relay URL (a proxy in front of the relay must pass requests unchanged)"
                ),
            )
        if slug in _REJECTED or slug is None:
            return _Verdict("fail", error=DeliveryRejected(what))
        return _Verdict("fail", error=TransportUnavailable(what))

    # -- what the answers say --------------------------------------------------------------
    def waiting(self, answer: httpx.Response) -> list[Incoming]:
        out = []
        for item in _listed(answer, "messages"):
            if not isinstance(item, dict):
                continue
            mid, size = item.get("message_id"), item.get("size")
            if not isinstance(mid, str) or not _MID_RE.fullmatch(mid):
                continue
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                continue
            out.append(Incoming(handle=mid, message_id=mid, size=size))
        return out

    def states(self, answer: httpx.Response) -> list[UploadState]:
        out = []
        for item in _listed(answer, "uploads"):
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

    def polled(self, endpoint: Endpoint, answer: httpx.Response) -> dict[str, str]:
        """The states of uploads to ``endpoint``'s mailbox, by message id."""
        return {s.message_id: s.state for s in self.states(answer) if s.mailbox == endpoint.mailbox}

    def next_keys(self, answer: httpx.Response, pages: int) -> str | None:
        """The cursor of the next page of a look-up by identifier (None: that was the last),
        after ``pages`` pages. A relay answers every claim of an identifier, a page at a time;
        an answer cut short would hide whoever is on the pages not read, so past
        ``_MAX_KEY_PAGES`` the look-up fails instead of answering in part."""
        if answer.status_code != 200:
            return None
        doc = _json(answer.content)
        cursor = doc.get("next") if isinstance(doc, dict) else None
        if not isinstance(cursor, str) or not _CURSOR_RE.fullmatch(cursor):
            return None
        if pages >= _MAX_KEY_PAGES:
            raise TransportError(
                f"the relay lists more than {pages} pages of key bundles claiming this"
                " identifier: refusing an incomplete answer"
            )
        return cursor

    def bundles(self, answer: httpx.Response, fingerprint: str | None) -> list[KeyBundle]:
        """Parse what a key lookup returned; bundles that do not verify are skipped."""
        if answer.status_code == 404:
            return []
        if fingerprint is not None:
            raws = [answer.content]
        else:
            raws = []
            for text in _listed(answer, "bundles"):
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


class _KeyLookup:
    """A key look-up, without I/O: the request for each page (:attr:`request`, None once the
    look-up is complete) and the bundles the answers held, each fingerprint once."""

    def __init__(
        self, core: _Core, fingerprint: str | None, identifier: str | None, url: str | None
    ) -> None:
        self.core = core
        self.base = core.base(url) if url else core.url
        self.fingerprint = fingerprint
        self.identifier = identifier
        self.pages = 0
        self._found: dict[str, KeyBundle] = {}
        self.request: _Request | None = self._page(None)

    def _page(self, after: str | None) -> _Request:
        url = self.core.keys_url(self.base, self.fingerprint, self.identifier, after)
        return _Request("GET", url, (200, 404), self.base)

    def answered(self, answer: httpx.Response) -> None:
        """Take in the answer to :attr:`request`; set the next page's request, if any."""
        for bundle in self.core.bundles(answer, self.fingerprint):
            self._found.setdefault(bundle.fingerprint, bundle)
        self.pages += 1
        after = None if self.fingerprint is not None else self.core.next_keys(answer, self.pages)
        self.request = None if after is None else self._page(after)

    def found(self) -> list[KeyBundle]:
        return list(self._found.values())


class _Resume:
    """A resumable download, without I/O: where it is, what the relay said of the body (size,
    ETag), what was received and not read yet, and how many times it broke."""

    def __init__(self, core: _Core, url: str, expected: int | None) -> None:
        self.core = core
        self.url = url
        self.pos = 0
        # the listed size bounds what a (hostile) relay can make us read
        self.expected = expected
        self.size: int | None = None
        self.etag: str | None = None
        self.pending = b""
        self.failures = 0

    def request(self) -> _Request:
        """The GET that starts the download, or resumes it where it broke."""
        extra = {"Accept-Encoding": "identity"}
        if self.pos:
            extra["Range"] = f"bytes={self.pos}-"
            if self.etag:
                extra["If-Range"] = self.etag
        return _Request(
            "GET", self.url, (200, 206), self.core.url, extra=extra, stream=True, resource=True
        )

    def refusal(self, response: httpx.Response) -> TransportUnavailable | None:
        """None if the (streamed) answer to :meth:`request` continues the download (its size
        and ETag are kept from the first one), else the error to raise once it is closed."""
        if self.pos and response.status_code != 206:
            return TransportUnavailable("the relay could not resume the download")
        if self.size is None:
            length = response.headers.get("content-length", "")
            size = int(length) if length.isascii() and length.isdigit() else self.expected
            if self.expected is not None and size != self.expected:
                return TransportUnavailable("the relay sent another size than it listed")
            self.size = size
            self.etag = response.headers.get("etag")
        return None

    @property
    def complete(self) -> bool:
        return self.size is not None and self.pos >= self.size

    def received(self, chunk: bytes) -> None:
        self.pending = chunk[: self.size - self.pos if self.size is not None else None]

    def take(self, n: int) -> bytes:
        """Up to ``n`` received bytes (all of them if ``n < 0``)."""
        count = len(self.pending) if n < 0 else min(n, len(self.pending))
        data, self.pending = self.pending[:count], self.pending[count:]
        self.pos += len(data)
        return data

    def ended(self) -> TransportUnavailable | None:
        """The body ended: None if that is the end (no size was announced), else the error."""
        return None if self.size is None else TransportUnavailable("the download ended early")

    def retry(self, error: TransportUnavailable) -> float:
        """After a break: how long to wait before resuming; raises ``error`` when the retries
        are spent."""
        if self.failures >= self.core.retries:
            raise error
        wait = self.core.delay(self.failures)
        self.failures += 1
        return wait


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    value = value.strip()
    # ASCII digits only: "²" is a digit to str.isdigit but no number to float()
    if value.isascii() and value.isdigit() and len(value) < 10:
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


def _listed(answer: httpx.Response, key: str) -> list[Any]:
    """The list under ``key`` in a JSON answer (empty if there is none: the items are checked
    one by one by the caller)."""
    doc = _json(answer.content)
    items = doc.get(key) if isinstance(doc, dict) else None
    return items if isinstance(items, list) else []


class _Answer:
    """An answer read whole: at most ``_MAX_JSON`` bytes, arrived by ``deadline``
    (``time.monotonic``)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.data = bytearray()

    def add(self, part: bytes) -> None:
        self.data += part
        if len(self.data) > _MAX_JSON:
            raise TransportError("the relay's answer is too large")
        if time.monotonic() > self.deadline:
            raise TransportUnavailable("the relay's answer did not arrive in time")


def _decoded(response: httpx.Response, content: bytes) -> httpx.Response:
    """A read answer (its content already decoded by httpx, so without Content-Encoding)."""
    headers = [
        (k, v)
        for k, v in response.headers.multi_items()
        if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")
    ]
    return httpx.Response(response.status_code, headers=headers, content=content)


def _unreachable(exc: Exception) -> _Verdict:
    tls = _tls_failure(exc)
    if tls is not None and tls.reason in _NOT_TLS:
        # no retry can change it: the URL's scheme or the relay's configuration is wrong
        return _Verdict(
            "fail",
            error=DeliveryRejected(
                "TLS mismatch: the relay does not answer TLS (a plain-HTTP server?);"
                " check the relay URL's scheme (http:// or https://)"
            ),
        )
    return _Verdict("retry", None, _translate(exc))


# OpenSSL's reasons for a server whose first answer is not a TLS record (plain HTTP): 1.1 and
# 3.0 say WRONG_VERSION_NUMBER, 3.2+ may say RECORD_LAYER_FAILURE or PACKET_LENGTH_TOO_LONG.
_NOT_TLS = frozenset(
    {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL"}
)


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The ssl error behind an httpx error (httpx raises ConnectError from httpcore's, itself
    raised from the ssl module's), if there is one."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


# What a network failure means, in words an operator acts on (never httpx's class names).
_FAILURES: tuple[tuple[type[Exception], str], ...] = (
    (httpx.ConnectTimeout, "no connection within the timeout"),
    (httpx.ConnectError, "connection refused or address unreachable"),
    (httpx.PoolTimeout, "no free connection within the timeout"),
    (httpx.TimeoutException, "the relay stopped answering within the timeout"),
    (httpx.RemoteProtocolError, "the relay closed the connection or broke HTTP"),
    (httpx.NetworkError, "the connection broke"),
    (httpx.StreamError, "the transfer was interrupted"),
)


def _translate(exc: Exception) -> TransportUnavailable:
    tls = _tls_failure(exc)
    if isinstance(tls, ssl.SSLCertVerificationError):
        return TransportUnavailable("TLS failure: the relay's certificate does not verify")
    if tls is not None:
        return TransportUnavailable("TLS failure: the handshake with the relay failed")
    what = next((text for kind, text in _FAILURES if isinstance(exc, kind)), "network failure")
    return TransportUnavailable(f"relay unreachable: {what}")


_TRANSIENT_HTTP = (httpx.TransportError, httpx.StreamError)


class _Source:
    """An envelope to upload, read twice (for its digest, then as the body): the caller's
    stream if it can seek, else a seekable copy in a private temporary file."""

    def __init__(self, envelope: BinaryIO) -> None:
        try:
            envelope.seek(envelope.tell())
            self.file, self.spooled = envelope, False
        except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
            spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL)  # noqa: SIM115 - see close()
            shutil.copyfileobj(envelope, spool, _CHUNK)
            spool.seek(0)
            self.file, self.spooled = spool, True  # type: ignore[assignment]
        self.start = self.file.tell()

    def digest(self) -> StreamDigest:
        d = StreamDigest()
        while block := self.file.read(_CHUNK):
            d.update(block)
        return d

    def rewind(self) -> None:
        self.file.seek(self.start)

    def read(self) -> bytes:
        return self.file.read(_CHUNK)

    def close(self) -> None:
        if self.spooled:
            self.file.close()


_C = TypeVar("_C", httpx.Client, httpx.AsyncClient)
_S = TypeVar("_S")


class _Relay(Generic[_C, _S]):
    """What the two drivers have in common besides :class:`_Core`: the constructor (see
    :class:`RelayTransport`), the names and the endpoint to publish."""

    kinds: ClassVar[frozenset[str]] = frozenset({"relay"})

    def __init__(
        self,
        identity: Identity,
        url: str,
        *,
        client: _C | None = None,
        identifiers: Sequence[str] = (),
        statements: Sequence[Any] = (),
        timeout: float = 30.0,
        retries: int = 6,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_retry_after: float = 120.0,
        sleep: _S | None = None,
    ) -> None:
        self._core = _Core(
            identity, url, identifiers, statements, retries, backoff, max_backoff, max_retry_after
        )
        self._own_client = client is None
        self._client: _C = client if client is not None else self._new_client(timeout)
        # an answer read whole (a listing, a look-up, a refusal) must arrive within this: a
        # relay sending it a byte at a time, each within the read timeout, is given up on
        self._answer_deadline = _ANSWER_DEADLINES * timeout
        self._sleep: _S = sleep if sleep is not None else self._default_sleep()

    def _new_client(self, timeout: float) -> _C:
        raise NotImplementedError

    def _default_sleep(self) -> _S:
        raise NotImplementedError

    def _prepare(
        self, request: _Request, headers: dict[str, str], body: Callable[[], Any] | None
    ) -> httpx.Request:
        """One attempt's HTTP request, built by the client (so that its defaults apply)."""
        content = body() if body is not None else None
        return self._client.build_request(
            request.method, request.url, headers=headers, content=content
        )

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
        return self._core.endpoint()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url!r} {self.mailbox}>"


# ==============================================================================================
# sync
# ==============================================================================================


class RelayTransport(_Relay[httpx.Client, Callable[[float], None]], Transport):
    """Deliver to relay mailboxes (``Endpoint(kind="relay", url=…, mailbox=…)``) and receive
    from the caller's own mailbox on the relay at ``url``.

    ``url`` is ``http(s)://host[:port][/prefix]``: one with user information (a password), a
    query string or a fragment is a ``ValueError`` (a relay authenticates by signatures, and the
    URL is shown in the transport's name). ``client`` may be given (connection reuse, proxies, TLS settings, tests); otherwise one
    ``httpx.Client`` is made and closed with the transport. ``identifiers`` (IDNPS) and
    ``statements`` go into the published key bundle so that others can find the key; they do not
    make it trusted. ``sleep`` is the wait between retries (default ``time.sleep``; tests pass a
    recorder).
    """

    def _new_client(self, timeout: float) -> httpx.Client:
        return httpx.Client(timeout=timeout)

    def _default_sleep(self) -> Callable[[float], None]:
        return time.sleep

    # -- the request loop ------------------------------------------------------------------
    def _send(self, request: _Request, body: Callable[[], Any] | None = None) -> httpx.Response:
        steps = self._core.exchange(request)
        step = next(steps)
        while True:
            if step.action == "send":
                outcome = self._attempt(request, self._prepare(request, step.headers, body))
                if isinstance(outcome, httpx.Response):
                    return outcome
                step = steps.send(outcome)
                continue
            if step.action == "publish":
                self.publish(request.base)
            else:
                self._sleep(step.wait)
            step = next(steps)

    def _attempt(self, request: _Request, sent: httpx.Request) -> httpx.Response | _Verdict:
        try:
            response = self._client.send(sent, stream=True)
            if request.stream and response.status_code in request.ok:
                return response
            try:
                # from the answer's head on (an upload's body was sent before it)
                answer = _Answer(time.monotonic() + self._answer_deadline)
                for part in response.iter_bytes():
                    answer.add(part)
            finally:
                response.close()
        except _TRANSIENT_HTTP as exc:
            return _unreachable(exc)
        return self._core.judge(request, response, bytes(answer.data))

    def publish(self, base: str | None = None) -> None:
        """Publish this identity's key bundle on a relay (done before the first request)."""
        with self._core.publication(base) as (request, raw):
            self._send(request, lambda: raw)

    # -- Transport -------------------------------------------------------------------------
    def deliver(
        self, endpoint: Endpoint, envelope: BinaryIO, *, message_id: str, size: int
    ) -> None:
        target = self._core.endpoint_target(endpoint, message_id)
        source = _Source(envelope)
        try:
            request = self._core.upload(target, source.digest())

            def chunks() -> Iterator[bytes]:
                source.rewind()
                while block := source.read():
                    yield block

            self._send(request, chunks)
        finally:
            source.close()

    def list(self) -> Sequence[Incoming]:
        return self._core.waiting(self._send(self._core.listing()))

    def fetch(self, item: Incoming) -> BinaryIO:
        return io.BufferedReader(_Download(self, self._core.item_url(item), item.size), _CHUNK)

    def acknowledge(self, item: Incoming) -> None:
        with contextlib.suppress(DeliveryRejected):  # not-found: already acknowledged
            self._send(self._core.removal(item))

    def upload_states(
        self, message_ids: Sequence[str], *, url: str | None = None
    ) -> Sequence[UploadState]:
        """States of this identity's uploads on a relay (default: its own): whether each was
        collected, is still waiting, or expired uncollected."""
        return self._core.states(self._send(self._core.states_request(message_ids, url)))

    def poll(self, endpoint: Endpoint, message_ids: Sequence[str]) -> dict[str, str]:
        """States of uploads to ``endpoint``'s relay and mailbox (see Transport.poll)."""
        request = self._core.poll_request(endpoint, message_ids)
        return {} if request is None else self._core.polled(endpoint, self._send(request))

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
        lookup = _KeyLookup(self._core, fingerprint, identifier, url)
        while lookup.request is not None:
            lookup.answered(self._send(lookup.request))
        return lookup.found()

    def close(self) -> None:
        if self._own_client:
            self._client.close()


class _Download(io.RawIOBase):
    """A streamed download that resumes with Range after a broken connection."""

    def __init__(self, transport: RelayTransport, url: str, expected: int | None = None) -> None:
        self._t = transport
        self._state = _Resume(transport._core, url, expected)
        self._response: httpx.Response | None = None
        self._chunks: Iterator[bytes] | None = None

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        response = self._t._send(self._state.request())
        refusal = self._state.refusal(response)
        if refusal is not None:
            response.close()
            raise refusal
        self._response = response
        self._chunks = response.iter_raw(_CHUNK)

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        state = self._state
        while not state.pending:
            if state.complete:
                return 0
            try:
                if self._chunks is None:
                    self._open()
                assert self._chunks is not None
                state.received(next(self._chunks))
            except StopIteration:
                self._drop()
                error = state.ended()
                if error is None:
                    return 0
                self._t._sleep(state.retry(error))
            except _TRANSIENT_HTTP as exc:
                self._drop()
                self._t._sleep(state.retry(_translate(exc)))
        data = state.take(len(view))
        view[: len(data)] = data
        return len(data)

    def _drop(self) -> None:
        if self._response is not None:
            self._response.close()
        self._response = None
        self._chunks = None

    def close(self) -> None:
        self._drop()
        super().close()


# ==============================================================================================
# async (the same rules, awaiting)
# ==============================================================================================


class AsyncRelayTransport(
    _Relay[httpx.AsyncClient, Callable[[float], Awaitable[None]]], AsyncTransport
):
    """The async twin of :class:`RelayTransport` on ``httpx.AsyncClient``: the same methods,
    awaitable (``sleep`` default: ``anyio.sleep``); file reads and digests run off the event
    loop."""

    def _new_client(self, timeout: float) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=timeout)

    def _default_sleep(self) -> Callable[[float], Awaitable[None]]:
        return anyio.sleep

    async def _send(
        self, request: _Request, body: Callable[[], Any] | None = None
    ) -> httpx.Response:
        steps = self._core.exchange(request)
        step = next(steps)
        while True:
            if step.action == "send":
                outcome = await self._attempt(request, self._prepare(request, step.headers, body))
                if isinstance(outcome, httpx.Response):
                    return outcome
                step = steps.send(outcome)
                continue
            if step.action == "publish":
                await self.publish(request.base)
            else:
                await self._sleep(step.wait)
            step = next(steps)

    async def _attempt(self, request: _Request, sent: httpx.Request) -> httpx.Response | _Verdict:
        try:
            response = await self._client.send(sent, stream=True)
            if request.stream and response.status_code in request.ok:
                return response
            try:
                # from the answer's head on (an upload's body was sent before it)
                answer = _Answer(time.monotonic() + self._answer_deadline)
                async for part in response.aiter_bytes():
                    answer.add(part)
            finally:
                await response.aclose()
        except _TRANSIENT_HTTP as exc:
            return _unreachable(exc)
        return self._core.judge(request, response, bytes(answer.data))

    async def publish(self, base: str | None = None) -> None:
        """Publish this identity's key bundle on a relay (done before the first request)."""
        with self._core.publication(base) as (request, raw):

            async def once() -> AsyncIterator[bytes]:
                yield raw

            await self._send(request, once)

    async def deliver(
        self, endpoint: Endpoint, envelope: BinaryIO, *, message_id: str, size: int
    ) -> None:
        """Deliver one envelope (see :meth:`RelayTransport.deliver`)."""
        target = self._core.endpoint_target(endpoint, message_id)
        source = await anyio.to_thread.run_sync(_Source, envelope)
        try:
            digest = await anyio.to_thread.run_sync(source.digest)

            async def chunks() -> AsyncIterator[bytes]:
                await anyio.to_thread.run_sync(source.rewind)
                while block := await anyio.to_thread.run_sync(source.read):
                    yield block

            await self._send(self._core.upload(target, digest), chunks)
        finally:
            source.close()

    async def list(self) -> Sequence[Incoming]:
        """Envelopes waiting in this identity's mailbox, oldest first."""
        return self._core.waiting(await self._send(self._core.listing()))

    def fetch(self, item: Incoming) -> AsyncDownload:
        """A resumable async reader of a waiting envelope (``async with``; ``await read(n)``)."""
        return AsyncDownload(self, self._core.item_url(item), item.size)

    async def take(self, item: Incoming, target: Path) -> None:
        """Download a waiting envelope (resumably) to ``target``: a new 0600 file, fsynced;
        disk writes run off the event loop."""
        try:
            fd = await asyncio.to_thread(
                os.open, target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
            with removing_on_failure(target), os.fdopen(fd, "wb") as out:
                async with self.fetch(item) as download:
                    async for chunk in download:
                        await asyncio.to_thread(out.write, chunk)
                await asyncio.to_thread(_flush_and_sync, out)
        except OSError as exc:
            raise StorageError(f"cannot store an incoming envelope: {exc.strerror}") from exc

    async def acknowledge(self, item: Incoming) -> None:
        """Remove an envelope the receiver has stored durably (by its message id)."""
        with contextlib.suppress(DeliveryRejected):
            await self._send(self._core.removal(item))

    async def upload_states(
        self, message_ids: Sequence[str], *, url: str | None = None
    ) -> Sequence[UploadState]:
        """See :meth:`RelayTransport.upload_states`."""
        return self._core.states(await self._send(self._core.states_request(message_ids, url)))

    async def poll(self, endpoint: Endpoint, message_ids: Sequence[str]) -> dict[str, str]:
        """See :meth:`RelayTransport.poll`."""
        request = self._core.poll_request(endpoint, message_ids)
        return {} if request is None else self._core.polled(endpoint, await self._send(request))

    async def find_keys(
        self,
        *,
        fingerprint: str | None = None,
        identifier: str | None = None,
        url: str | None = None,
    ) -> Sequence[KeyBundle]:
        """See :meth:`RelayTransport.find_keys`."""
        lookup = _KeyLookup(self._core, fingerprint, identifier, url)
        while lookup.request is not None:
            lookup.answered(await self._send(lookup.request))
        return lookup.found()

    async def aclose(self) -> None:
        """Release the HTTP client if this transport made it."""
        if self._own_client:
            await self._client.aclose()


def _flush_and_sync(out: BinaryIO) -> None:
    out.flush()
    os.fsync(out.fileno())


class AsyncDownload(AsyncClosing):
    """The async twin of the sync transport's resumable download."""

    def __init__(
        self, transport: AsyncRelayTransport, url: str, expected: int | None = None
    ) -> None:
        self._t = transport
        self._state = _Resume(transport._core, url, expected)
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None

    async def _open(self) -> None:
        response = await self._t._send(self._state.request())
        refusal = self._state.refusal(response)
        if refusal is not None:
            await response.aclose()
            raise refusal
        self._response = response
        self._chunks = response.aiter_raw(_CHUNK)

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (``b""`` at the end); ``n < 0`` reads one chunk."""
        state = self._state
        while not state.pending:
            if state.complete:
                return b""
            try:
                if self._chunks is None:
                    await self._open()
                assert self._chunks is not None
                state.received(await self._chunks.__anext__())
            except StopAsyncIteration:
                await self._drop()
                error = state.ended()
                if error is None:
                    return b""
                await self._t._sleep(state.retry(error))
            except _TRANSIENT_HTTP as exc:
                await self._drop()
                await self._t._sleep(state.retry(_translate(exc)))
        return state.take(n)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while data := await self.read():
            yield data

    async def _drop(self) -> None:
        if self._response is not None:
            await self._response.aclose()
        self._response = None
        self._chunks = None

    async def aclose(self) -> None:
        """Stop the download."""
        await self._drop()
