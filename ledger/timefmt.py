"""RFC 3339 timestamps in one fixed form: ``2026-11-26T12:00:00.000000Z``.

Ledger timestamps are UTC with microsecond precision, the same precision as
PostgreSQL ``timestamptz``, so a stored time round-trips byte for byte.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")


def format_time(moment: datetime) -> str:
    """The ledger's canonical text for an aware datetime."""
    if moment.tzinfo is None:
        raise ValueError("ledger times must be timezone-aware")
    utc = moment.astimezone(UTC)
    # Not strftime: its %Y gives "1" for year 1, which is not RFC 3339 (4 digits).
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T"
        f"{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}.{utc.microsecond:06d}Z"
    )


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 timestamp (any offset, up to nanoseconds) to aware UTC."""
    if _is_canonical_shape(text):
        # ``format_time``'s own form (nearly every stored or signed time): Python's
        # parser takes it as is (its "Z" is UTC), a tenth of the general path's cost.
        # Anything it refuses goes the general way, which names the problem.
        try:
            return datetime.fromisoformat(text)
        except ValueError:
            pass
    return _parse_general(text)


def _parse_general(text: str) -> datetime:
    """``parse_time`` for any RFC 3339 form (and the error for anything else)."""
    if not _RFC3339.match(text):
        raise ValueError(f"{text!r} is not an RFC 3339 timestamp like 2026-11-26T12:00:00Z")
    normalized = text.replace("z", "Z").replace("t", "T")
    if "." in normalized:
        head, rest = normalized.split(".", 1)
        digits = re.match(r"\d+", rest)
        assert digits is not None  # guaranteed by _RFC3339
        frac = digits.group(0)
        normalized = f"{head}.{(frac + '000000')[:6]}{rest[len(frac) :]}"
    return datetime.fromisoformat(normalized.replace("Z", "+00:00")).astimezone(UTC)


def _is_canonical_shape(text: str) -> bool:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ`` by its separators (the digits are the parser's
    to check: it takes ASCII digits only, and nothing else at these places)."""
    return (
        len(text) == 27
        and text[26] == "Z"
        and text[19] == "."
        and text[10] == "T"
        and text[4] == text[7] == "-"
        and text[13] == text[16] == ":"
    )


def is_rfc3339(text: str) -> bool:
    return bool(_RFC3339.match(text))


def utc_now() -> datetime:
    """The wall clock; the composition root injects it, the pure core never calls it."""
    return datetime.now(UTC)
