"""Canonical encoding (RFC 8785) and identities: examples and properties."""

from __future__ import annotations

import collections
import enum
import json
import types
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.canonical import canonical_bytes, canonical_envelope
from ledger.errors import EventValidationError, SignatureError
from ledger.identity import SigningKey, VerifyKey, did_for_raw_public_key, is_did

json_scalars = st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


def test_rfc8785_example() -> None:
    # Sorted keys, no whitespace, minimal escapes, UTF-8 passthrough.
    value = {"b": [1, "x"], "a": {"z": None, "é": "\u00e9\n"}, "c": True}
    assert canonical_bytes(value) == '{"a":{"z":null,"é":"é\\n"},"b":[1,"x"],"c":true}'.encode()


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_canonical_is_deterministic_and_round_trips(value: Any) -> None:
    encoded = canonical_bytes(value)
    assert canonical_bytes(json.loads(encoded)) == encoded
    assert encoded == rfc8785.dumps(value)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(), json_values, max_size=5))
def test_key_order_does_not_matter(value: dict[str, Any]) -> None:
    reordered = dict(reversed(list(value.items())))
    assert canonical_bytes(reordered) == canonical_bytes(value)


@settings(max_examples=200, deadline=None)
@given(json_values, st.integers(0, 2**40), st.text(alphabet="abc:-_0123456789", max_size=20))
def test_envelope_equals_canonical_of_the_whole(body: Any, position: int, stream: str) -> None:
    fields: dict[str, str | int] = {"position": position, "stream_id": stream, "signature": "c2ln"}
    spliced = canonical_envelope(fields, canonical_bytes(body))
    assert spliced == canonical_bytes({"body": body, **fields})


@pytest.mark.parametrize("value", [1.5, {"a": float("nan")}, 2**60, {1: "x"}, object()])
def test_non_portable_values_are_rejected(value: Any) -> None:
    with pytest.raises(EventValidationError):
        canonical_bytes(value)


# The C encoder (msgspec, keys sorted) stands in for the reference one (rfc8785) on
# plain values: the two must agree byte for byte on every string, every key order and
# every value the fast path admits, and refuse alike what it does not.
every_text = st.text(st.characters(codec="utf-8"))  # every code point but surrogates
plain_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | every_text,
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(every_text, children, max_size=5)
    ),
    max_leaves=25,
)


@settings(max_examples=500, deadline=None)
@given(plain_values)
def test_the_fast_encoding_is_the_reference_encoding(value: Any) -> None:
    assert canonical_bytes(value) == rfc8785.dumps(value)


def test_every_control_character_and_escape_is_written_as_rfc8785_writes_it() -> None:
    text = "".join(chr(c) for c in range(0x80)) + "\u2028\u2029\ufeff\U0001f600é"
    assert canonical_bytes({"k": text, text: [text]}) == rfc8785.dumps({"k": text, text: [text]})
    assert b"\\u001f" in canonical_bytes(text)  # lower-case hex, as RFC 8785 writes it


def test_keys_are_ordered_by_utf16_code_units_beyond_the_bmp() -> None:
    # U+1F600 is D83D DE00 in UTF-16, so it sorts *before* U+E000 (code points say after).
    value = {"\ue000": 1, "\U0001f600": 2, "a": 3, "\uffff": 4, "\U00010000x": 5}
    assert canonical_bytes(value) == rfc8785.dumps(value)
    assert canonical_bytes(value).index("\U0001f600".encode()) < canonical_bytes(value).index(
        "\ue000".encode()
    )


class _Level(enum.IntEnum):
    HIGH = 3


class _Name(enum.StrEnum):
    A = "a"


@pytest.mark.parametrize(
    "value",
    [
        {"n": _Level.HIGH, "s": _Name.A},
        collections.OrderedDict([("b", 1), ("a", [True, None])]),
        {"a": (1, "x")},
        -(2**53) + 1,
        2**53 - 1,
        {"": ""},
    ],
)
def test_values_beside_the_fast_path_encode_as_before(value: Any) -> None:
    assert canonical_bytes(value) == rfc8785.dumps(value)


@pytest.mark.parametrize(
    "value",
    [
        "\ud800",
        {"a": "x\udfffy"},
        {"\ud83d": 1},
        [1, 2**53],
        {"a": -(2**53)},
        types.MappingProxyType({"a": 1}),
        {"a": [1.0]},
        {"a": True, "b": {2: 3}},
    ],
)
def test_what_the_reference_refuses_is_still_refused(value: Any) -> None:
    with pytest.raises(EventValidationError):
        canonical_bytes(value)


def test_did_is_derived_from_the_public_key() -> None:
    key = SigningKey.generate()
    assert is_did(key.did)
    assert key.did == did_for_raw_public_key(key.public.raw)
    assert VerifyKey.from_pem(key.public.pem()).did == key.did
    assert SigningKey.from_pem(key.private_key_pem()).did == key.did


def test_signing_key_repr_hides_the_key() -> None:
    key = SigningKey.generate()
    secret_line = key.private_key_pem().splitlines()[1]
    assert secret_line not in repr(key)
    assert secret_line not in str(key)


def test_bad_keys_are_rejected_without_echoing_input() -> None:
    with pytest.raises(SignatureError) as info:
        SigningKey.from_pem("-----BEGIN PRIVATE KEY-----\nsecretstuff\n-----END PRIVATE KEY-----")
    assert "secretstuff" not in str(info.value)
    with pytest.raises(SignatureError):
        VerifyKey.from_pem("not a key")
