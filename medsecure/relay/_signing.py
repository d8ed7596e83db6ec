"""Request signatures of the relay protocol: RFC 9421 HTTP Message Signatures with the caller's
identity keys, over the method, the target, ``Content-Digest`` (RFC 9530), a creation time and a
nonce.

Theory of operation
-------------------
Every relay request carries ``Content-Digest`` (of its body, empty or not) and one signature per
signing key of the caller's identity, in one ``Signature-Input`` / ``Signature`` pair:

* ``sig1`` — Ed25519 (RFC 9421 §3.3.6, ``alg="ed25519"``);
* ``sig2`` — ML-DSA-65 (FIPS 204), for a hybrid identity, under the algorithm name
  ``ml-dsa-65`` (not in the IANA registry yet: RFC 9421 §3.3.7 allows application-specific
  algorithms), with the FIPS 204 context string ``medsecure/v1/relay-request``.

Both cover the same components — ``"@method" "@authority" "@path" "@query" "content-digest"``
— and carry the same ``created``, ``nonce``, ``keyid`` (the caller's ``ms1…`` fingerprint) and
``tag`` (``medsecure-relay-v1``). A hybrid identity must present both and both must verify,
as for envelope signatures (docs/format.md). ``@scheme`` and ``@target-uri`` are not covered so
that a TLS-terminating reverse proxy can stand in front of the relay; it must pass ``Host``
through unchanged (docs/relay.md).

``http-message-signatures`` builds and parses the signature base and the structured fields and
runs the signature algorithms, including the custom ML-DSA one; this module adds what it leaves
to its caller: the two-signature policy, the time window, and (in the server) nonce replay and
the streamed digest.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import http_sf
from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives.asymmetric import mldsa
from http_message_signatures import (
    HTTPMessageSigner,
    HTTPMessageVerifier,
    HTTPSignatureAlgorithm,
    HTTPSignatureKeyResolver,
    algorithms,
)
from http_message_signatures.exceptions import HTTPMessageSignaturesException
from http_message_signatures.structures import CaseInsensitiveDict
from http_sf.compat import Dictionary, Item

from .._identity import Identity, PublicIdentity
from ..envelope._labels import LABEL_RELAY_REQUEST as MLDSA_CONTEXT
from ._digest import format_digest, parse_digest

__all__ = [
    "COVERED_COMPONENTS",
    "SIGNATURE_TAG",
    "AuthError",
    "VerifiedRequest",
    "sign_request",
    "verify_request",
]

SIGNATURE_TAG: Final = "medsecure-relay-v1"
COVERED_COMPONENTS: Final = ("@method", "@authority", "@path", "@query", "content-digest")
LABEL_ED25519: Final = "sig1"
LABEL_MLDSA: Final = "sig2"
_COVERED_KEYS: Final = [f'"{c}"' for c in COVERED_COMPONENTS] + ['"@signature-params"']
_VERIFIED_FIELDS: Final = frozenset({"signature-input", "signature", "content-digest"})
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")
_KEYID_RE = re.compile(r"ms1[a-z2-7]{52}")


class _MLDSA65(HTTPSignatureAlgorithm):
    """ML-DSA-65 (FIPS 204) as an RFC 9421 signature algorithm, with a context string."""

    algorithm_id = "ml-dsa-65"

    def __init__(self, public_key: Any = None, private_key: Any = None) -> None:
        if public_key is not None and not isinstance(public_key, mldsa.MLDSA65PublicKey):
            raise HTTPMessageSignaturesException("Unexpected public key type")
        if private_key is not None and not isinstance(private_key, mldsa.MLDSA65PrivateKey):
            raise HTTPMessageSignaturesException("Unexpected private key type")
        self.public_key = public_key
        self.private_key = private_key

    def sign(self, message: bytes) -> bytes:
        if self.private_key is None:
            raise HTTPMessageSignaturesException("no private key")
        signature: bytes = self.private_key.sign(message, MLDSA_CONTEXT)
        return signature

    def verify(self, signature: bytes, message: bytes) -> None:
        if self.public_key is None:
            raise HTTPMessageSignaturesException("no public key")
        self.public_key.verify(signature, message, MLDSA_CONTEXT)


class _Message:
    """The request view ``http-message-signatures`` resolves components from."""

    def __init__(self, method: str, url: str, headers: Iterable[tuple[str, str]]) -> None:
        self.method = method
        self.url = url
        self.headers = CaseInsensitiveDict()  # type: ignore[no-untyped-call]
        for name, value in headers:
            if name in self.headers:
                self.headers[name] = self.headers[name] + ", " + value
            else:
                self.headers[name] = value


def new_nonce() -> str:
    """128 random bits, base64url."""
    return base64.urlsafe_b64encode(os.urandom(16)).decode("ascii").rstrip("=")


def sign_request(
    identity: Identity,
    method: str,
    url: str,
    digest: bytes,
    *,
    created: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The ``Content-Digest``, ``Signature-Input`` and ``Signature`` headers of one request.

    ``url`` is the absolute, already encoded URL the request goes to; ``digest`` the SHA-256 of
    its body (of ``b""`` when it has none). ``created`` and ``nonce`` are for tests.
    """
    if not isinstance(identity, Identity):
        raise TypeError("identity must be an Identity")
    message = _Message(method.upper(), url, [("Content-Digest", format_digest(digest))])
    when = dt.datetime.fromtimestamp(
        created if created is not None else dt.datetime.now(dt.UTC).timestamp(), dt.UTC
    )
    once = nonce if nonce is not None else new_nonce()
    keys: list[tuple[str, type[HTTPSignatureAlgorithm], Any]] = [
        (LABEL_ED25519, algorithms.ED25519, identity._ed25519)
    ]
    if identity._mldsa is not None:
        keys.append((LABEL_MLDSA, _MLDSA65, identity._mldsa))
    inputs: list[str] = []
    values: list[str] = []
    try:
        for label, algorithm, key in keys:
            signer = HTTPMessageSigner(signature_algorithm=algorithm)
            prepared = signer.prepare(
                message,
                key_id=identity.fingerprint,
                created=when,
                nonce=once,
                label=label,
                tag=SIGNATURE_TAG,
                covered_component_ids=COVERED_COMPONENTS,
                use_existing_digest=True,
            )
            signature = algorithm(private_key=key).sign(prepared.signature_base)
            inputs.append(f"{label}={prepared.signature_params}")
            values.append(f"{label}=:{base64.b64encode(signature).decode('ascii')}:")
    except HTTPMessageSignaturesException as exc:
        # Only a malformed URL gets here (every other input is ours).
        raise ValueError(f"cannot sign a request to this URL: {exc}") from exc
    # The library's ``apply`` would re-parse and rebuild what ``prepare`` just built (it guards
    # against a message changed while an external signer works); ours signs in place, so the two
    # members are written directly: an RFC 8941 dictionary of fixed tokens, each the serialized
    # inner list ``prepare`` returned, or a byte sequence.
    return {
        **dict(message.headers.items()),
        "Signature-Input": ", ".join(inputs),
        "Signature": ", ".join(values),
    }


class AuthError(Exception):
    """A request failed authentication; ``slug`` is its problem type (see ``_problems``)."""

    def __init__(self, slug: str, detail: str = "") -> None:
        super().__init__(detail or slug)
        self.slug = slug
        self.detail = detail


@dataclass(frozen=True)
class VerifiedRequest:
    """What a verified signature establishes about a request."""

    caller: PublicIdentity
    created: int
    nonce: str
    digest: bytes
    """The SHA-256 the signed ``Content-Digest`` names: the body must still be checked against it."""

    @property
    def fingerprint(self) -> str:
        return self.caller.fingerprint


class _Resolver(HTTPSignatureKeyResolver):
    def __init__(self, resolve: Callable[[str], PublicIdentity | None], which: str) -> None:
        self._resolve = resolve
        self._which = which
        self.identity: PublicIdentity | None = None
        self.unknown = False

    def resolve_public_key(self, key_id: str) -> Any:
        if not isinstance(key_id, str) or not _KEYID_RE.fullmatch(key_id):
            return None
        identity = self._resolve(key_id)
        if identity is None or identity.fingerprint != key_id:
            self.unknown = True
            return None
        self.identity = identity
        return identity._ed25519 if self._which == LABEL_ED25519 else identity._mldsa

    def resolve_private_key(self, key_id: str) -> Any:  # pragma: no cover - verification only
        raise NotImplementedError


class _Verifier(HTTPMessageVerifier):
    # The library checks only that ``created`` is not in the future, within this skew; the
    # window is enforced by verify_request below, with the caller's clock.
    max_clock_skew = dt.timedelta(days=365 * 100)

    def __init__(self, memo: dict[tuple[str, str], Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._memo = memo

    def _parse_dict_header(self, header_name: str, headers: Any) -> Any:
        # A hybrid request is verified label by label, and each verification parses both
        # signature fields; the ML-DSA signature makes ``Signature`` 4.5 KB of base64 that
        # http-sf checks byte by byte in Python (~0.2 ms a parse). One parse per field and
        # request (the memo lives for one verify_request call), and the usual form of the
        # ``Signature`` field takes the strict fast path below. This overrides a private hook
        # of the library: if it is renamed, the library parses as before (slower, as correct).
        if header_name not in headers:
            return super()._parse_dict_header(header_name, headers)  # type: ignore[no-untyped-call]
        value = headers[header_name]
        key = (header_name, value)
        found = self._memo.get(key)
        if found is None:
            if header_name.lower() == "signature":
                found = fast_signature_field(value)
            if found is None:
                found = super()._parse_dict_header(header_name, headers)  # type: ignore[no-untyped-call]
            self._memo[key] = found
        return found


_SIGNATURE_FIELD = re.compile(
    r"(sig[12])=:([A-Za-z0-9+/]+={0,2}):(?:, (sig[12])=:([A-Za-z0-9+/]+={0,2}):)?"
)


def _signature_members(value: str) -> list[tuple[str, bytes]] | None:
    """(label, signature) of each member of a ``Signature`` field in the one form our signers
    write — ``sig1=:<base64>:`` optionally followed by ``, sig2=:<base64>:``, canonical
    base64 — and None for anything else."""
    match = _SIGNATURE_FIELD.fullmatch(value)
    if match is None:
        return None
    label1, data1, label2, data2 = match.groups()
    if label1 == label2:
        return None  # duplicate labels: the library refuses them
    try:
        members = [(label1, base64.b64decode(data1, validate=True))]
        if label2 is not None:
            members.append((label2, base64.b64decode(data2, validate=True)))
    except binascii.Error:
        return None
    return members


def fast_signature_field(value: str) -> Dictionary | None:
    """The ``Signature`` field as http-sf parses it, for the one form our signers write —
    ``sig1=:<base64>:`` optionally followed by ``, sig2=:<base64>:``, canonical base64 — and
    None for anything else (which the library then parses). A regular expression and the C
    base64 decoder do in microseconds what http-sf's per-byte check does in ~0.2 ms; a property
    test holds the two to the same answer on every input."""
    members = _signature_members(value)
    if members is None:
        return None
    parsed = Dictionary()
    for label, raw in members:
        parsed[label] = Item(raw)
    return parsed


# -- the strict path for the one form our signers write ----------------------------------------
#
# The signature base of a relay request is fixed but for a few values (RFC 9421 §2.5), so a
# request written exactly as sign_request writes it can be checked without the general machinery
# (~0.3 ms of Python a request, more than both signatures' arithmetic): the fields are matched by
# anchored regular expressions of the exact text sign_request produces, in which every
# structured-field value serializes to itself (no escapes, no leading zeros, canonical base64),
# so the base is built from the text as received. Whatever differs by a byte — another order of
# parameters, other separators, an upper-case host, a default port, a percent-encoded host, a
# field given twice, a created time outside the window, a label missing or added — is declined
# and goes to http-message-signatures exactly as before. A property test holds both paths to the
# same answer (the same caller, created, nonce and digest, or the same refusal) on hostile
# variations of signed requests.

_FAST_METHOD = re.compile(r"[A-Z]{1,16}")
_FAST_URL = re.compile(
    r"(https?)://([a-z0-9.-]{1,253})(?::([1-9][0-9]{0,4}))?"
    r"(/(?:[A-Za-z0-9._~/-]|%[0-9A-F]{2}){0,2048})"
    r"(?:\?((?:[A-Za-z0-9._~=&-]|%[0-9A-F]{2}){0,2048}))?"
)
_DEFAULT_PORTS: Final = {"http": "80", "https": "443"}
# a "#" anywhere, or an "@" before the authority ends: text no signature component covers
_UNSIGNED_URL_PARTS = re.compile(r"[^#]*#|[^:/?#]*://[^/?#]*@")
# 32 bytes in canonical base64: 42 characters, one whose low four bits are zero, then "="
_FAST_DIGEST = re.compile(r"sha-256=:([A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=):")
_FAST_PARAMS = (
    r'\("@method" "@authority" "@path" "@query" "content-digest"\)'
    r';created=(0|[1-9][0-9]{0,11});keyid="(ms1[a-z2-7]{52})";alg="(ed25519|ml-dsa-65)"'
    r';nonce="([A-Za-z0-9_-]{16,64})";tag="medsecure-relay-v1"'
)
_FAST_INPUT = re.compile(r"sig1=(" + _FAST_PARAMS + r")(?:, sig2=(" + _FAST_PARAMS + r"))?")


def _fast_verify(
    method: str,
    url: str,
    fields: list[tuple[str, str]],
    resolve: Callable[[str], PublicIdentity | None],
    now: float,
    window: float,
) -> VerifiedRequest | None:
    """verify_request for a request in exactly the form sign_request writes (``fields``: the
    request's signature-input, signature and content-digest field lines, names in lower case);
    None (not a decision) for any other form, which the library then checks."""
    if len(fields) != 3:
        return None  # a field missing, or given on several lines
    found = dict(fields)
    if len(found) != 3:
        return None
    method = method.upper()
    url_match = _FAST_URL.fullmatch(url)
    digest_match = _FAST_DIGEST.fullmatch(found["content-digest"])
    input_match = _FAST_INPUT.fullmatch(found["signature-input"])
    signatures = _signature_members(found["signature"])
    if (
        url_match is None
        or digest_match is None
        or input_match is None
        or signatures is None
        or not _FAST_METHOD.fullmatch(method)
    ):
        return None
    scheme, host, port, path, query = url_match.groups()
    if port is not None and port == _DEFAULT_PORTS[scheme]:
        return None  # @authority would drop it
    g = input_match.groups()
    params1, created_text, keyid, alg1, nonce = g[0:5]
    params2, created2, keyid2, alg2, nonce2 = g[5:10]
    created = int(created_text)
    if alg1 != "ed25519" or abs(now - created) > window:
        return None
    members = [("sig1", params1)]
    if params2 is not None:
        if alg2 != "ml-dsa-65" or (created2, keyid2, nonce2) != (created_text, keyid, nonce):
            return None
        members.append(("sig2", params2))
    if [label for label, _ in signatures] != [label for label, _ in members]:
        return None
    identity = resolve(keyid)
    if identity is None or identity.fingerprint != keyid:
        raise AuthError("unknown-key", "publish your key bundle first")
    if len(members) != (2 if identity.suite == "hybrid" else 1):
        return None
    authority = host if port is None else f"{host}:{port}"
    base = (
        f'"@method": {method}\n"@authority": {authority}\n"@path": {path}\n'
        f'"@query": ?{query or ""}\n"content-digest": {found["content-digest"]}\n'
        '"@signature-params": '
    )
    for (label, params), (_, signature) in zip(members, signatures, strict=True):
        signed = (base + params).encode("ascii")
        try:
            if label == LABEL_ED25519:
                identity._ed25519.verify(signature, signed)
            else:
                assert identity._mldsa is not None
                identity._mldsa.verify(signature, signed, MLDSA_CONTEXT)
        except Exception as exc:  # crypto failures are opaque, as in the library's path
            raise AuthError("signature-invalid") from exc
    digest = base64.b64decode(digest_match.group(1))
    return VerifiedRequest(caller=identity, created=created, nonce=nonce, digest=digest)


def verify_request(
    method: str,
    url: str,
    headers: Iterable[tuple[str, str]],
    *,
    resolve: Callable[[str], PublicIdentity | None],
    now: float,
    window: float,
) -> VerifiedRequest:
    """Verify the signatures of a request; raise :class:`AuthError` if they are missing,
    malformed, wrong, made by an unknown key, or created outside ``now ± window`` seconds.

    Nonce replay and the body's digest are the caller's to check (they need state and the body).
    """
    # Only the fields verification reads: the library walks the message's fields several times
    # per signature, and every other field is irrelevant (a signature must cover exactly
    # COVERED_COMPONENTS, whose one field is content-digest).
    fields = [(n.lower(), v) for n, v in headers if n.lower() in _VERIFIED_FIELDS]
    if _UNSIGNED_URL_PARTS.match(url):
        # http-message-signatures validates a fragment or user information and leaves them out
        # of @authority, @path and @query, but whoever hands us the URL may still act on them:
        # uvicorn (h11) keeps "#…" of a request target in the path or query string it gives the
        # app, so "?identifier=A#&identifier=B" would be verified as "?identifier=A" and answered
        # for B. A request's URL has neither (clients never send a fragment): refused.
        raise AuthError("signature-invalid", "a request URL has no fragment or user information")
    fast = _fast_verify(method, url, fields, resolve, now, window)
    if fast is not None:
        return fast
    return _library_verify(method, url, fields, resolve=resolve, now=now, window=window)


def _labels(message: _Message) -> set[str]:
    """The labels of the request's Signature-Input and Signature fields (both parsed: a label in
    either that the other lacks counts)."""
    found: set[str] = set()
    for name in ("signature-input", "signature"):
        try:
            parsed = http_sf.parse(message.headers[name].encode("ascii"), tltype="dictionary")
        except (http_sf.StructuredFieldError, UnicodeEncodeError, ValueError) as exc:
            raise AuthError("signature-invalid") from exc
        if not isinstance(parsed, dict):
            raise AuthError("signature-invalid")
        found.update(str(label) for label in parsed)
    return found


def _library_verify(
    method: str,
    url: str,
    fields: list[tuple[str, str]],
    *,
    resolve: Callable[[str], PublicIdentity | None],
    now: float,
    window: float,
) -> VerifiedRequest:
    """verify_request through http-message-signatures, for every form of request."""
    message = _Message(method.upper(), url, fields)
    if "signature-input" not in message.headers or "signature" not in message.headers:
        raise AuthError("unauthenticated", "the request carries no signature")
    if "content-digest" not in message.headers:
        raise AuthError("unauthenticated", "the request carries no Content-Digest")
    results = []
    identity: PublicIdentity | None = None
    memo: dict[tuple[str, str], Any] = {}
    for label, algorithm in ((LABEL_ED25519, algorithms.ED25519), (LABEL_MLDSA, _MLDSA65)):
        if label == LABEL_MLDSA and (identity is None or identity.suite != "hybrid"):
            break
        resolver = _Resolver(resolve, label)
        verifier = _Verifier(memo, signature_algorithm=algorithm, key_resolver=resolver)
        try:
            found = verifier.verify(
                message, max_age=None, expect_tag=SIGNATURE_TAG, expect_label=label
            )
        except (HTTPMessageSignaturesException, _CryptoInvalidSignature, ValueError) as exc:
            if resolver.unknown:
                raise AuthError("unknown-key", "publish your key bundle first") from exc
            raise AuthError("signature-invalid") from exc
        if len(found) != 1 or resolver.identity is None:
            raise AuthError("signature-invalid")
        # exactly the protocol's components, in its order (checked here rather than with the
        # library's require_components, which re-parses the list on every call)
        if list(found[0].covered_components) != _COVERED_KEYS:
            raise AuthError("signature-invalid", "the signature must cover the request")
        if identity is not None and identity != resolver.identity:
            raise AuthError("signature-invalid")
        identity = resolver.identity
        results.append(found[0])
    assert identity is not None
    if identity.suite != "hybrid" and _labels(message) != {LABEL_ED25519}:
        # a classic identity signs with sig1 only: anything beside it would go unchecked
        raise AuthError("signature-invalid", "a classic identity signs with sig1 only")
    first = results[0]
    if any(
        r.parameters != {**first.parameters, "alg": r.parameters.get("alg")}
        or list(r.covered_components)[:-1] != list(first.covered_components)[:-1]
        for r in results[1:]
    ):
        raise AuthError("signature-invalid", "the signatures do not cover the same request")
    created = first.parameters.get("created")
    nonce = first.nonce
    if not isinstance(created, int) or not isinstance(nonce, str) or not _NONCE_RE.fullmatch(nonce):
        raise AuthError("signature-invalid", "a signature needs created and a nonce")
    if abs(now - created) > window:
        raise AuthError("signature-expired", f"created must be within {int(window)} s of now")
    try:
        digest = parse_digest(first.covered_components['"content-digest"'])
    except (KeyError, ValueError) as exc:
        raise AuthError("signature-invalid", "malformed Content-Digest") from exc
    return VerifiedRequest(caller=identity, created=created, nonce=nonce, digest=digest)
