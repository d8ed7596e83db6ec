"""The relay's ASGI application (Starlette): routes, authentication, limits, streaming.

Every request except ``/v1/health``, ``/metrics`` and ``/openapi.json`` is authenticated
before anything else is looked at (so an unauthenticated caller learns nothing, not even
whether a mailbox or a message exists), then rate-limited, then authorised (only a mailbox's
owner lists, downloads or acknowledges it). Uploads are streamed to storage while their digest is
computed; the digest is compared at the end and the body discarded on mismatch; the upload is
answered only once the body is durable.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import functools
import logging
import os
import queue
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..._errors import IdentityError, StorageError, TrustError
from ..._identity import PublicIdentity
from ...models import KeyEntry, Practitioner
from ...trust import AuthorityPolicy, Statement
from .._bundle import MAX_BUNDLE_BYTES, KeyBundle
from .._digest import EMPTY_DIGEST, StreamDigest
from .._openapi import openapi_document
from .._problems import PROBLEM_CONTENT_TYPE, PROBLEMS, problem_body
from .._signing import AuthError, VerifiedRequest, verify_request
from ._config import RelayConfig, public_authorities
from ._limits import RateLimiter, retry_after
from ._observe import Metrics, event
from .storage._base import (
    COLLECTED,
    INLINE_MAX,
    Conflict,
    NonceReplayed,
    QuotaExceeded,
    RateLimited,
    Storage,
    StoredMessage,
)

__all__ = ["create_app"]

#: Seconds a nonce is kept after its signature's window (see _State.nonce_of).
NONCE_MARGIN = 300
MESSAGE_ID_RE = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")
FINGERPRINT_RE = re.compile(r"ms1[a-z2-7]{52}")
BUNDLE_TYPE = "application/vnd.medsecure.key-bundle+cbor"
_BATCH = 1 << 20  # bytes handed to a storage thread at once
_RANGE_RE = re.compile(r"bytes=(\d{1,19})-(\d{0,19})")
_CURSOR_RE = re.compile(r"(\d{1,18})\.(ms1[a-z2-7]{52})")
#: Most key bundles one page of ``GET /v1/keys?identifier=`` holds, and most bytes of them
#: (base64; clients read answers of up to 8 MiB).
KEYS_PAGE = 100
KEYS_PAGE_BYTES = 2 << 20


class Problem(Exception):
    """Answer with a problem document."""

    def __init__(self, slug: str, detail: str = "", headers: dict[str, str] | None = None) -> None:
        super().__init__(slug)
        self.slug = slug
        self.detail = detail
        self.headers = headers or {}


class _KeyCache:
    """Verification keys by fingerprint, bounded (least recently used out).

    Safe to keep without expiry: a fingerprint is the hash of every public key of an identity,
    so whatever bundle is published under it later carries the same keys (a republication
    changes only identifiers and statements, which the sender policy reads from storage)."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._keys: collections.OrderedDict[str, PublicIdentity] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, fingerprint: str) -> PublicIdentity | None:
        with self._lock:
            found = self._keys.get(fingerprint)
            if found is not None:
                self._keys.move_to_end(fingerprint)
            return found

    def put(self, identity: PublicIdentity) -> None:
        with self._lock:
            self._keys[identity.fingerprint] = identity
            self._keys.move_to_end(identity.fingerprint)
            while len(self._keys) > self._size:
                self._keys.popitem(last=False)


class _Workers:
    """Threads for the relay's blocking work (authentication, small uploads, large bodies'
    batches), handed over with C-level primitives only: a SimpleQueue out, the loop's
    call_soon_threadsafe back. A trip costs half of what ThreadPoolExecutor and
    run_in_executor cost (~15 against ~35 µs of CPU: no concurrent Future, no Python-level
    Condition or Semaphore, no future chaining), and the relay makes one or more a request.

    Threads are started as work arrives, up to ``limit``, and kept: as in ThreadPoolExecutor,
    each submission takes an idle thread's token, or starts a thread while fewer than
    ``limit`` run, or else waits in the queue for the first thread to finish."""

    def __init__(self, limit: int, name: str) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._limit = limit
        self._name = name
        self._threads = 0
        self._idle = 0
        self._lock = threading.Lock()
        self._closed = False

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` on a worker thread; a future of the loop for its outcome."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the relay's workers are shut down")
            self._queue.put((loop, future, fn, args))
            if self._idle:
                self._idle -= 1
                start = False
            else:
                start = self._threads < self._limit
                self._threads += start
        if start:
            name = f"{self._name}_{self._threads}"
            threading.Thread(target=self._serve, name=name, daemon=True).start()
        return future

    def _serve(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            loop, future, fn, args = item
            # work whose caller was cancelled before it started is dropped, as an executor
            # drops it (a racy read of the future's state: at worst the work runs, unawaited)
            if not future.cancelled():
                result: Any = None
                error: BaseException | None = None
                try:
                    result = fn(*args)
                except BaseException as exc:  # handed to the awaiting task, as an executor would
                    error = exc
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    loop.call_soon_threadsafe(_settle, future, result, error)
                del result, error
            del item, future, fn, args
            with self._lock:
                self._idle += 1

    def shutdown(self) -> None:
        """Let every thread end once the work queued before this is done."""
        with self._lock:
            self._closed = True
            for _ in range(self._threads):
                self._queue.put(None)


class _Slots:
    """A bounded count of holders (a semaphore) built on a SimpleQueue of tokens: taken and
    given back in C, where threading.BoundedSemaphore runs a Python-level Condition, which
    costs more than the verification it guards is worth when many threads wait for it."""

    def __init__(self, count: int) -> None:
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(count):
            self._tokens.put(None)

    def __enter__(self) -> None:
        self._tokens.get()

    def __exit__(self, *exc: object) -> None:
        self._tokens.put(None)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class _State:
    def __init__(self, storage: Storage, config: RelayConfig) -> None:
        self.storage = storage
        self.config = config
        self.limiter = RateLimiter(config.rate_per_second, config.rate_burst)
        self.metrics = Metrics(storage.stats, getattr(storage, "commits", None))
        self.policy = AuthorityPolicy(list(config.authorities)) if config.authorities else None
        # the Host values this relay answers for (its public URLs): a set look-up per request
        self.authorities = public_authorities(config.public_urls)
        self._allowed: dict[str, tuple[bool, float]] = {}
        self.keys = _KeyCache()
        # Signatures verified at once: one per core. Verification is CPU work; more threads
        # than cores would only contend for the cores (and, for requests not in our signers'
        # form, for the GIL), and slow the event loop that reads the requests.
        self.verify_slots = _Slots(max(1, os.cpu_count() or 1))
        # Worker threads for authentication and small uploads (see _run). Enough for every
        # upload that waits for its group commit: those threads sleep.
        self.workers = _Workers(64, "medsecure-relay")

    def check(
        self,
        method: str,
        url: str,
        headers: Any,
        now: float,
        offered: KeyBundle | None = None,
        *,
        admit: bool = True,
    ) -> VerifiedRequest:
        """Authenticate a request (blocking; in a worker thread): both signatures, the created
        window, the nonce, then the caller's rate. Raises Problem.

        With ``admit=False`` only the signatures and the window are checked: the caller records
        the nonce (:meth:`nonce_of`) and takes the rate (:meth:`rate_wait`) itself, later."""
        cfg = self.config

        def resolve(keyid: str) -> PublicIdentity | None:
            if offered is not None and offered.fingerprint == keyid:
                return offered.public
            known = self.keys.get(keyid)
            if known is not None:
                return known
            raw = self.storage.key(keyid)
            if raw is None:
                return None
            try:
                identity = _parse_bundle(raw).public
            except IdentityError:
                return None
            self.keys.put(identity)
            return identity

        try:
            with self.verify_slots:
                verified = verify_request(
                    method, url, headers, resolve=resolve, now=now, window=cfg.signature_window
                )
        except AuthError as exc:
            raise Problem(exc.slug, exc.detail) from None
        if admit:
            if not self.storage.remember_nonce(*self.nonce_of(verified)):
                raise Problem("nonce-replayed")
            wait = self.rate_wait(verified.fingerprint)
            if wait > 0:
                raise Problem("rate-limited", headers={"Retry-After": retry_after(wait)})
        return verified

    def nonce_of(self, verified: VerifiedRequest) -> tuple[str, str, int]:
        """(key id, nonce, expiry) to record: kept until the signature's window has passed, and
        then ``NONCE_MARGIN`` more. A replay is accepted into the window on arrival but checked
        against the nonces at its commit, which a busy relay may reach seconds later: the
        original's nonce must still be there then."""
        expires = verified.created + self.config.signature_window + NONCE_MARGIN
        return verified.fingerprint, verified.nonce, expires

    def rate_wait(self, fingerprint: str) -> float:
        """Take one of the caller's rate tokens: 0, or the seconds to wait if there was none."""
        return self.limiter.take(fingerprint, time.monotonic())


@functools.lru_cache(maxsize=4096)
def _parse_bundle(raw: bytes) -> KeyBundle:
    """Parsing verifies the bundle's self-signature (ML-DSA): done once per bundle, not per
    request. Keyed by the bytes, so a republished bundle is parsed anew."""
    return KeyBundle.parse(raw)


def _state(request: Request) -> _State:
    state: _State = request.app.state.relay
    return state


async def _thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await anyio.to_thread.run_sync(fn, *args)


# -- authentication ---------------------------------------------------------------------------


def _url(request: Request) -> str:
    """The URL the request's signature must cover, once its ``Host`` is known to name this
    relay: ``@authority`` is signed, so a request signed for another relay (which a hostile
    relay could replay here within the signature window) is refused before it is verified."""
    host = request.headers.get("host") or ""
    served = _state(request).authorities
    if host not in served and host.lower() not in served:
        raise Problem("misdirected-request", "see this relay's --public-url")
    scope = request.scope
    raw_path = scope.get("raw_path") or request.url.path.encode()
    query = scope.get("query_string") or b""
    # the scheme as request.url has it, without building the whole URL object
    url = f"{scope.get('scheme', 'http')}://{host}{raw_path.decode('latin-1')}"
    return url + ("?" + query.decode("latin-1") if query else "")


async def _run(st: _State, fn: Callable[..., Any], *args: Any) -> Any:
    """Run blocking work on the relay's worker threads. Lighter than anyio.to_thread (a sixth
    of its cost per trip), but the awaiting task may be cancelled while the work goes on: use it
    only for work that needs no clean-up by its caller (authentication, small uploads)."""
    return await st.workers.run(fn, *args)


async def _authenticate(request: Request, *, offered: KeyBundle | None = None) -> VerifiedRequest:
    st = _state(request)
    # One trip to a worker thread for the whole check (OpenSSL releases the GIL while it
    # verifies, so the loop keeps serving meanwhile).
    verified: VerifiedRequest = await _run(
        st, st.check, request.method, _url(request), request.headers.items(), time.time(), offered
    )
    request.state.caller = verified.fingerprint
    return verified


async def _small_body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem("bad-request", "this request takes no body this large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _authenticated_empty(request: Request) -> VerifiedRequest:
    verified = await _authenticate(request)
    body = await _small_body(request, 0)
    if body or verified.digest != EMPTY_DIGEST:
        raise Problem("digest-mismatch")
    return verified


def _owner(verified: VerifiedRequest, mailbox: str) -> None:
    if verified.fingerprint != mailbox:
        raise Problem("forbidden")


def _message_path(request: Request) -> tuple[str, str]:
    return _message_path_of(request.path_params)


def _message_path_of(params: Any) -> tuple[str, str]:
    mailbox = params["mailbox"]
    message_id = params["message_id"]
    if not FINGERPRINT_RE.fullmatch(mailbox) or not MESSAGE_ID_RE.fullmatch(message_id):
        raise Problem("bad-request", "malformed mailbox or message id")
    return mailbox, message_id


def _record(m: StoredMessage) -> dict[str, Any]:
    return {
        "mailbox": m.mailbox,
        "message_id": m.message_id,
        "size": m.size,
        "received_at": m.received_at,
        "state": m.state,
    }


def _etag(digest: bytes) -> str:
    return '"' + base64.urlsafe_b64encode(digest).decode().rstrip("=") + '"'


# -- keys -------------------------------------------------------------------------------------


async def put_key(request: Request) -> Response:
    st = _state(request)
    fingerprint = request.path_params["fingerprint"]
    # The first publication cannot be verified with a stored key: read the (small) bundle
    # first, then verify the request with the keys it carries (its fingerprint is the path).
    raw = await _small_body(request, MAX_BUNDLE_BYTES)
    try:
        bundle = KeyBundle.parse(raw)
    except IdentityError:
        bundle = None
    verified = await _authenticate(request, offered=bundle)
    if not StreamDigest.of([raw]).matches(verified.digest):
        raise Problem("digest-mismatch")
    if bundle is None:
        raise Problem("bad-request", "not a valid key bundle")
    if bundle.fingerprint != fingerprint or verified.fingerprint != fingerprint:
        raise Problem("forbidden", "an identity publishes only its own bundle")
    now = time.time()
    published = int(bundle.published.timestamp())
    # "published" is the publisher's word: one ahead of the relay's clock (beyond the skew a
    # signature may have) would outrank every later republication of the same identity. Its
    # own type: the publisher's clock is wrong, not its software (one behind is a bundle
    # signed earlier and published again: accepted)
    if published > now + st.config.signature_window:
        raise Problem(
            "bundle-time-invalid", "the bundle's publication time is ahead of the relay's clock"
        )
    # first seen in microseconds: claims published one after another keep their order
    seen = int(now * 1_000_000)
    await _thread(
        st.storage.publish_key, fingerprint, bundle.raw, bundle.identifiers, published, seen
    )
    st._allowed.pop(fingerprint, None)
    event("key-published", caller=fingerprint)
    return Response(status_code=204)


async def get_key(request: Request) -> Response:
    st = _state(request)
    await _authenticated_empty(request)
    fingerprint = request.path_params["fingerprint"]
    raw = (
        await _thread(st.storage.key, fingerprint)
        if FINGERPRINT_RE.fullmatch(fingerprint)
        else None
    )
    if raw is None:
        raise Problem("not-found")
    return Response(raw, media_type=BUNDLE_TYPE)


async def find_keys(request: Request) -> Response:
    st = _state(request)
    await _authenticated_empty(request)
    ident = request.query_params.get("identifier", "")
    from ...identifiers import parse

    try:
        idnps = parse(ident).idnps
    except (ValueError, TypeError):
        raise Problem("bad-request", "identifier must be an IDNPS, rpps:… or adeli:…") from None
    after: tuple[int, str] | None = None
    cursor = request.query_params.get("after")
    if cursor is not None:
        m = _CURSOR_RE.fullmatch(cursor)
        if m is None:
            raise Problem("bad-request", "after must be a cursor this relay returned")
        after = (int(m.group(1)), m.group(2))
    try:
        limit = int(request.query_params.get("limit", KEYS_PAGE))
    except ValueError:
        raise Problem("bad-request", "limit must be an integer") from None
    limit = min(max(1, limit), KEYS_PAGE)
    # every claim, oldest first by the relay's own clock, a page at a time: nothing a claimant
    # says (its "published" time, how many identities it makes) moves another claim off the
    # answer, and the client pages to the end (docs/relay.md, "Key publication")
    rows = await _thread(st.storage.keys_for, idnps, after, limit + 1)
    return JSONResponse(keys_page(rows, limit))


def keys_page(rows: list[tuple[int, str, bytes]], limit: int) -> dict[str, Any]:
    """One page of a look-up by identifier from ``rows`` (first seen, fingerprint, bundle; up to
    ``limit + 1`` of them, in order): at most ``limit`` bundles and ``KEYS_PAGE_BYTES`` of them
    (but at least one), and ``next``, the cursor of the last one, if any row is left over."""
    bundles: list[str] = []
    size = 0
    for _, _, raw in rows[:limit]:
        text = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        size += len(text)
        if bundles and size > KEYS_PAGE_BYTES:
            break  # bundles may be large (64 KiB): a page stays well under what clients read
        bundles.append(text)
    page: dict[str, Any] = {"bundles": bundles}
    if len(rows) > len(bundles):
        seen, fingerprint, _ = rows[len(bundles) - 1]
        page["next"] = f"{seen}.{fingerprint}"
    return page


# -- messages ---------------------------------------------------------------------------------


async def _sender_allowed(st: _State, fingerprint: str) -> bool:
    if st.policy is None:
        return True
    allowed: bool = await _thread(_sender_allowed_now, st, fingerprint)
    return allowed


def _sender_allowed_now(st: _State, fingerprint: str) -> bool:
    """Whether the sender policy accepts this sender (blocking; cached for a minute)."""
    if st.policy is None:
        return True
    cached = st._allowed.get(fingerprint)
    if cached is not None and cached[1] > time.monotonic():
        return cached[0]
    raw = st.storage.key(fingerprint)
    allowed = False
    if raw is not None:
        bundle = _parse_bundle(raw)
        texts = []
        for s in bundle.statements:
            with contextlib.suppress(TrustError):
                texts.append(Statement.parse(s).to_text())
        for idnps in bundle.identifiers:
            practitioner = Practitioner(
                idnps=idnps, keys=(KeyEntry(public=bundle.public, statements=tuple(texts)),)
            )
            try:
                st.policy.check(practitioner, bundle.public)
            except TrustError:
                continue
            allowed = True
            break
    if len(st._allowed) > 10_000:
        st._allowed.clear()
    st._allowed[fingerprint] = (allowed, time.monotonic() + 60)
    return allowed


class _Receiving:
    """The chunks of a large upload's body, abandoned (``408 request-timeout``) when its sender
    sends nothing for ``idle`` seconds while the relay waits for it (time the relay spends
    writing is not counted: then it is not reading). One timer per upload, re-armed by itself
    when it finds the upload progressing: a chunk costs two assignments, not a timer."""

    def __init__(self, request: Request, idle: float) -> None:
        self._chunks = request.stream().__aiter__()
        self._idle = idle
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._waiting_since: float | None = None
        self._fired = False
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(idle, self._look)

    def _look(self) -> None:
        since = self._waiting_since
        now = self._loop.time()
        if since is not None and now - since >= self._idle:
            self._fired = True
            self._timer = None
            self._task.cancel()  # lands in __anext__, the only place that waits for the sender
            return
        self._timer = self._loop.call_later(
            self._idle if since is None else self._idle - (now - since), self._look
        )

    def __aiter__(self) -> _Receiving:
        return self

    async def __anext__(self) -> bytes:
        self._waiting_since = self._loop.time()
        try:
            return await self._chunks.__anext__()
        except asyncio.CancelledError:
            # ours (and no one else's, such as a shutdown's): the sender stalled
            if self._fired and self._task.uncancel() == 0:
                raise Problem("request-timeout", f"no byte for {self._idle:g} s") from None
            raise
        finally:
            self._waiting_since = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _announced(request: Request) -> int | None:
    """The upload's Content-Length if it is given, well formed and without Transfer-Encoding."""
    value = request.headers.get("content-length")
    if value is None or "transfer-encoding" in request.headers:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 19:
        return None
    return int(value)


async def upload(request: Request) -> Response:
    st = _state(request)
    announced = _announced(request)
    if announced is not None and announced <= INLINE_MAX:
        return await _upload_small(request, st, announced)
    return await _upload_large(request, st)


async def _upload_small(request: Request, st: _State, length: int) -> Response:
    """An upload of at most INLINE_MAX bytes: its body is read first (bounded, as uvicorn itself
    buffers that much of a request), then one worker thread authenticates the request and
    commits the envelope, in the order of the general path: authentication (signatures,
    window, nonce, rate), then the request's own checks, then the digest, then the commit.

    On a backend that records nonces in its commits (PostgreSQL: one transaction a batch
    instead of two), the nonce is recorded with the envelope: signatures and window, the
    request's own checks, the digest, then the commit, which refuses a replayed nonce
    (``nonce-replayed``, nothing kept) and only then takes the rate. A replay is refused
    either way, and never takes its sender's tokens, not even while its commit waits: a
    replay with another body fails at the digest, one byte for byte at its nonce."""
    cfg = st.config
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > length:
            break  # refused below, once the caller is authenticated
        chunks.append(chunk)
    body = b"".join(chunks)
    method, url, headers = request.method, _url(request), request.headers.items()
    path = request.path_params
    now = time.time()

    in_commit = st.storage.nonces_in_commits

    def work() -> tuple[VerifiedRequest, StoredMessage, bool]:
        verified = st.check(method, url, headers, now, admit=not in_commit)
        request.state.caller = verified.fingerprint
        mailbox, message_id = _message_path_of(path)
        if not _sender_allowed_now(st, verified.fingerprint):
            raise Problem("sender-not-allowed")
        if length > cfg.max_envelope_bytes:
            raise Problem(
                "envelope-too-large", f"the largest envelope is {cfg.max_envelope_bytes} bytes"
            )
        if received > length:
            raise Problem("bad-request", "the body is longer than its Content-Length")
        if received < length:
            raise Problem("bad-request", "the body is shorter than its Content-Length")
        if not StreamDigest.of([body]).matches(verified.digest):
            raise Problem("digest-mismatch")
        pending = st.storage.begin_upload(length)
        pending.write(body)
        try:
            record, new = st.storage.commit_upload(
                pending,
                mailbox=mailbox,
                message_id=message_id,
                sender=verified.fingerprint,
                digest=verified.digest,
                size=length,
                now=int(now),
                quota=cfg.mailbox_quota_bytes,
                nonce=st.nonce_of(verified) if in_commit else None,
                charge=functools.partial(st.rate_wait, verified.fingerprint) if in_commit else None,
            )
        except NonceReplayed:
            raise Problem("nonce-replayed") from None
        except RateLimited as exc:
            raise Problem("rate-limited", headers={"Retry-After": retry_after(exc.wait)}) from None
        except Conflict:
            raise Problem("message-id-conflict") from None
        except QuotaExceeded:
            raise Problem("mailbox-quota-exceeded") from None
        return verified, record, new

    verified, record, new = await _run(st, work)
    return _accepted(st, verified, record, new, length)


def _accepted(
    st: _State, verified: VerifiedRequest, record: StoredMessage, new: bool, length: int
) -> Response:
    st.metrics.messages.labels("accepted" if new else "replayed").inc()
    if new:
        st.metrics.bytes.labels("in").inc(length)
    event(
        "accepted",
        caller=verified.fingerprint,
        message_id=record.message_id,
        size=length,
        new=new,
    )
    return JSONResponse(_record(record), status_code=201)


async def _upload_large(request: Request, st: _State) -> Response:
    cfg = st.config
    verified = await _authenticate(request)
    mailbox, message_id = _message_path(request)
    if not await _sender_allowed(st, verified.fingerprint):
        raise Problem("sender-not-allowed")
    length_header = request.headers.get("content-length")
    if length_header is None or "transfer-encoding" in request.headers:
        raise Problem("length-required")
    if not (length_header.isascii() and length_header.isdigit()) or len(length_header) > 19:
        raise Problem("bad-request", "malformed Content-Length")
    length = int(length_header)
    if length > cfg.max_envelope_bytes:
        raise Problem(
            "envelope-too-large", f"the largest envelope is {cfg.max_envelope_bytes} bytes"
        )
    # A large body is worth refusing before it is read.
    existing: StoredMessage | None = await _thread(st.storage.find, mailbox, message_id)
    if existing is not None:
        # The idempotency key is (sender, mailbox, message id): a retry gets the first answer.
        if existing.sender == verified.fingerprint and existing.digest == verified.digest:
            st.metrics.messages.labels("replayed").inc()
            return JSONResponse(_record(existing), status_code=201)
        raise Problem("message-id-conflict")
    used = await _thread(st.storage.usage, mailbox)
    if used + length > cfg.mailbox_quota_bytes:
        raise Problem("mailbox-quota-exceeded")
    pending = await _thread(st.storage.begin_upload, length)
    committed = False
    # one batch hashed and written by a worker while the loop receives the next (two batches
    # in memory at most): receiving never waits for the disk unless the disk is behind
    inflight: asyncio.Future[None] | None = None
    body = _Receiving(request, cfg.body_timeout)
    st.metrics.receiving.inc()
    try:
        digest = StreamDigest()

        def store(data: bytes) -> None:
            # hashing and writing off the event loop, together (hashlib releases the GIL)
            digest.update(data)
            pending.write(data)

        batch: list[bytes] = []
        batched = received = 0
        async for chunk in body:
            if not chunk:
                continue
            received += len(chunk)
            if received > length:
                raise Problem("bad-request", "the body is longer than its Content-Length")
            batch.append(chunk)
            batched += len(chunk)
            if batched >= _BATCH:
                data = b"".join(batch)
                batch, batched = [], 0
                if inflight is not None:
                    await inflight
                inflight = st.workers.run(store, data)
        body.close()
        if batch:
            if inflight is not None:
                await inflight
            # a worker thread even for a small tail: a write may wait for a database connection
            inflight = st.workers.run(store, b"".join(batch))
        if inflight is not None:
            await inflight
            inflight = None
        if digest.size != length:
            raise Problem("bad-request", "the body is shorter than its Content-Length")
        if not digest.matches(verified.digest):
            raise Problem("digest-mismatch")
        try:
            record, new = await _thread(
                lambda: st.storage.commit_upload(
                    pending,
                    mailbox=mailbox,
                    message_id=message_id,
                    sender=verified.fingerprint,
                    digest=verified.digest,
                    size=length,
                    now=int(time.time()),
                    quota=cfg.mailbox_quota_bytes,
                )
            )
        except Conflict:
            raise Problem("message-id-conflict") from None
        except QuotaExceeded:
            raise Problem("mailbox-quota-exceeded") from None
        committed = True
    finally:
        body.close()
        st.metrics.receiving.dec()
        if not committed:
            with anyio.CancelScope(shield=True):
                if inflight is not None:
                    # never abort under a write still running
                    with contextlib.suppress(Exception):
                        await asyncio.shield(inflight)
                await _thread(pending.abort)
    return _accepted(st, verified, record, new, length)


async def list_messages(request: Request) -> Response:
    st = _state(request)
    verified = await _authenticated_empty(request)
    mailbox = request.path_params["mailbox"]
    _owner(verified, mailbox)
    try:
        limit = min(
            int(request.query_params.get("limit", st.config.list_limit)), st.config.list_limit
        )
    except ValueError:
        raise Problem("bad-request", "limit must be an integer") from None
    rows = await _thread(st.storage.waiting, mailbox, max(1, limit))
    return JSONResponse(
        {
            "messages": [
                {
                    "message_id": m.message_id,
                    "sender": m.sender,
                    "size": m.size,
                    "received_at": m.received_at,
                }
                for m in rows
            ]
        }
    )


def _range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a single-range request, None for the whole body."""
    if header is None:
        return None
    m = _RANGE_RE.fullmatch(header.strip())
    if m is None:
        return None  # RFC 9110 §14.2: an unparseable Range is ignored
    start = int(m.group(1))
    end = int(m.group(2)) + 1 if m.group(2) else size
    if start >= size or end <= start:
        raise Problem("range-not-satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, min(end, size)


async def download(request: Request) -> Response:
    st = _state(request)
    verified = await _authenticated_empty(request)
    mailbox, message_id = _message_path(request)
    _owner(verified, mailbox)
    record: StoredMessage | None = await _thread(st.storage.find, mailbox, message_id)
    reader = await _thread(st.storage.open_body, mailbox, message_id)
    if reader is None or record is None:
        raise Problem("not-found")
    etag = _etag(record.digest)
    try:
        span = _range(request.headers.get("range"), reader.size)
        if_range = request.headers.get("if-range")
        if span is not None and if_range is not None and if_range != etag:
            span = None
    except BaseException:
        await _thread(reader.close)
        raise
    start, end = span if span is not None else (0, reader.size)
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": etag,
        "Content-Length": str(end - start),
    }
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{reader.size}"
    metrics = st.metrics

    async def body() -> AsyncIterator[bytes]:
        pos = start
        try:
            while pos < end:
                data: bytes = await _thread(reader.read, pos, min(_BATCH, end - pos))
                if not data:
                    return  # acknowledged meanwhile: the client sees a short body and resumes
                pos += len(data)
                metrics.bytes.labels("out").inc(len(data))
                yield data
            if start == 0 or span is not None:
                metrics.messages.labels("downloaded").inc()
        finally:
            with anyio.CancelScope(shield=True):
                await _thread(reader.close)

    return StreamingResponse(
        body(),
        status_code=206 if span is not None else 200,
        headers=headers,
        media_type="application/octet-stream",
    )


async def acknowledge(request: Request) -> Response:
    st = _state(request)
    verified = await _authenticated_empty(request)
    mailbox, message_id = _message_path(request)
    _owner(verified, mailbox)
    done = await _thread(st.storage.acknowledge, mailbox, message_id, int(time.time()))
    if not done:
        record = await _thread(st.storage.find, mailbox, message_id)
        if record is None or record.state != COLLECTED:
            raise Problem("not-found")
    else:
        st.metrics.messages.labels("acknowledged").inc()
        event("acknowledged", caller=verified.fingerprint, message_id=message_id)
    return Response(status_code=204)


async def upload_states(request: Request) -> Response:
    st = _state(request)
    verified = await _authenticated_empty(request)
    ids = request.query_params.getlist("message_id")
    if not 1 <= len(ids) <= 100 or not all(MESSAGE_ID_RE.fullmatch(i) for i in ids):
        raise Problem("bad-request", "give 1 to 100 message_id parameters")
    rows = await _thread(st.storage.uploads, verified.fingerprint, ids)
    return JSONResponse({"uploads": [{**_record(m), "state_at": m.state_at} for m in rows]})


async def limits(request: Request) -> Response:
    cfg = _state(request).config
    await _authenticated_empty(request)
    return JSONResponse(
        {
            "max_envelope_bytes": cfg.max_envelope_bytes,
            "mailbox_quota_bytes": cfg.mailbox_quota_bytes,
            "retention_days": cfg.retention_days,
            "signature_window_seconds": cfg.signature_window,
        }
    )


# -- public -----------------------------------------------------------------------------------


async def health(request: Request) -> Response:
    st = _state(request)
    try:
        await _thread(st.storage.stats)
    except StorageError:
        raise Problem("unavailable", "storage is not answering") from None
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    data = await _thread(_state(request).metrics.render)
    return Response(data, media_type="text/plain; version=0.0.4; charset=utf-8")


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


# -- errors, logging, lifespan ----------------------------------------------------------------


def _problem_response(
    request: Request, slug: str, detail: str, headers: dict[str, str]
) -> Response:
    st: _State | None = getattr(request.app.state, "relay", None)
    if st is not None:
        st.metrics.rejections.labels(slug).inc()
    return Response(
        problem_body(slug, detail or None),
        status_code=PROBLEMS[slug].status,
        media_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


async def _on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return _problem_response(request, exc.slug, exc.detail, exc.headers)


async def _on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "bad-request")
    return _problem_response(request, slug, "", {})


async def _on_disconnect(request: Request, exc: Exception) -> Response:
    return Response(status_code=400)


async def _on_storage(request: Request, exc: Exception) -> Response:
    event("storage-error", logging.ERROR, error=type(exc).__name__)
    return _problem_response(request, "unavailable", "storage failure", {"Retry-After": "5"})


async def _on_error(request: Request, exc: Exception) -> Response:
    event("internal-error", logging.ERROR, error=type(exc).__name__)
    return _problem_response(request, "internal", "", {})


class _AccessLog:
    """One structured line per request: route template, status, caller, duration."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def wrapped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            endpoint = scope.get("endpoint")
            state = scope.get("state") or {}
            event(
                "request",
                method=scope.get("method"),
                route=getattr(endpoint, "__name__", None),
                status=status,
                caller=state.get("caller"),
                ms=round((time.perf_counter() - started) * 1000, 1),
            )


async def _sweeper(st: _State) -> None:
    cfg = st.config
    while True:
        await anyio.sleep(cfg.sweep_interval)
        try:
            await sweep(st.storage, cfg, st.metrics)
        except StorageError as exc:
            event("sweep-failed", logging.WARNING, error=type(exc).__name__)


async def sweep(
    storage: Storage, cfg: RelayConfig, metrics: Metrics | None = None, *, now: int | None = None
) -> int:
    """Expire envelopes older than the retention time and purge old records; returns how many
    envelopes expired."""
    when = int(time.time()) if now is None else now
    cutoff = when - cfg.retention_days * 86400
    total = 0
    while True:
        n: int = await _thread(storage.expire, cutoff, when)
        total += n
        if n < 500:
            break
    await _thread(storage.purge, when, cutoff)
    if total:
        if metrics is not None:
            metrics.messages.labels("expired").inc(total)
        event("expired", count=total)
    return total


def create_app(storage: Storage, config: RelayConfig | None = None) -> Starlette:
    """The relay ASGI app over ``storage``. ``config.public_urls`` is required: the app answers
    only requests signed for one of them (``serve`` fills in the address it listens on)."""
    cfg = config or RelayConfig()
    if not cfg.public_urls:
        raise ValueError("RelayConfig.public_urls is required: the URLs clients reach the relay by")
    st = _State(storage, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_sweeper, st)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
                st.workers.shutdown()

    mb = "/v1/mailboxes/{mailbox}/messages"
    routes = [
        Route("/v1/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/v1/limits", limits, methods=["GET"]),
        Route("/v1/keys", find_keys, methods=["GET"]),
        Route("/v1/keys/{fingerprint}", put_key, methods=["PUT"]),
        Route("/v1/keys/{fingerprint}", get_key, methods=["GET"]),
        Route(mb, list_messages, methods=["GET"]),
        Route(mb + "/{message_id}", upload, methods=["PUT"]),
        Route(mb + "/{message_id}", download, methods=["GET"]),
        Route(mb + "/{message_id}", acknowledge, methods=["DELETE"]),
        Route("/v1/uploads", upload_states, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            Problem: _on_problem,
            HTTPException: _on_http,
            ClientDisconnect: _on_disconnect,
            StorageError: _on_storage,
            Exception: _on_error,
        },
    )
    app.state.relay = st
    app.add_middleware(_AccessLog)
    return app
