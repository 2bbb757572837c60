"""Canonical encoding (RFC 8785) and identities: examples and properties."""

from __future__ import annotations

import json
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
