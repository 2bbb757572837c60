"""The hot read: an agent document's trust, decoded with no more work than it needs.

``ProjectionReader.trust`` decodes the agent document's registry status and trust
scalars (``projections.documents.TrustOnly``, without the peer and partner
windows) and builds a ``TrustState``. For
``GET /v1/agents/{did}/trust`` and for the metrics refresh (every agent, every few
seconds) that is still most of the work after the round trip, so here the document
is decoded straight into typed structs of the fields the view reads (msgspec skips
the rest without building it), and a time in the projections' canonical form
(``YYYY-MM-DDTHH:MM:SS.ffffffZ``, what ``format_time`` writes) is read by the C
ISO parser. The view itself is still ``projections.trust.trust_at`` over a
``TrustState``: the numbers are the same function's.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec

from ledger.timefmt import parse_time
from projections.config import SEVERITIES, TrustConfig
from projections.trust import (
    MILLI,
    TrustState,
    TrustView,
    points,
    score_milli_at,
    tier_for,
    to_micros,
    trust_at,
)


class _Registry(msgspec.Struct):
    status: str


class _Trust(msgspec.Struct):
    did: str
    base_milli: int
    base_at: str
    decay_from: str
    violations: dict[str, int]
    positives: int
    handshakes_completed: int
    handshakes_failed: int
    position: int


class TrustDoc(msgspec.Struct):
    """What the trust view needs of an agent document (other fields are skipped)."""

    registry: _Registry
    trust: _Trust

    @property
    def suspended(self) -> bool:
        return self.registry.status == "suspended"

    @property
    def active(self) -> bool:
        return self.registry.status == "active"

    def state(self) -> TrustState:
        t = self.trust
        return TrustState(
            did=t.did,
            base_milli=t.base_milli,
            base_at=micros(t.base_at),
            decay_from=micros(t.decay_from),
            violations={s: t.violations[s] for s in SEVERITIES},
            positives=t.positives,
            handshakes_completed=t.handshakes_completed,
            handshakes_failed=t.handshakes_failed,
            position=t.position,
        )

    def score_and_tier(self, config: TrustConfig, now_us: int) -> tuple[int, str]:
        """The view's score and tier alone (``trust_at``'s arithmetic, no view built)."""
        t = self.trust
        decaying = TrustState(t.did, t.base_milli, micros(t.base_at), micros(t.decay_from))
        floor = config.decay_floor * MILLI
        milli = score_milli_at(decaying, config.decay_rate_milli, floor, now_us)
        score = points(milli)
        return score, tier_for(score, config, suspended=self.suspended)

    def view(self, config: TrustConfig, now: datetime) -> TrustView:
        """``trust_at`` of this document at ``now`` (what ``ProjectionReader.trust`` gives)."""
        return trust_at(self.state(), config, now, suspended=self.suspended)


_decoder = msgspec.json.Decoder(TrustDoc)
_NAIVE_EPOCH = datetime(1970, 1, 1)
_MICROSECOND = timedelta(microseconds=1)


def decode_trust(raw: bytes) -> TrustDoc:
    return _decoder.decode(raw)


def micros(text: str) -> int:
    """Microseconds since the epoch of a stored time: the canonical form by the C
    parser, anything else by the ledger's RFC 3339 parser."""
    if len(text) == 27 and text[26] == "Z" and text[10] == "T" and text[19] == ".":
        try:
            return (datetime.fromisoformat(text[:26]) - _NAIVE_EPOCH) // _MICROSECOND
        except ValueError:
            pass
    return to_micros(parse_time(text))
