"""Pure parts of the relay protocol and the transport's decisions (no server needed)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import json
import time

import httpx
import hypothesis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import medsecure as m
from medsecure import DeliveryRejected, IdentityError, TransportError, TransportUnavailable
from medsecure.models import Endpoint
from medsecure.relay import KeyBundle, sign_bundle, sign_request, verify_request
from medsecure.relay._digest import EMPTY_DIGEST, format_digest, parse_digest
from medsecure.relay._problems import PROBLEMS, parse_problem, problem_body
from medsecure.relay._signing import AuthError
from medsecure.relay.server._limits import RateLimiter
from medsecure.transports import AsyncRelayTransport, ClockSkew, RelayTransport

URL = "http://127.0.0.1:9/v1/mailboxes/ms1x/messages"
MID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


def _verify(identity, headers, *, method="GET", url=URL, now=None, known=True):
    return verify_request(
        method,
        url,
        headers.items(),
        resolve=lambda k: identity.public if known and k == identity.fingerprint else None,
        now=time.time() if now is None else now,
        window=60,
    )


@pytest.mark.parametrize("suite", ["hybrid", "classic"])
def test_signatures_round_trip_and_bind_the_request(suite):
    me = m.Identity.generate(suite)
    headers = sign_request(me, "GET", URL, EMPTY_DIGEST)
    assert ("sig2=" in headers["Signature"]) == (suite == "hybrid")
    got = _verify(me, headers)
    assert got.caller == me.public and got.digest == EMPTY_DIGEST
    for method, url in (("DELETE", URL), ("GET", URL + "?limit=1"), ("GET", URL.replace("9", "8"))):
        with pytest.raises(AuthError) as err:
            _verify(me, headers, method=method, url=url)
        assert err.value.slug == "signature-invalid"
    tampered = {**headers, "Content-Digest": format_digest(hashlib.sha256(b"x").digest())}
    with pytest.raises(AuthError) as err:
        _verify(me, tampered)
    assert err.value.slug == "signature-invalid"
    with pytest.raises(AuthError) as err:
        _verify(me, headers, known=False)
    assert err.value.slug == "unknown-key"
    with pytest.raises(AuthError) as err:
        _verify(me, headers, now=time.time() + 120)
    assert err.value.slug == "signature-expired"
    with pytest.raises(AuthError) as err:
        _verify(me, {k: v for k, v in headers.items() if k != "Signature"})
    assert err.value.slug == "unauthenticated"


def test_a_hybrid_signature_needs_both_halves():
    me = m.Identity.generate()
    headers = sign_request(me, "GET", URL, EMPTY_DIGEST)
    other = sign_request(me, "GET", URL, EMPTY_DIGEST)  # another nonce
    mixed = dict(headers)
    # sig2 from another request: each verifies alone, together they do not match
    mixed["Signature-Input"] = (
        headers["Signature-Input"].split(", sig2=")[0]
        + ", sig2="
        + other["Signature-Input"].split(", sig2=")[1]
    )
    mixed["Signature"] = (
        headers["Signature"].split(", sig2=")[0]
        + ", sig2="
        + other["Signature"].split(", sig2=")[1]
    )
    with pytest.raises(AuthError) as err:
        _verify(me, mixed)
    assert err.value.slug == "signature-invalid"


def test_a_classic_identity_signs_with_sig1_only():
    """A classic identity's request carrying another signature beside sig1 (which nothing would
    check) is refused, whatever that signature is."""
    me = m.Identity.generate(suite="classic")
    headers = sign_request(me, "GET", URL, EMPTY_DIGEST)
    _verify(me, headers)  # as signed: accepted
    params = headers["Signature-Input"].split("=", 1)[1]
    extra = dict(headers)
    extra["Signature-Input"] = headers["Signature-Input"] + ", sig2=" + params
    extra["Signature"] = headers["Signature"] + ", sig2=:AAAA:"
    with pytest.raises(AuthError) as err:
        _verify(me, extra)
    assert err.value.slug == "signature-invalid"
    only_signature = dict(headers)
    only_signature["Signature"] = headers["Signature"] + ", other=:AAAA:"
    with pytest.raises(AuthError):
        _verify(me, only_signature)


@pytest.mark.parametrize(
    "value",
    ["", "sha-256=abc", "sha-512=:" + "A" * 88 + ":", "sha-256=:AAAA:", "x" * 2000, "sha-256=:é:"],
)
def test_malformed_content_digests_are_refused(value):
    with pytest.raises(ValueError):
        parse_digest(value)
    assert parse_digest(format_digest(EMPTY_DIGEST)) == EMPTY_DIGEST


def test_key_bundles_verify_their_self_signature():
    me = m.Identity.generate()
    bundle = sign_bundle(me, identifiers=["rpps:10003456789"])
    assert KeyBundle.parse(bundle.raw).identifiers == ("810003456789",)
    raw = bytearray(bundle.raw)
    raw[-10] ^= 1
    with pytest.raises(IdentityError):
        KeyBundle.parse(bytes(raw))
    with pytest.raises(IdentityError):
        KeyBundle.parse(b"\xa0")
    with pytest.raises(IdentityError):
        KeyBundle.parse(b"\x00" * (70 * 1024))


def test_problem_documents_have_stable_types():
    for slug, p in PROBLEMS.items():
        body = json.loads(problem_body(slug, "why"))
        assert body["type"] == f"urn:medsecure:relay:problem:{slug}" and body["status"] == p.status
        assert parse_problem(problem_body(slug)) == slug
    assert parse_problem(b"<html>") is None
    assert parse_problem(b'{"type": "about:blank"}') is None


def test_rate_limiter_bursts_then_paces():
    limiter = RateLimiter(rate=2.0, burst=3, max_keys=2)
    assert [limiter.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a", 0.0) == pytest.approx(0.5)
    assert limiter.take("a", 1.0) == 0.0
    limiter.take("b", 1.0)
    limiter.take("c", 1.0)
    assert "a" not in limiter._buckets  # bounded memory


# -- the transport against a scripted relay (injected httpx clients) ----------------------------


def _script(answers):
    """A fake relay answering from a list; records the requests."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        if request.url.path.startswith("/v1/keys/"):
            return httpx.Response(204)
        status, headers, body = answers.pop(0)
        return httpx.Response(status, headers=headers, content=body)

    return handler, seen


def _problem(slug: str) -> bytes:
    return problem_body(slug)


RECORD = json.dumps(
    {"mailbox": "x", "message_id": MID, "size": 5, "received_at": 1, "state": "waiting"}
).encode()


def _run_sync(identity, answers, **kw):
    handler, seen = _script(answers)
    slept: list[float] = []
    with RelayTransport(
        identity,
        "http://relay.test",
        client=httpx.Client(transport=httpx.MockTransport(handler)),
        sleep=slept.append,
        **kw,
    ) as t:
        box = Endpoint(kind="relay", url="http://relay.test", mailbox=identity.fingerprint)
        t.deliver(box, io.BytesIO(b"hello"), message_id=MID, size=5)
    return seen, slept


def _run_async(identity, answers, **kw):
    handler, seen = _script(answers)
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    async def go() -> None:
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        async with AsyncRelayTransport(
            identity, "http://relay.test", client=client, sleep=sleep, **kw
        ) as t:
            box = Endpoint(kind="relay", url="http://relay.test", mailbox=identity.fingerprint)
            await t.deliver(box, io.BytesIO(b"hello"), message_id=MID, size=5)
        await client.aclose()

    asyncio.run(go())
    return seen, slept


RUNNERS = {"sync": _run_sync, "async": _run_async}


@pytest.mark.parametrize("run", sorted(RUNNERS))
def test_retries_reuse_the_message_id_and_honour_retry_after(run, alice):
    answers = [
        (503, {}, _problem("unavailable")),
        (429, {"Retry-After": "7"}, _problem("rate-limited")),
        (201, {}, RECORD),
    ]
    seen, slept = RUNNERS[run](alice, answers, backoff=0.25)
    uploads = [r for r in seen if r.method == "PUT" and "/messages/" in r.url.path]
    assert len(uploads) == 3 and {r.url.path for r in uploads} == {uploads[0].url.path}
    assert all(r.content == b"hello" for r in uploads)
    assert len({r.headers["signature"] for r in uploads}) == 3  # each attempt signed anew
    assert slept[0] <= 0.25 and slept[1] == 7.0


@pytest.mark.parametrize("run", sorted(RUNNERS))
@pytest.mark.parametrize(
    ("status", "slug", "error"),
    [
        (413, "envelope-too-large", DeliveryRejected),
        (409, "message-id-conflict", DeliveryRejected),
        (403, "sender-not-allowed", DeliveryRejected),
        (507, "mailbox-quota-exceeded", TransportUnavailable),
        (401, "signature-expired", TransportUnavailable),
        (401, "signature-expired", ClockSkew),
        (400, "bundle-time-invalid", ClockSkew),
        (401, "unauthenticated", DeliveryRejected),
        (401, "signature-invalid", DeliveryRejected),
        (404, "not-found", DeliveryRejected),
        (405, "method-not-allowed", DeliveryRejected),
        (503, "unavailable", TransportUnavailable),
    ],
)
def test_refusals_map_to_the_error_tree(run, status, slug, error, alice):
    answers = [(status, {}, _problem(slug))] * 3
    with pytest.raises(error, match=slug):
        RUNNERS[run](alice, answers, retries=2)


@pytest.mark.parametrize("run", sorted(RUNNERS))
@pytest.mark.parametrize("status", [404, 405, 410])
def test_a_refusal_without_a_problem_body_is_not_retried(run, status, alice):
    """A server that is not a medsecure relay (or a proxy) answers in its own words: a 4xx is
    still a refusal retrying cannot change; 404 and 405 point at the URL."""
    with pytest.raises(DeliveryRejected, match=str(status)) as caught:
        RUNNERS[run](alice, [(status, {}, b"<html>no</html>")] * 3, retries=2)
    assert ("relay URL" in str(caught.value)) == (status != 410)


@pytest.mark.parametrize("run", sorted(RUNNERS))
def test_a_long_retry_after_is_left_to_the_outbox(run, alice):
    with pytest.raises(TransportUnavailable, match="retry after 3600"):
        RUNNERS[run](alice, [(429, {"Retry-After": "3600"}, _problem("rate-limited"))])


def test_hostile_listings_are_filtered(alice):
    bodies = [
        json.dumps(
            {
                "messages": [
                    {"message_id": MID, "size": 5},
                    {"message_id": "../../etc/passwd", "size": 1},
                    {"message_id": MID, "size": -1},
                    {"message_id": MID, "size": True},
                    "junk",
                ]
            }
        ).encode(),
        b"not json",
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            return httpx.Response(204)
        return httpx.Response(200, content=bodies.pop(0))

    with RelayTransport(
        alice, "http://relay.test", client=httpx.Client(transport=httpx.MockTransport(handler))
    ) as t:
        assert [(i.message_id, i.size) for i in t.list()] == [(MID, 5)]
        with pytest.raises(TransportError):
            t.list()


def test_endpoints_from_a_directory_are_checked(alice):
    with RelayTransport(
        alice,
        "http://relay.test",
        client=httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(500))),
    ) as t:
        with pytest.raises(DeliveryRejected, match="malformed mailbox"):
            t.deliver(
                Endpoint(kind="relay", url="http://relay.test", mailbox="../x"),
                io.BytesIO(b""),
                message_id=MID,
                size=0,
            )
        with pytest.raises(DeliveryRejected, match="malformed URL"):
            t.deliver(
                Endpoint(kind="relay", url="ftp://x", mailbox=alice.fingerprint),
                io.BytesIO(b""),
                message_id=MID,
                size=0,
            )
        with pytest.raises(ValueError):
            t.deliver(
                Endpoint(kind="relay", url="http://relay.test", mailbox=alice.fingerprint),
                io.BytesIO(b""),
                message_id="bad",
                size=0,
            )


def test_a_hostile_relay_cannot_make_a_download_or_an_answer_unbounded(alice):
    from medsecure.transports import Incoming

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            return httpx.Response(204)
        if request.url.path.endswith("/messages"):
            return httpx.Response(200, content=b"[" * (9 << 20))
        # a body longer than listed, without Content-Length
        return httpx.Response(200, content=iter([b"a" * 1000] * 50))

    client = httpx.Client(transport=httpx.MockTransport(handler))
    with RelayTransport(alice, "http://relay.test", client=client) as t:
        with pytest.raises(TransportError, match="too large"):
            t.list()
        with t.fetch(Incoming(handle=MID, message_id=MID, size=1500)) as fh:
            assert fh.read() == b"a" * 1500


# -- the verifier's fast path for the Signature field ---------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def _library_parse(value: str):
    import http_sf

    parsed = http_sf.parse(value.encode("latin-1"), tltype="dictionary", on_duplicate_key=_dup)
    return {label: (member, params) for label, (member, params) in parsed.items()}


def _dup(key, context):
    if context == "dictionary":
        raise ValueError("duplicate")


def _fast(value: str):
    from medsecure.relay._signing import fast_signature_field

    found = fast_signature_field(value)
    return None if found is None else {k: (v.value, dict(v.params)) for k, v in found.items()}


@given(
    st.one_of(
        st.text(alphabet=_B64 + ":=, sig12;\t\"'", max_size=60),
        st.builds(
            lambda a, x, b, y, sep: f"{a}=:{x}:" + (f"{sep}{b}=:{y}:" if b else ""),
            st.sampled_from(["sig1", "sig2", "sig3", "Sig1"]),
            st.text(alphabet=_B64, max_size=24),
            st.sampled_from(["", "sig1", "sig2"]),
            st.text(alphabet=_B64, max_size=24),
            st.sampled_from([", ", ",", " , ", ",  "]),
        ),
    )
)
@settings(max_examples=2000, deadline=None)
def test_the_signature_fast_path_parses_as_the_library_does_or_declines(value):
    fast = _fast(value)
    if fast is None:
        return  # declined: the library parses it (and refuses it, or not) as before
    assert fast == _library_parse(value)


@pytest.mark.parametrize("suite", ["hybrid", "classic"])
def test_our_signature_fields_take_the_fast_path(suite):
    headers = sign_request(m.Identity.generate(suite), "GET", URL, EMPTY_DIGEST)
    assert _fast(headers["Signature"]) == _library_parse(headers["Signature"])


def test_a_signature_must_cover_exactly_the_protocols_components():
    from http_message_signatures import HTTPMessageSigner, algorithms

    from medsecure.relay._signing import SIGNATURE_TAG, _Message

    me = m.Identity.generate("classic")
    for covered in (("@method", "@authority"), ("@method", "@authority", "@path", "@query")):
        message = _Message("GET", URL, [("Content-Digest", format_digest(EMPTY_DIGEST))])
        signer = HTTPMessageSigner(signature_algorithm=algorithms.ED25519)
        prepared = signer.prepare(
            message,
            key_id=me.fingerprint,
            nonce="n" * 22,
            label="sig1",
            tag=SIGNATURE_TAG,
            covered_component_ids=covered,
            use_existing_digest=True,
        )
        signer.apply(message, prepared, me._ed25519.sign(prepared.signature_base))
        with pytest.raises(AuthError) as err:
            _verify(me, dict(message.headers.items()))
        assert err.value.slug == "signature-invalid"


# -- key look-ups by identifier: every page, bounded -----------------------------------------


def _paging_relay(bundles: list[bytes], *, endless: bool = False):
    """A scripted relay paging ``bundles`` two at a time (or answering ``next`` forever)."""
    import base64

    asked: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            return httpx.Response(204)
        after = request.url.params.get("after")
        asked.append(after)
        start = int(after.split(".")[0]) if after else 0
        page = bundles[start : start + 2] if not endless else bundles[:1]
        doc: dict[str, object] = {
            "bundles": [base64.urlsafe_b64encode(b).decode().rstrip("=") for b in page]
        }
        if endless or start + 2 < len(bundles):
            doc["next"] = f"{start + 2}.ms1{'a' * 52}"
        return httpx.Response(200, json=doc)

    return handler, asked


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_look_up_by_identifier_reads_every_page_and_no_more_than_it_may(kind, alice):
    from medsecure.transports._relay import _MAX_KEY_PAGES

    holders = [m.Identity.generate() for _ in range(5)]
    raws = [sign_bundle(h, identifiers=("810003456789",)).raw for h in holders]

    def look_up(handler) -> list[KeyBundle]:
        if kind == "sync":
            client = httpx.Client(transport=httpx.MockTransport(handler))
            with RelayTransport(alice, "http://relay.test", client=client) as t:
                return list(t.find_keys(identifier="rpps:10003456789"))

        async def go() -> list[KeyBundle]:
            client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
            async with AsyncRelayTransport(alice, "http://relay.test", client=client) as t:
                found = list(await t.find_keys(identifier="rpps:10003456789"))
            await client.aclose()
            return found

        return asyncio.run(go())

    handler, asked = _paging_relay(raws)
    assert [b.public for b in look_up(handler)] == [h.public for h in holders]
    assert asked == [None, f"2.ms1{'a' * 52}", f"4.ms1{'a' * 52}"]
    # a relay that never stops paging gets an error, not a partial answer
    handler, asked = _paging_relay(raws, endless=True)
    with pytest.raises(TransportError, match="incomplete"):
        look_up(handler)
    assert len(asked) == _MAX_KEY_PAGES


def test_public_urls_name_the_hosts_a_relay_answers_for():
    from medsecure.relay.server import default_public_urls
    from medsecure.relay.server._config import public_authorities

    assert public_authorities(["https://Relay.Example", "http://relay.example:8080/"]) == {
        "relay.example",
        "relay.example:443",
        "relay.example:8080",
    }
    assert public_authorities(["http://[::1]:8443"]) == {"[::1]:8443"}
    for bad in ("ftp://relay.example", "https://relay.example/v1", "https://u@relay.example", "x"):
        with pytest.raises(ValueError):
            public_authorities([bad])
    # by default: the listening address, with every loopback name of it on loopback
    assert public_authorities(default_public_urls("127.0.0.1", 8443, tls=False)) == {
        "127.0.0.1:8443",
        "localhost:8443",
        "[::1]:8443",
    }
    assert public_authorities(default_public_urls("relay.internal", 443, tls=True)) == {
        "relay.internal",
        "relay.internal:443",
    }
    for everywhere in ("0.0.0.0", "::", "[::]", ""):
        with pytest.raises(ValueError, match="public"):
            default_public_urls(everywhere, 8443, tls=False)


def test_a_page_of_keys_is_bounded_in_count_and_in_bytes():
    from medsecure.relay._bundle import MAX_BUNDLE_BYTES
    from medsecure.relay.server._app import KEYS_PAGE_BYTES, keys_page
    from medsecure.transports._relay import _MAX_JSON

    fp = "ms1" + "a" * 52
    small = [(i, fp, b"s" * 100) for i in range(6)]
    assert keys_page(small[:3], 5) == {"bundles": ["c3Nz" * 33 + "cw"] * 3}
    page = keys_page(small, 5)
    assert len(page["bundles"]) == 5 and page["next"] == f"4.{fp}"
    # bundles of the largest size: fewer per page, a page well under what a client reads
    big = [(i, fp, b"b" * MAX_BUNDLE_BYTES) for i in range(101)]
    page = keys_page(big, 100)
    count = len(page["bundles"])
    assert 1 < count < 100 and page["next"] == f"{count - 1}.{fp}"
    assert len(json.dumps(page)) <= KEYS_PAGE_BYTES + 1000 < _MAX_JSON
    # one bundle always fits
    assert len(keys_page([(0, fp, b"b" * (KEYS_PAGE_BYTES * 2))], 100)["bundles"]) == 1


# -- the verifier's strict path for the form sign_request writes ------------------------------

_NOW = 1_800_000_000
_FAST_URLS = (
    "http://127.0.0.1:8443/v1/mailboxes/ms1" + "a" * 52 + "/messages/" + MID,
    "https://relay.example/v1/keys?identifier=rpps%3A10003456789&limit=5",
    "http://localhost:9/v1/uploads?message_id=" + MID + "&message_id=" + MID,
)


@functools.cache
def _signed_requests():
    """(identity, method, url, header fields) signed once for the whole module: a hybrid and a
    classic identity, and URLs the strict path takes or declines."""
    urls = (
        *_FAST_URLS,
        "http://127.0.0.1:80/v1/limits",  # a default port: @authority drops it
        "http://Relay.Example:8443/v1/limits",  # @authority is lowercased
        "http://[::1]:8443/v1/limits",
        "http://127.0.0.1:8443/v1/keys/a%2fb?x=%7e",  # lower-case percent escapes
    )
    found = []
    for suite in ("hybrid", "classic"):
        me = m.Identity.generate(suite)
        for i, url in enumerate(urls):
            method = ("PUT", "GET", "DELETE")[i % 3]
            digest = hashlib.sha256(url.encode()).digest()
            headers = sign_request(me, method, url, digest, created=_NOW)
            found.append((me, method, url, [(k.lower(), v) for k, v in headers.items()]))
    return found


def _outcome(verify, *args, **kwargs):
    try:
        got = verify(*args, **kwargs)
    except AuthError as exc:
        return ("refused", exc.slug)
    if got is None:
        return None
    return ("accepted", got.fingerprint, got.created, got.nonce, got.digest)


def _both(method, url, fields, resolve, now):
    from medsecure.relay._signing import _fast_verify, _library_verify

    fast = _outcome(_fast_verify, method, url, fields, resolve, now, 60)
    library = _outcome(_library_verify, method, url, fields, resolve=resolve, now=now, window=60)
    return fast, library


def test_our_requests_take_the_strict_path_and_it_agrees_with_the_library():
    taken = 0
    for me, method, url, fields in _signed_requests():
        fast, library = _both(method, url, fields, lambda k, me=me: me.public, _NOW)
        assert library is not None and library[0] == "accepted"
        if url in _FAST_URLS:
            assert fast == library
            taken += 1
        else:
            assert fast is None  # declined: the library decides
    assert taken == 2 * len(_FAST_URLS)


_EDIT_ALPHABET = 'abcsig12=:;,() "\\@-_+/AZ09\t'


@given(
    which=st.integers(min_value=0, max_value=13),
    field=st.sampled_from(["signature-input", "signature", "content-digest", "url", "method"]),
    edit=st.sampled_from(["replace", "delete", "insert"] + ["none"] * 6),
    change=st.sampled_from(
        ["none"] * 8
        + ["created", "nonce", "keyid", "path", "alg", "labels", "swap-signature", "digest"]
        + ["method"]
    ),
    where=st.integers(min_value=0, max_value=10_000),
    char=st.sampled_from(list(_EDIT_ALPHABET)),
    shape=st.sampled_from(
        ["as-is"] * 6 + ["drop-sig2", "swap", "twice", "lower-case-name", "no-digest", "reorder"]
    ),
    key=st.sampled_from(["own", "unknown", "other", "wrong-fingerprint"]),
    skew=st.sampled_from([0, 0, 0, 59, -59, 60, -60, 61, -61, 10**12]),
)
@settings(max_examples=1500, deadline=None)
def test_the_strict_path_decides_as_the_library_on_hostile_variations(
    which, field, edit, where, char, change, shape, key, skew
):
    requests = _signed_requests()
    me, method, url, fields = requests[which % len(requests)]
    other = requests[(which + len(requests) // 2) % len(requests)][0]
    values = dict(fields)
    texts = {**values, "url": url, "method": method}
    text = texts[field]
    i = where % (len(text) + 1)
    if edit == "replace" and text:
        text = text[: min(i, len(text) - 1)] + char + text[min(i, len(text) - 1) + 1 :]
    elif edit == "delete" and text:
        text = text[: min(i, len(text) - 1)] + text[min(i, len(text) - 1) + 1 :]
    elif edit == "insert":
        text = text[:i] + char + text[i:]
    texts[field] = text
    # changes that keep the form sign_request writes (the strict path decides them)
    si = texts["signature-input"]
    if change == "created":
        texts["signature-input"] = si.replace(f"created={_NOW}", f"created={_NOW + 1}", 1)
    elif change == "nonce":
        texts["signature-input"] = si.replace('nonce="', 'nonce="A', 1)
    elif change == "keyid":
        texts["signature-input"] = si.replace(me.fingerprint, other.fingerprint)
    elif change == "path":
        texts["url"] = texts["url"].replace("/v1/", "/v2/")
    elif change == "alg":
        texts["signature-input"] = si.replace('"ed25519"', '"ml-dsa-65"', 1)
    elif change == "labels":
        texts["signature"] = texts["signature"].replace("sig1=", "sig3=").replace("sig2=", "sig1=")
    elif change == "swap-signature":
        texts["signature"] = ", ".join(reversed(texts["signature"].split(", ")))
    elif change == "digest":
        texts["content-digest"] = format_digest(hashlib.sha256(b"another body").digest())
    elif change == "method":
        texts["method"] = "POST"
    lines = [(name, texts[name]) for name in ("signature-input", "signature", "content-digest")]
    if shape == "drop-sig2":
        lines = [(n, v.split(", sig2=")[0]) if n != "content-digest" else (n, v) for n, v in lines]
    elif shape == "swap":
        lines = [(n, ", ".join(reversed(v.split(", ")))) for n, v in lines]
    elif shape == "twice":
        name, value = lines[0]
        lines = [(name, value.split(", ")[0]), (name, ", ".join(value.split(", ")[1:])), *lines[1:]]
    elif shape == "lower-case-name":
        lines = [(n.upper(), v) for n, v in lines]
    elif shape == "no-digest":
        lines = lines[:2]
    elif shape == "reorder":
        lines = [
            (n, v.replace(';alg="ed25519";nonce=', ';nonce=X;alg="ed25519";nonce='))
            for n, v in lines
        ]
    resolve = {
        "own": lambda k: me.public if k == me.fingerprint else None,
        "unknown": lambda k: None,
        "other": lambda k: other.public,
        "wrong-fingerprint": lambda k: other.public if k == me.fingerprint else None,
    }[key]
    from medsecure.relay._signing import _VERIFIED_FIELDS

    # as verify_request hands them over: its three fields, names in lower case
    lowered = [(n.lower(), v) for n, v in lines if n.lower() in _VERIFIED_FIELDS]
    fast, library = _both(texts["method"], texts["url"], lowered, resolve, _NOW + skew)
    if fast is not None:
        assert fast == library
    hypothesis.event("strict path: " + ("declined" if fast is None else fast[0]))


@pytest.mark.parametrize("differ", ["nonce", "created"])
def test_both_signatures_must_sign_the_same_request_on_either_path(differ):
    """A hybrid caller's two signatures, each valid, over requests with different nonces or
    creation times: refused (the strict path declines, the library refuses)."""
    from medsecure.relay._signing import _fast_verify

    me = m.Identity.generate("hybrid")
    url = _FAST_URLS[0]
    one = sign_request(me, "PUT", url, EMPTY_DIGEST, created=_NOW, nonce="n" * 22)
    two = sign_request(
        me,
        "PUT",
        url,
        EMPTY_DIGEST,
        created=_NOW + (differ == "created"),
        nonce="m" * 22 if differ == "nonce" else "n" * 22,
    )
    spliced = {
        "content-digest": one["Content-Digest"],
        "signature-input": ", ".join(
            [
                one["Signature-Input"].split(", sig2=")[0],
                "sig2=" + two["Signature-Input"].split(", sig2=")[1],
            ]
        ),
        "signature": ", ".join(
            [one["Signature"].split(", sig2=")[0], "sig2=" + two["Signature"].split(", sig2=")[1]]
        ),
    }
    fields = list(spliced.items())
    assert _fast_verify("PUT", url, fields, lambda k: me.public, _NOW, 60) is None
    with pytest.raises(AuthError) as err:
        verify_request("PUT", url, fields, resolve=lambda k: me.public, now=_NOW, window=60)
    assert err.value.slug == "signature-invalid"


# -- the relay's worker threads ---------------------------------------------------------------


def test_relay_workers_answer_each_caller_and_drop_work_cancelled_before_it_starts():
    import threading

    from medsecure.relay.server._app import _Workers

    async def scenario():
        workers = _Workers(2, "test-relay")
        gate = threading.Event()
        ran: list[str] = []

        def blocked(name):
            gate.wait(30)
            ran.append(name)
            return name

        def fail():
            raise ValueError("refused")

        # two threads at most: both busy, so the third piece of work waits in the queue
        first, second = workers.run(blocked, "a"), workers.run(blocked, "b")
        third = workers.run(blocked, "c")
        third.cancel()
        gate.set()
        assert await asyncio.gather(first, second) == ["a", "b"]
        with pytest.raises(ValueError, match="refused"):
            await workers.run(fail)
        assert await asyncio.gather(*(workers.run(len, "x" * i) for i in range(50))) == list(
            range(50)
        )
        assert sorted(ran) == ["a", "b"]  # the cancelled one never ran
        assert workers._threads == 2
        workers.shutdown()
        with pytest.raises(RuntimeError):
            workers.run(len, "")

    asyncio.run(scenario())


def test_verification_slots_admit_at_most_their_count_at_once():
    import threading

    from medsecure.relay.server._app import _Slots

    slots = _Slots(2)
    slots.__enter__()
    slots.__enter__()
    entered = threading.Event()

    def third():
        with slots:
            entered.set()

    waiting = threading.Thread(target=third)
    waiting.start()
    waiting.join(0.3)  # a wrong bound lets it through at once; a right one holds it
    assert waiting.is_alive() and not entered.is_set()
    slots.__exit__(None, None, None)
    waiting.join(30)
    assert entered.is_set()
    slots.__exit__(None, None, None)
    with slots, slots:  # both slots are free again
        pass


_KEYS = "https://relay.example/v1/keys?identifier=rpps%3A10001234567"


@pytest.mark.parametrize(
    ("signed", "received"),
    [
        # what follows "#" is no part of the signed @path or @query, but an ASGI server (uvicorn
        # with h11) hands it to the app as part of the path or of the query string
        (_KEYS, _KEYS + "#&identifier=adeli%3A123456789"),
        (_KEYS, _KEYS + "#"),
        (_KEYS + "&limit=5", _KEYS + "&limit=5#?limit=1"),
        ("https://relay.example/v1/limits", "https://relay.example/v1/limits#?x=1"),
        # user information is left out of @authority
        (_KEYS, _KEYS.replace("https://", "https://someone@")),
    ],
)
@pytest.mark.parametrize("suite", ["hybrid", "classic"])
def test_a_fragment_cannot_carry_what_the_signature_does_not_cover(signed, received, suite):
    me = m.Identity.generate(suite)
    headers = sign_request(me, "GET", signed, EMPTY_DIGEST, created=_NOW)
    fields = [(k.lower(), v) for k, v in headers.items()]
    assert verify_request("GET", signed, fields, resolve=lambda k: me.public, now=_NOW, window=60)
    with pytest.raises(AuthError) as err:
        verify_request("GET", received, fields, resolve=lambda k: me.public, now=_NOW, window=60)
    assert err.value.slug == "signature-invalid"
