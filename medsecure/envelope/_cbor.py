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

Key order: cbor2's canonical mode sorts map keys length-first (RFC 8949 §4.2.3), which is the
bytewise order of §4.2.1 for every map medsecure writes (non-negative integer keys only, or
text keys only); the two differ only for maps that mix key types or use negative keys, which no
medsecure structure has.
"""

from __future__ import annotations

from typing import Any

import cbor2

__all__ = ["MAX_DEPTH", "decode", "encode"]

#: medsecure structures are at most a few levels deep; anything deeper is hostile.
MAX_DEPTH = 8

# cbor2 builds values of exactly these types; anything else (None, floats, undefined, simple
# values, frozen maps, the datetimes of tags 0 and 1) is refused. Exact type tests: this runs on
# every header and trailer read.
_STRINGS = frozenset((bytes, str, bool))
# cbor2 decodes the bignum tags 2 and 3 into plain ints even with every semantic decoder
# removed; an int outside the range of CBOR's integer heads can only come from such a tag.
_INT_MIN = -(2**64)
_INT_MAX = 2**64 - 1


def encode(value: Any) -> bytes:
    """Encode ``value`` with the RFC 8949 core deterministic encoding."""
    return bytes(cbor2.dumps(value, canonical=True))


def _check_int(value: int) -> None:
    if not _INT_MIN <= value <= _INT_MAX:
        raise ValueError("CBOR tags are not allowed")  # a bignum


def _check_types(value: Any, depth: int) -> bool:
    """Refuse any value medsecure never writes (raise ValueError). Return True when every map
    inside has non-negative integer keys in ascending order: cbor2's plain encoding of such a
    value is already the canonical one, which spares the slower canonical encoder."""
    if depth > MAX_DEPTH:
        raise ValueError("nesting too deep")
    kind = type(value)
    plain = True
    if kind is dict:
        previous = -1
        for key in value:
            if type(key) is int:
                _check_int(key)
                if key <= previous:  # negative, or not ascending: the canonical encoder decides
                    plain = False
                previous = key
            elif type(key) is str:
                plain = False
            else:
                raise ValueError("unexpected map key type")
        items: Any = value.values()
    elif kind is list:
        items = value
    elif kind is int:
        _check_int(value)
        return True
    elif kind in _STRINGS:
        return True
    else:
        raise ValueError("unexpected CBOR type")
    # Leaves inside a container are checked here rather than by a call of their own (this runs
    # on every header), unless they would sit deeper than MAX_DEPTH (the call raises then).
    for item in items:
        kind = type(item)
        if depth >= MAX_DEPTH or not (kind in _STRINGS or kind is int):
            if not _check_types(item, depth + 1):
                plain = False
        elif kind is int and not _INT_MIN <= item <= _INT_MAX:
            raise ValueError("CBOR tags are not allowed")  # a bignum
    return plain


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
        # With only ascending non-negative integer keys, canonical order is the order received
        # and cbor2's plain encoder (shortest heads, definite lengths) writes the canonical form.
        canonical = cbor2.dumps(value) if _check_types(value, 0) else encode(value)
    except Exception as exc:  # cbor2 errors, ValueError, RecursionError, MemoryError, ...
        raise error(f"malformed {what}") from exc
    if canonical != data:
        # Covers trailing bytes, non-minimal lengths and integers, unsorted map keys.
        raise error(f"malformed {what}: not in canonical CBOR encoding")
    return value
