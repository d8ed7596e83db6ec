"""RFC 9457 problem details of the relay protocol: one table, stable ``type`` URIs.

Every error the relay answers is an ``application/problem+json`` body whose ``type`` is one of
the URIs below; clients branch on ``type`` (and the status), never on ``title`` or ``detail``.
A ``detail`` never carries patient data or envelope content: the relay never has any.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["PROBLEMS", "PROBLEM_CONTENT_TYPE", "Problem", "problem_body", "problem_type"]

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
_TYPE_PREFIX: Final = "urn:medsecure:relay:problem:"


@dataclass(frozen=True)
class Problem:
    """One kind of refusal: its slug (the last part of the type URI), HTTP status and title."""

    slug: str
    status: int
    title: str

    @property
    def type(self) -> str:
        return _TYPE_PREFIX + self.slug


_TABLE = (
    Problem("bad-request", 400, "The request is malformed"),
    Problem("digest-mismatch", 400, "The body does not match its Content-Digest"),
    Problem("bundle-time-invalid", 400, "The key bundle's publication time is ahead of the clock"),
    Problem("unauthenticated", 401, "The request is not signed"),
    Problem("signature-invalid", 401, "The request signature does not verify"),
    Problem("signature-expired", 401, "The signature's creation time is outside the window"),
    Problem("nonce-replayed", 401, "The signature's nonce was already used"),
    Problem("unknown-key", 401, "The signing key is not published on this relay"),
    Problem("forbidden", 403, "Only the mailbox owner may do this"),
    Problem("sender-not-allowed", 403, "This relay's policy does not accept this sender"),
    Problem("not-found", 404, "No such resource"),
    Problem("method-not-allowed", 405, "Method not allowed"),
    Problem("request-timeout", 408, "The request body stopped arriving"),
    Problem("message-id-conflict", 409, "This message id is already used differently"),
    Problem("length-required", 411, "An upload needs a Content-Length"),
    Problem("envelope-too-large", 413, "The envelope exceeds this relay's maximum size"),
    Problem("unsupported-media-type", 415, "Unsupported media type"),
    Problem("range-not-satisfiable", 416, "The requested range is not satisfiable"),
    Problem("misdirected-request", 421, "This relay does not answer for that host"),
    Problem("rate-limited", 429, "Too many requests from this sender"),
    Problem("internal", 500, "Internal error"),
    Problem("unavailable", 503, "The relay cannot serve this now"),
    Problem("mailbox-quota-exceeded", 507, "The recipient's mailbox is full"),
)

#: Every problem of the protocol, by slug.
PROBLEMS: Final[dict[str, Problem]] = {p.slug: p for p in _TABLE}


def problem_type(slug: str) -> str:
    """The stable type URI of a problem slug (``KeyError`` for an unknown slug)."""
    return PROBLEMS[slug].type


def problem_body(slug: str, detail: str | None = None, **extra: Any) -> bytes:
    """The JSON body of a problem (RFC 9457 §3)."""
    p = PROBLEMS[slug]
    body: dict[str, Any] = {"type": p.type, "title": p.title, "status": p.status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return json.dumps(body, separators=(",", ":")).encode()


def parse_problem(data: bytes) -> str | None:
    """The slug of a problem body received from a relay, or None if it is not one of ours."""
    try:
        doc = json.loads(data[:8192])
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    kind = doc.get("type")
    if isinstance(kind, str) and kind.startswith(_TYPE_PREFIX):
        slug = kind[len(_TYPE_PREFIX) :]
        if slug in PROBLEMS:
            return slug
    return None
