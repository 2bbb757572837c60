"""Canonical bytes: the single place they are produced.

Every byte string that is signed, hashed, exported or verified comes from
this module. The encoding is RFC 8785 (JSON Canonicalization Scheme): object
keys sorted by UTF-16 code units, no insignificant whitespace, minimal string
escaping, and numbers in ECMAScript form. Signed content holds no floats
(scores and amounts are integers or strings), so any JCS library in any
language reproduces these bytes exactly.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import msgspec
import rfc8785

from ledger.errors import EventValidationError

# I-JSON (RFC 7493) integer range: beyond it other languages lose precision.
_MAX_SAFE_INT = 2**53 - 1


def _check(value: Any, path: str) -> None:
    """Reject values that would not round-trip identically in every language."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if abs(value) > _MAX_SAFE_INT:
            raise EventValidationError(f"{path}: integer {value} exceeds the I-JSON range")
        return
    if isinstance(value, float):
        raise EventValidationError(f"{path}: floats are not allowed in signed content")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise EventValidationError(f"{path}: object keys must be strings")
            _check(item, f"{path}.{key}")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check(item, f"{path}[{index}]")
        return
    raise EventValidationError(f"{path}: {type(value).__name__} is not a JSON value")


def canonical_bytes(value: Any) -> bytes:
    """Return the RFC 8785 canonical JSON bytes of a JSON-compatible value."""
    if _plain(value):
        try:
            return _sorted_json.encode(value)
        except UnicodeEncodeError:  # a lone surrogate: refused below, as it always was
            pass
    _check(value, "$")
    try:
        return bytes(rfc8785.dumps(value))
    except (rfc8785.CanonicalizationError, ValueError, TypeError) as exc:
        raise EventValidationError(f"cannot canonicalize: {exc}") from exc


# msgspec's JSON with sorted keys *is* RFC 8785 for the values ``_plain`` admits: it
# escapes exactly `"`, `\\` and U+0000-U+001F (\b \t \n \f \r, else \u00xx in lower
# case), passes everything else through as UTF-8, writes integers in decimal, and
# sorts keys by code point, which is UTF-16 code-unit order as long as no key holds a
# character beyond U+FFFF. It runs in C: the reference encoder (``rfc8785``, pure
# Python) cost more than the rest of parsing a signed report. tests/test_canonical.py
# holds the two equal over arbitrary text.
_sorted_json = msgspec.json.Encoder(order="sorted")
_BEYOND_BMP = re.compile("[\U00010000-\U0010ffff]")


def _plain(value: Any) -> bool:
    """Whether ``value`` holds only exact ``dict`` (keys: ``str`` within the BMP),
    ``list``, ``tuple``, ``str``, ``bool``, ``None`` and I-JSON integers — what the
    sorted msgspec encoding gives RFC 8785 bytes for. Anything else (a float, a
    subclass, another mapping) goes through ``_check`` and the reference encoder."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(-_MAX_SAFE_INT <= value <= _MAX_SAFE_INT)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or not (key.isascii() or _BEYOND_BMP.search(key) is None):
                return False
            if not _plain(item):
                return False
        return True
    if kind is list or kind is tuple:
        return all(_plain(item) for item in value)
    return False


def canonical_envelope(fields: Mapping[str, str | int], body: bytes) -> bytes:
    """Canonical bytes of ``{"body": <body>, **fields}``.

    ``body`` is already canonical, so it is spliced in as-is rather than
    parsed and re-encoded: JCS of a nested object is the JCS of that object in
    place. ``fields`` hold only ASCII-keyed strings and integers. This runs for
    every entry appended, verified and exported, so the key order and encoded
    key prefixes are computed once per set of field names.
    """
    order = _envelope_order(tuple(fields))
    return (
        b"{"
        + b",".join(
            prefix + (body if key is None else _scalar(fields[key])) for key, prefix in order
        )
        + b"}"
    )


@functools.cache
def _envelope_order(names: tuple[str, ...]) -> tuple[tuple[str | None, bytes], ...]:
    """(field name, or None for the body; its encoded ``"key":``) in JCS order."""
    if "body" in names:
        raise ValueError("'body' is reserved in an envelope")
    return tuple(
        (None if key == "body" else key, _scalar(key) + b":") for key in sorted([*names, "body"])
    )


def _scalar(value: str | int) -> bytes:
    """JCS of a string or integer, with a fast path for plain printable ASCII.

    For such strings (no quote, no backslash) RFC 8785 output is the text in
    quotes; anything else goes through the full encoder.
    """
    if isinstance(value, str):
        if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
            return b'"' + value.encode() + b'"'
        return canonical_bytes(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= _MAX_SAFE_INT:
        return str(value).encode()
    return canonical_bytes(value)
