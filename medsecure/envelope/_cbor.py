"""Canonical CBOR (RFC 8949 §4.2.1, core deterministic encoding) on top of cbor2.

medsecure only ever puts integers, byte strings, text strings, arrays, maps and booleans in its
structures. :func:`encode` writes them canonically. :func:`decode` is the one strict reader for
untrusted bytes: it rejects indefinite lengths, duplicate map keys, tags, floats, undefined/simple
values, trailing bytes and any encoding that is not the canonical one (non-minimal heads,
unsorted keys), by re-encoding the decoded value and comparing it with the bytes received. The
comparison only *rejects*; what is authenticated is always the bytes received (callers hash and
verify those, never a re-encoding).

Any failure — including cbor2's own errors, RecursionError and MemoryError on hostile input —
is raised as the ``error`` class the caller passes, so no foreign exception escapes.
"""

from __future__ import annotations

from typing import Any

import cbor2

__all__ = ["MAX_DEPTH", "decode", "encode"]

#: medsecure structures are at most a few levels deep; anything deeper is hostile.
MAX_DEPTH = 8

_ALLOWED = (int, bytes, str, bool, list, dict)


def encode(value: Any) -> bytes:
    """Encode ``value`` with the RFC 8949 core deterministic encoding."""
    return bytes(cbor2.dumps(value, canonical=True))


def _check_types(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("nesting too deep")
    if not isinstance(value, _ALLOWED) or value is None:
        raise ValueError("unexpected CBOR type")
    if isinstance(value, list):
        for item in value:
            _check_types(item, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (int, str)) or isinstance(key, bool):
                raise ValueError("unexpected map key type")
            _check_types(item, depth + 1)


def _reject_tag(decoder: Any, tag: Any) -> Any:
    raise ValueError("CBOR tags are not allowed")


def decode(data: bytes, *, error: type[Exception], what: str) -> Any:
    """Decode one canonical CBOR item that must fill ``data`` exactly.

    Raises ``error(f"malformed {what}")`` on anything else.
    """
    try:
        value = cbor2.loads(
            data,
            tag_hook=_reject_tag,
            semantic_decoders={},
            max_depth=MAX_DEPTH + 1,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        )
        _check_types(value, 0)
        canonical = encode(value)
    except Exception as exc:  # cbor2 errors, ValueError, RecursionError, MemoryError, ...
        raise error(f"malformed {what}") from exc
    if canonical != data:
        # Covers trailing bytes, non-minimal lengths and integers, unsorted map keys.
        raise error(f"malformed {what}: not in canonical CBOR encoding")
    return value
