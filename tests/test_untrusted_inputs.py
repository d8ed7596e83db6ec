"""Property tests: parsers of untrusted input raise only their documented error types."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import medsecure as m
from medsecure import identifiers
from medsecure._inbox import check_manifest_models
from medsecure.envelope import _cbor
from medsecure.envelope._message import parse_manifest
from medsecure.identifiers import INS
from medsecure.trust import Statement

CBORISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.binary(max_size=40)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.integers(0, 15) | st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


def parse_message_manifest(data: bytes) -> None:
    """What the inbox does with a manifest: the core's structure, then the models."""
    check_manifest_models(parse_manifest(data))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_manifest_parser_raises_only_envelope_error(data: bytes) -> None:
    with pytest.raises(m.EnvelopeError):
        parse_message_manifest(data)


@settings(max_examples=300, deadline=None)
@given(CBORISH)
def test_manifest_parser_on_structured_garbage(value: object) -> None:
    try:
        encoded = _cbor.encode(value)
    except Exception:
        return
    with contextlib.suppress(m.EnvelopeError):
        parse_message_manifest(encoded)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.builds(lambda v: _cbor.encode(v), CBORISH))
def test_public_identity_and_statement_parsers(data: bytes) -> None:
    with pytest.raises(m.IdentityError):
        m.PublicIdentity.from_bytes(data)
    with pytest.raises(m.TrustError):
        Statement.parse(data)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_identifier_and_address_parsers_raise_value_error(text: str) -> None:
    for parser in (
        identifiers.parse,
        identifiers.parse_address,
        m.PublicIdentity.from_text,
        Statement.parse,
    ):
        with contextlib.suppress(ValueError, m.MedsecureError):
            parser(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30), st.sampled_from([identifiers.INS_NIR, identifiers.INS_TEST_NIR]))
def test_ins_raises_value_error(matricule: str, oid: str) -> None:
    with contextlib.suppress(ValueError):
        INS(matricule, oid=oid)


def _acceptable(value: object, depth: int = 0) -> bool:
    """docs/format.md §8, as a plain rule: integers (within CBOR's 64-bit heads), byte and text
    strings, booleans, arrays and maps with integer or text keys, nested at most 8 deep."""
    if depth > _cbor.MAX_DEPTH:
        return False
    if isinstance(value, list):
        return all(_acceptable(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return all(
            isinstance(key, (int, str))
            and not isinstance(key, bool)
            and (not isinstance(key, int) or -(2**64) <= key < 2**64)
            and _acceptable(item, depth + 1)
            for key, item in value.items()
        )
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -(2**64) <= value < 2**64  # beyond: a bignum, which is a tag
    return isinstance(value, (bytes, str))


def _nested(depth: int, leaf: object) -> object:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {1: value}
    return value


@settings(max_examples=500, deadline=None)
@given(
    CBORISH
    | st.floats(allow_nan=False)
    | st.builds(
        _nested, st.integers(0, 12), st.sampled_from([1, None, b"", [], {}, 1.5, True]) | CBORISH
    )
)
def test_the_strict_decoder_accepts_exactly_the_allowed_values(value: object) -> None:
    """The decoder's type check (written for speed) agrees with the rule it implements."""
    try:
        encoded = _cbor.encode(value)
    except Exception:
        return
    try:
        decoded = _cbor.decode(encoded, error=ValueError, what="x")
    except ValueError:
        assert not _acceptable(value)
    else:
        assert _acceptable(value)
        assert decoded == value


ORDERED = st.recursive(
    st.booleans() | st.integers(-(2**66), 2**66) | st.binary(max_size=8) | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.integers(-30, 300) | st.integers(2**20, 2**40) | st.text(max_size=3),
            inner,
            max_size=5,
        )
    ),
    max_leaves=25,
)


@settings(max_examples=1000, deadline=None)
@given(ORDERED)
def test_the_decoder_refuses_every_non_canonical_key_order(value: object) -> None:
    """Maps written in any key order (cbor2's plain encoder keeps the order given): the decoder
    accepts exactly those whose bytes are the canonical encoding."""
    data = cbor2.dumps(value)
    try:
        _cbor.decode(data, error=ValueError, what="x")
    except ValueError:
        accepted = False
    else:
        accepted = True
    assert accepted == (_acceptable(value) and data == cbor2.dumps(value, canonical=True))


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ({1: 0, 2: 0}, True),
        ({2: 0, 1: 0}, False),
        ({1: 0, -1: 0}, True),
        ({-1: 0, 1: 0}, False),
        ({1: {3: 0, 2: 0}}, False),
        ([{10: 0, 100: 0}, {"b": 0, "a": 0}], False),
        ({"a": 0, "b": 0, "aa": 0}, True),
    ],
)
def test_key_order_examples(value: object, accepted: bool) -> None:
    data = cbor2.dumps(value)
    if accepted:
        assert _cbor.decode(data, error=ValueError, what="x") == value
    else:
        with pytest.raises(ValueError, match="canonical"):
            _cbor.decode(data, error=ValueError, what="x")
