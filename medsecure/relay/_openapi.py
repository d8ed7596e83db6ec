"""The OpenAPI 3.1 description of the relay protocol (``/v1``).

Served by the reference server at ``/openapi.json`` and kept in ``docs/relay-openapi.json``
(``python -m medsecure.relay._openapi > docs/relay-openapi.json`` rewrites it; a test checks the
two agree). Every operation except ``health`` and ``metrics`` requires the request signatures of
docs/relay.md; the security scheme below documents them.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from ._problems import PROBLEMS

__all__ = ["openapi_document"]

_FP = {"type": "string", "pattern": "^ms1[a-z2-7]{52}$", "description": "Identity fingerprint"}
_MID = {"type": "string", "pattern": "^[0-9A-HJKMNP-TV-Z]{26}$", "description": "Message id"}


def _problem(*slugs: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for slug in slugs:
        status = str(PROBLEMS[slug].status)
        out.setdefault(status, {"$ref": f"#/components/responses/Problem{status}"})
    return out


_AUTH = ("misdirected-request", "unauthenticated", "signature-invalid", "rate-limited")


def _param(name: str, where: str, schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required, "schema": schema}


_MAILBOX = _param("mailbox", "path", _FP)
_MESSAGE = _param("message_id", "path", _MID)
_RECORD = {"$ref": "#/components/schemas/MessageRecord"}

_DOC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "medsecure relay",
        "version": "1",
        "summary": "Store-and-forward of end-to-end encrypted medsecure envelopes.",
        "description": (
            "Mailboxes are named by their owner's identity fingerprint. Every operation but "
            "health and metrics is authenticated by RFC 9421 signatures made with the caller's "
            "identity keys (sig1 Ed25519, sig2 ML-DSA-65 for a hybrid identity) over @method, "
            "@authority, @path, @query and Content-Digest (RFC 9530), with created, nonce, keyid "
            "and tag=medsecure-relay-v1; see docs/relay.md. Errors are RFC 9457 problem "
            "documents with a stable type."
        ),
        "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
    },
    "servers": [{"url": "https://relay.example"}],
    "security": [{"httpSignature": []}],
    "paths": {
        "/v1/health": {
            "get": {
                "operationId": "health",
                "summary": "Liveness and storage check",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Healthy",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_problem("unavailable"),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics (messages, bytes, queue depth, rejections)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/v1/limits": {
            "get": {
                "operationId": "getLimits",
                "summary": "This relay's limits",
                "responses": {
                    "200": {
                        "description": "Limits",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Limits"}}
                        },
                    },
                    **_problem(*_AUTH),
                },
            }
        },
        "/v1/keys": {
            "get": {
                "operationId": "findKeys",
                "summary": "Key bundles claiming a professional identifier (IDNPS)",
                "description": (
                    "Every bundle claiming the identifier, a page at a time, in the order the "
                    "relay first saw each claim (then by fingerprint): nothing a claimant says "
                    "moves another claim off the answer. An answer with 'next' is not the last "
                    "page: ask again with after=<next>. Clients read every page."
                ),
                "parameters": [
                    _param("identifier", "query", {"type": "string"}),
                    _param(
                        "after",
                        "query",
                        {"type": "string", "description": "The 'next' of the previous page"},
                        required=False,
                    ),
                    _param(
                        "limit",
                        "query",
                        {"type": "integer", "minimum": 1, "maximum": 100, "default": 100},
                        required=False,
                    ),
                ],
                "responses": {
                    "200": {
                        "description": "Self-signed bundles, base64url; the relay vouches for none",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["bundles"],
                                    "properties": {
                                        "bundles": {"type": "array", "items": {"type": "string"}},
                                        "next": {
                                            "type": "string",
                                            "description": "Present when more pages follow",
                                        },
                                    },
                                }
                            }
                        },
                    },
                    **_problem("bad-request", *_AUTH),
                },
            }
        },
        "/v1/keys/{fingerprint}": {
            "parameters": [_param("fingerprint", "path", _FP)],
            "put": {
                "operationId": "publishKey",
                "summary": "Publish the caller's own self-signed key bundle",
                "requestBody": {
                    "required": True,
                    "content": {"application/vnd.medsecure.key-bundle+cbor": {}},
                },
                "responses": {
                    "204": {"description": "Published"},
                    **_problem(
                        "bad-request",
                        "digest-mismatch",
                        "bundle-time-invalid",
                        "forbidden",
                        *_AUTH,
                    ),
                },
            },
            "get": {
                "operationId": "getKey",
                "summary": "The key bundle published under a fingerprint",
                "responses": {
                    "200": {
                        "description": "The bundle",
                        "content": {"application/vnd.medsecure.key-bundle+cbor": {}},
                    },
                    **_problem("not-found", *_AUTH),
                },
            },
        },
        "/v1/mailboxes/{mailbox}/messages": {
            "parameters": [_MAILBOX],
            "get": {
                "operationId": "listMessages",
                "summary": "Envelopes waiting in the caller's own mailbox, oldest first",
                "parameters": [_param("limit", "query", {"type": "integer", "minimum": 1}, False)],
                "responses": {
                    "200": {
                        "description": "Waiting envelopes",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["messages"],
                                    "properties": {
                                        "messages": {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/Waiting"},
                                        }
                                    },
                                }
                            }
                        },
                    },
                    **_problem("forbidden", *_AUTH),
                },
            },
        },
        "/v1/mailboxes/{mailbox}/messages/{message_id}": {
            "parameters": [_MAILBOX, _MESSAGE],
            "put": {
                "operationId": "uploadMessage",
                "summary": "Upload an envelope (streamed); the message id is the idempotency key",
                "description": (
                    "Content-Length is required. A replay by the same sender with the same "
                    "Content-Digest returns the original answer; any other reuse of the id in "
                    "this mailbox is a conflict."
                ),
                "requestBody": {
                    "required": True,
                    "content": {"application/octet-stream": {"schema": {"type": "string"}}},
                },
                "responses": {
                    "201": {
                        "description": "Stored durably (or a replay of an earlier upload)",
                        "content": {"application/json": {"schema": _RECORD}},
                    },
                    **_problem(
                        "bad-request",
                        "digest-mismatch",
                        "sender-not-allowed",
                        "message-id-conflict",
                        "length-required",
                        "envelope-too-large",
                        "request-timeout",
                        "mailbox-quota-exceeded",
                        *_AUTH,
                    ),
                },
            },
            "get": {
                "operationId": "downloadMessage",
                "summary": "Download a waiting envelope (owner only); Range resumes",
                "parameters": [
                    _param("Range", "header", {"type": "string"}, False),
                    _param("If-Range", "header", {"type": "string"}, False),
                ],
                "responses": {
                    "200": {
                        "description": "The envelope",
                        "content": {"application/octet-stream": {"schema": {"type": "string"}}},
                    },
                    "206": {
                        "description": "Part of the envelope",
                        "content": {"application/octet-stream": {"schema": {"type": "string"}}},
                    },
                    **_problem("forbidden", "not-found", "range-not-satisfiable", *_AUTH),
                },
            },
            "delete": {
                "operationId": "acknowledgeMessage",
                "summary": "Acknowledge (delete) an envelope by its id (owner only; idempotent)",
                "responses": {
                    "204": {"description": "Collected"},
                    **_problem("forbidden", "not-found", *_AUTH),
                },
            },
        },
        "/v1/uploads": {
            "get": {
                "operationId": "uploadStates",
                "summary": "States of the caller's own uploads (waiting, collected, expired)",
                "parameters": [
                    {
                        "name": "message_id",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "array", "items": _MID, "maxItems": 100},
                        "style": "form",
                        "explode": True,
                    }
                ],
                "responses": {
                    "200": {
                        "description": "One record per mailbox the message went to",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["uploads"],
                                    "properties": {"uploads": {"type": "array", "items": _RECORD}},
                                }
                            }
                        },
                    },
                    **_problem("bad-request", *_AUTH),
                },
            }
        },
    },
    "components": {
        "securitySchemes": {
            "httpSignature": {
                "type": "apiKey",
                "in": "header",
                "name": "Signature",
                "description": (
                    "RFC 9421 Signature and Signature-Input (labels sig1, sig2), with "
                    "Content-Digest; keyid is the caller's fingerprint. Not an API key: see "
                    "docs/relay.md."
                ),
            }
        },
        "schemas": {
            "Problem": {
                "type": "object",
                "required": ["type", "title", "status"],
                "properties": {
                    "type": {"type": "string", "enum": sorted(p.type for p in PROBLEMS.values())},
                    "title": {"type": "string"},
                    "status": {"type": "integer"},
                    "detail": {"type": "string"},
                },
            },
            "MessageRecord": {
                "type": "object",
                "required": ["mailbox", "message_id", "size", "received_at", "state"],
                "properties": {
                    "mailbox": _FP,
                    "message_id": _MID,
                    "size": {"type": "integer"},
                    "received_at": {"type": "integer", "description": "Unix time"},
                    "state": {"type": "string", "enum": ["waiting", "collected", "expired"]},
                    "state_at": {"type": "integer"},
                },
            },
            "Waiting": {
                "type": "object",
                "required": ["message_id", "sender", "size", "received_at"],
                "properties": {
                    "message_id": _MID,
                    "sender": _FP,
                    "size": {"type": "integer"},
                    "received_at": {"type": "integer"},
                },
            },
            "Limits": {
                "type": "object",
                "properties": {
                    "max_envelope_bytes": {"type": "integer"},
                    "mailbox_quota_bytes": {"type": "integer"},
                    "retention_days": {"type": "integer"},
                    "signature_window_seconds": {"type": "integer"},
                },
            },
        },
        "responses": {
            str(status): {
                "description": "Problem details (RFC 9457)",
                "content": {
                    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                },
            }
            for status in sorted({p.status for p in PROBLEMS.values()})
        },
    },
}
_DOC["components"]["responses"] = {
    f"Problem{k}": v for k, v in _DOC["components"]["responses"].items()
}


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the OpenAPI document."""
    return copy.deepcopy(_DOC)


if __name__ == "__main__":  # pragma: no cover - regenerates docs/relay-openapi.json
    print(json.dumps(_DOC, indent=2, sort_keys=True))
