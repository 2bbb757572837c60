"""Replay: the mesh as it was at any moment, for incident review.

Pure: every question folds ``RecordedEvent`` entries (in position order) with
the same ``MeshState.apply`` as the projector and answers with the same
``trust_view`` / ``tier_counts`` / ``is_active``. There is no I/O and no clock:
the caller hands in a ``ReplaySource`` and drives the fold with ``run()``
(a plain iterable) or ``await run_async()`` (an async iterable too, e.g. the
ledger streamed by ``PostgresLedgerReader.iter_entries``).

Time is the entries' ``recorded_at``. The state *at* ``T`` folds exactly the
entries with ``recorded_at <= T`` and evaluates trust at ``T`` (decay
applied): what ``MeshState`` folded up to ``T`` answers with
``trust_view(did, T)``. Entries are stored in ``recorded_at`` order, so a
replay stops reading at the first entry past the last moment it needs.

A source may start from a retention snapshot (``initial``: the state at the
cut; the events before it are gone). Any question about a moment before
``window_start`` (the cut time) raises ``ReplayError`` instead of answering
from a history that no longer exists, and so does a source that skips
positions: a fold over a gap would answer wrongly without noticing.

Three questions, each a ``Replay`` subclass with its result type:

* ``AgentTimelineReplay`` → ``Timeline``: one row per ledger event that
  changed the agent (the changed-DID set of ``MeshState.apply``), with the
  score before (decayed to the event's time) and after, the points lost to
  decay since the previous row and the tier change; plus a ``decay`` row at
  the exact microsecond decay alone takes the agent into a lower tier, so a
  tier change shows on exactly one row, when it happened.
* ``StateReplay`` → ``MeshAt``: registry size, agents per tier, the lowest
  trust agents and the active delegations at a moment.
* ``DiffReplay`` → ``MeshDiff``: agents whose tier differs between two
  moments, grants made and grants revoked in between.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import itertools
from abc import ABC, abstractmethod
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Generic, Literal, TypeVar

from ledger.chain import RecordedEvent
from ledger.events import AnyEvent, PolicyViolation, TrustSignal, decode_body, subject_agents
from ledger.timefmt import format_time
from projections.config import MAX_SCORE, TrustConfig
from projections.delegation import Grant, is_active
from projections.errors import ProjectionError, SnapshotError
from projections.state import MeshState
from projections.trust import (
    HOUR_US,
    MILLI,
    TrustState,
    TrustView,
    from_micros,
    points,
    score_milli_at,
    tier_for,
    to_micros,
)

R = TypeVar("R")
Progress = Callable[[int], None]
RowKind = Literal["start", "event", "decay", "end"]

PROGRESS_EVERY: Final = 10_000
"""Entries between two calls of a ``run_async`` progress callback."""
TIER_FLOORS: Final = (900, 700, 500)
"""Lowest scores of verified_partner, trusted and standard (``tier_for``)."""


class ReplayError(ProjectionError):
    """A question the source cannot answer truthfully (before the retention
    window, a gap in the entries, an unknown agent, a filtered source)."""


@dataclass(frozen=True, slots=True)
class ReplaySource:
    """Where a replay reads from.

    ``events``: entries in position order (a list, a generator, or an async
    iterable such as ``PostgresLedgerReader.iter_entries()``); those at or
    below ``initial.position`` are skipped. ``initial``: the state the events
    continue from (a retention snapshot), never mutated; None for genesis.
    ``window_start``: the retention cut time, before which no question is
    answered (None: ``initial.recorded_at`` if there is a snapshot, else no
    limit). ``window_end``: set when the source ends there (an audit bundle's
    exclusive ``to``): what was recorded from then on is unknown, so no
    question at or after it is answered. ``agent``: set when the entries are
    only those of one agent (an agent-filtered audit bundle): only that
    agent's timeline can be asked, and positions may skip. Its scores and
    tiers are exact (trust changes only through events naming the agent) but
    delegation rows may be missing: a grant is folded only when both parties
    are registered, and a revocation or suspension above a grant it holds
    does not name it. A peer's report counts by the *peer's* standing, which
    such a source does not hold: replaying one is refused (``ReplayError``)
    rather than answered wrongly. ``ledger_did`` tells the ledger's own
    (full-weight) reports from a peer's.
    """

    events: Iterable[RecordedEvent] | AsyncIterable[RecordedEvent]
    initial: MeshState | None = None
    window_start: datetime | None = None
    window_end: datetime | None = None
    agent: str | None = None
    ledger_did: str | None = None


def merge_by_position(
    keys: Iterable[RecordedEvent], events: Iterable[RecordedEvent]
) -> Iterator[RecordedEvent]:
    """One position-ordered stream of two (an audit bundle's key entries and its
    events): keys first when positions are equal, each position once."""
    merged = heapq.merge(
        ((r.position, 0, i, r) for i, r in enumerate(keys)),
        ((r.position, 1, i, r) for i, r in enumerate(events)),
    )
    last = 0
    for position, _, _, record in merged:
        if position != last:
            last = position
            yield record


# -- results ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrustPoint:
    """An agent's score and tier at one moment."""

    score: int
    tier: str


@dataclass(frozen=True, slots=True)
class TimelineRow:
    """One row of an agent's timeline.

    ``kind``: ``event`` (a ledger entry changed the agent), ``decay`` (decay
    alone moved it into a lower tier at ``time``), ``start`` / ``end`` (its
    state at the first and last moment asked about). ``score_before`` is the
    score at ``time`` before the entry was applied (None before registration),
    ``score_after`` right after; ``decay`` is the points lost to decay since
    the previous row (``previous.score_after - decay == score_before``).
    """

    kind: RowKind
    time: datetime
    position: int | None
    event: str | None
    actor: str | None
    score_before: int | None
    score_after: int
    tier_before: str | None
    tier_after: str
    decay: int
    trust: TrustState = dataclasses.field(repr=False, compare=False)
    """The agent's trust state after this row (a copy), for sampling between rows."""
    suspended: bool = False

    @property
    def tier_changed(self) -> bool:
        return self.tier_before is not None and self.tier_before != self.tier_after

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "time": format_time(self.time),
            "position": self.position,
            "event": self.event,
            "actor": self.actor,
            "score_before": self.score_before,
            "score_after": self.score_after,
            "decay": self.decay,
            "tier_before": self.tier_before,
            "tier_after": self.tier_after,
        }


@dataclass(frozen=True, slots=True)
class Timeline:
    """An agent's trust over ``[rows[0].time, end]``, row by row."""

    did: str
    start: datetime | None
    end: datetime
    rows: tuple[TimelineRow, ...]
    config: TrustConfig

    def at(self, moment: datetime) -> TrustPoint:
        """Score and tier at ``moment`` (decay applied), from the last row at or before it."""
        if not self.rows or not self.rows[0].time <= moment <= self.end:
            raise ReplayError(f"{format_time(moment)} is outside this timeline")
        row = self.rows[bisect.bisect_right(self.rows, moment, key=lambda r: r.time) - 1]
        score = _score_at(row.trust, self.config, to_micros(moment))
        return TrustPoint(score, tier_for(score, self.config, suspended=row.suspended))

    def series(self, samples: int = 200) -> list[tuple[datetime, int]]:
        """The score every ``1/samples`` of the span and just before and after each
        row, in time order: what a plot of the score with decay needs."""
        points: list[tuple[datetime, int, int, int]] = []
        for index, row in enumerate(self.rows):
            if row.score_before is not None:
                points.append((row.time, 0, 2 * index, row.score_before))
            points.append((row.time, 0, 2 * index + 1, row.score_after))
        if self.rows:
            first = self.rows[0].time
            span = self.end - first
            for step in range(1, samples if span else 0):
                moment = first + span * step / samples
                points.append((moment, 1, step, self.at(moment).score))
        points.sort()
        return [(moment, score) for moment, _, _, score in points]

    def to_dict(self) -> dict[str, Any]:
        return {
            "agent": self.did,
            "from": None if self.start is None else format_time(self.start),
            "to": format_time(self.end),
            "rows": [row.to_dict() for row in self.rows],
        }

    def lines(self) -> list[str]:
        """The timeline as an aligned text table."""
        span = f"{format_time(self.rows[0].time)} to {format_time(self.end)}"
        title = f"trust timeline of {self.did}, {span} ({len(self.rows)} rows)"
        header = ("time", "position", "event", "actor", "score", "decay", "tier")
        body = [_row_cells(row) for row in self.rows]
        return [title, *text_table(header, body, right={1, 4, 5})]


@dataclass(frozen=True, slots=True)
class AgentAt:
    did: str
    score: int
    tier: str

    def to_dict(self) -> dict[str, Any]:
        return {"did": self.did, "score": self.score, "tier": self.tier}


@dataclass(frozen=True, slots=True)
class GrantAt:
    """A delegation link as the replay reports it."""

    grant_id: str
    delegator: str
    delegatee: str
    capabilities: tuple[str, ...]
    expires_at: datetime | None
    granted_at: datetime
    granted_position: int
    parent: str | None

    @classmethod
    def of(cls, grant: Grant) -> GrantAt:
        return cls(
            grant.grant_id,
            grant.delegator,
            grant.delegatee,
            grant.capabilities,
            grant.expires_at,
            grant.granted_at,
            grant.granted_position,
            grant.parent,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "grant_id": self.grant_id,
            "delegator": self.delegator,
            "delegatee": self.delegatee,
            "capabilities": list(self.capabilities),
            "expires_at": _time_text(self.expires_at),
            "granted_at": format_time(self.granted_at),
            "granted_position": self.granted_position,
            "parent": self.parent,
        }


@dataclass(frozen=True, slots=True)
class RevokedGrant:
    grant: GrantAt
    revoked_at: datetime
    revoked_position: int
    reason: str
    falls_with_it: tuple[str, ...]
    """Grants below it (their chains now end in a revoked link)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.grant.to_dict(),
            "revoked_at": format_time(self.revoked_at),
            "revoked_position": self.revoked_position,
            "reason": self.reason,
            "falls_with_it": list(self.falls_with_it),
        }


@dataclass(frozen=True, slots=True)
class MeshAt:
    """The mesh at ``at``: everything folded up to ledger position ``position``."""

    at: datetime
    position: int
    registry_size: int
    registered: int
    tiers: dict[str, int]
    lowest: tuple[AgentAt, ...]
    active_grants: tuple[GrantAt, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": format_time(self.at),
            "position": self.position,
            "registry_size": self.registry_size,
            "registered": self.registered,
            "tiers": dict(self.tiers),
            "lowest": [agent.to_dict() for agent in self.lowest],
            "active_grants": [grant.to_dict() for grant in self.active_grants],
        }

    def lines(self) -> list[str]:
        tiers = ", ".join(f"{tier} {count}" for tier, count in self.tiers.items())
        return [
            f"mesh at {format_time(self.at)} (ledger position {self.position})",
            f"registry: {self.registry_size} active agents, {self.registered} registered",
            f"tiers: {tiers}",
            "",
            f"{len(self.lowest)} lowest-trust agents",
            *_or_none(
                text_table(
                    ("did", "score", "tier"),
                    [(a.did, str(a.score), a.tier) for a in self.lowest],
                    right={1},
                ),
                self.lowest,
            ),
            "",
            f"active delegations ({len(self.active_grants)})",
            *_or_none(_grant_table(self.active_grants), self.active_grants),
        ]


@dataclass(frozen=True, slots=True)
class TierCrossing:
    """An agent whose tier at ``end`` differs from its tier at ``start``
    (``tier_from`` None: it was not registered yet)."""

    did: str
    tier_from: str | None
    tier_to: str
    score_from: int | None
    score_to: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "did": self.did,
            "tier_from": self.tier_from,
            "tier_to": self.tier_to,
            "score_from": self.score_from,
            "score_to": self.score_to,
        }


@dataclass(frozen=True, slots=True)
class MeshDiff:
    """What changed between ``start`` (position ``start_position``) and ``end``."""

    start: datetime
    end: datetime
    start_position: int
    end_position: int
    crossings: tuple[TierCrossing, ...]
    granted: tuple[GrantAt, ...]
    revoked: tuple[RevokedGrant, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "from": format_time(self.start),
            "to": format_time(self.end),
            "from_position": self.start_position,
            "to_position": self.end_position,
            "tier_crossings": [c.to_dict() for c in self.crossings],
            "grants_made": [g.to_dict() for g in self.granted],
            "grants_revoked": [r.to_dict() for r in self.revoked],
        }

    def lines(self) -> list[str]:
        crossings = text_table(
            ("did", "tier", "score"),
            [
                (
                    c.did,
                    f"{c.tier_from or '—'} → {c.tier_to}",
                    f"{_points(c.score_from)} → {c.score_to}",
                )
                for c in self.crossings
            ],
            right={2},
        )
        revoked = text_table(
            ("grant", "delegator", "delegatee", "revoked at", "reason", "falls with it"),
            [
                (
                    r.grant.grant_id,
                    r.grant.delegator,
                    r.grant.delegatee,
                    format_time(r.revoked_at),
                    r.reason,
                    ", ".join(r.falls_with_it) or "-",
                )
                for r in self.revoked
            ],
        )
        return [
            f"changes from {format_time(self.start)} (ledger position {self.start_position}) "
            f"to {format_time(self.end)} (position {self.end_position})",
            "",
            f"tier crossings ({len(self.crossings)})",
            *_or_none(crossings, self.crossings),
            "",
            f"grants made ({len(self.granted)})",
            *_or_none(_grant_table(self.granted), self.granted),
            "",
            f"grants revoked ({len(self.revoked)})",
            *_or_none(revoked, self.revoked),
        ]


# -- pure answers from a folded state ------------------------------------------------


def mesh_at(state: MeshState, at: datetime, lowest: int = 10) -> MeshAt:
    """The ``MeshAt`` answer of a state folded up to ``at``."""
    views = [_known_view(state, did, at) for did in state.trust]
    worst = heapq.nsmallest(lowest, views, key=lambda v: (v.score_milli, v.did))
    grants = sorted(state.delegations.grants.values(), key=lambda g: g.granted_position)
    return MeshAt(
        at=at,
        position=state.position,
        registry_size=state.registry_size(),
        registered=len(state.agents),
        tiers=state.tier_counts(at),
        lowest=tuple(AgentAt(v.did, v.score, v.tier) for v in worst),
        active_grants=tuple(GrantAt.of(g) for g in grants if is_active(state, g, at)),
    )


def tier_bands(config: TrustConfig) -> list[tuple[int, int, str]]:
    """``(low, high, tier)`` score bands from 0 to 1000 (``low`` inclusive), in
    ascending order, as ``tier_for`` assigns them under ``config``."""
    edges = sorted({0, MAX_SCORE, config.min_threshold, *TIER_FLOORS})
    bands: list[tuple[int, int, str]] = []
    for low, high in itertools.pairwise(edges):
        tier = tier_for(low, config)
        if bands and bands[-1][2] == tier:
            bands[-1] = (bands[-1][0], high, tier)
        else:
            bands.append((low, high, tier))
    return bands


def first_time_below(state: TrustState, config: TrustConfig, points: int) -> int | None:
    """The first microsecond after ``state.base_at`` at which decay alone has taken
    the score (whole points) below ``points``; None if it never does.

    Inverts ``score_milli_at``: the score (rounded half up) is below ``points`` once
    the decay due reaches ``base - points * 1000 + 501`` milli-points, and the decay due is
    ``rate * (t - decay_from) // HOUR_US`` minus what the base already holds.
    """
    rate, floor = config.decay_rate_milli, config.decay_floor * MILLI
    target = points * MILLI
    if rate == 0 or target <= floor or state.base_milli <= floor:
        return None
    held = rate * (state.base_at - state.decay_from) // HOUR_US
    due = state.base_milli - (target - MILLI // 2) + 1 + held
    elapsed = -(-due * HOUR_US // rate)  # ceiling division
    return max(state.decay_from + elapsed, state.base_at + 1)


# -- replays ---------------------------------------------------------------------


class Replay(ABC, Generic[R]):
    """A ``MeshState`` moved forward through a source's entries up to ``horizon``
    (None: to the end of the source); subclasses watch the fold and answer."""

    def __init__(
        self, source: ReplaySource, config: TrustConfig | None, horizon: datetime | None
    ) -> None:
        self.source = source
        self.state = _start_state(source.initial, config)
        self.window_start = source.window_start
        if self.window_start is None and source.initial is not None:
            self.window_start = source.initial.recorded_at
        self.horizon = horizon
        self.last_seen: datetime | None = None
        """``recorded_at`` of the last entry folded."""

    def feed(self, record: RecordedEvent) -> bool:
        """Fold one entry; False (nothing folded) once past the horizon: stop reading."""
        if self.horizon is not None and record.recorded_at > self.horizon:
            return False
        if record.position <= self.state.position:
            return True  # already in the snapshot the source starts from
        if self.source.agent is None and record.position != self.state.position + 1:
            raise ReplayError(
                f"the source has no entries {self.state.position + 1}..{record.position - 1}: "
                "replaying across a gap would answer wrongly (after a retention cut, the "
                "retention snapshot must stand in for the removed entries)"
            )
        self.last_seen = record.recorded_at
        event = decode_body(record.body)
        if self.source.agent is not None:
            self._check_weighable(event)
        self._fold(record, event)
        return True

    def _check_weighable(self, event: AnyEvent) -> None:
        """In a one-agent source, a peer's report cannot be weighed: refuse it."""
        if not isinstance(event, PolicyViolation | TrustSignal):
            return
        if isinstance(event, PolicyViolation) and event.repeat_of is not None:
            return  # evidence of repeats: moves nothing, whoever filed it
        if event.actor in (self.source.agent, self.source.ledger_did):
            return
        raise ReplayError(
            f"a report by {event.actor} about {self.source.agent} counts by the reporter's "
            "standing, which a one-agent source does not hold: replay from the whole ledger "
            "or an unfiltered audit bundle"
        )

    def _fold(self, record: RecordedEvent, event: AnyEvent) -> None:
        self.state.apply(event, record.position, record.recorded_at)

    @abstractmethod
    def result(self) -> R:
        """The answer, once every entry up to the horizon was fed."""

    def run(self) -> R:
        """Fold a plain iterable source and answer."""
        events = self.source.events
        if not isinstance(events, Iterable):
            raise ReplayError("this source is asynchronous: use run_async()")
        for record in events:
            if not self.feed(record):
                break
        return self.result()

    async def run_async(self, progress: Progress | None = None) -> R:
        """Fold the source (async or not) and answer; ``progress`` gets the position
        every ``PROGRESS_EVERY`` entries."""
        events = self.source.events
        if not isinstance(events, AsyncIterable):
            return self.run()
        count = 0
        try:
            async for record in events:
                if not self.feed(record):
                    break
                count += 1
                if progress is not None and count % PROGRESS_EVERY == 0:
                    progress(record.position)
        finally:
            # Stopping early must close the stream now (its connection), not at GC.
            if isinstance(events, AsyncGenerator):
                await events.aclose()
        return self.result()

    def _check_window(self, moment: datetime, what: str) -> None:
        if self.window_start is not None and moment < self.window_start:
            raise ReplayError(
                f"{what} {format_time(moment)} is before the retention window "
                f"(cut at {format_time(self.window_start)})"
            )
        end = self.source.window_end
        if end is not None and moment >= end:
            raise ReplayError(
                f"{what} {format_time(moment)} is past the end of the source (it holds the "
                f"entries recorded before {format_time(end)})"
            )

    def _require_whole_ledger(self, question: str) -> None:
        if self.source.agent is not None:
            raise ReplayError(
                f"{question} needs the whole ledger; this source holds only the entries "
                f"of {self.source.agent}"
            )


class AgentTimelineReplay(Replay[Timeline]):
    """The timeline of ``did`` over ``(start, end]`` (see ``Timeline``).

    With ``start`` (default: the retention window's start, if any) the first row
    is the agent's state at ``start``; rows are the events after it. ``end``
    defaults to the last entry of the source; the last row is the state there.
    """

    def __init__(
        self,
        source: ReplaySource,
        did: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        config: TrustConfig | None = None,
    ) -> None:
        super().__init__(source, config, end)
        if source.agent is not None and source.agent != did:
            raise ReplayError(f"this source holds only the entries of {source.agent}, not {did}")
        _check_order(start, end)
        self.did = did
        self.start = start if start is not None else self.window_start
        for moment, what in ((self.start, "--from"), (end, "--to")):
            if moment is not None:
                self._check_window(moment, what)
        self.rows: list[TimelineRow] = []
        self._started = self.start is None

    def _fold(self, record: RecordedEvent, event: AnyEvent) -> None:
        if not self._started and self.start is not None and record.recorded_at > self.start:
            self._begin(self.start)
        did, moment = self.did, record.recorded_at
        known = did in self.state.trust
        # Only an event naming the agent can change its trust: take "before" first.
        before = self._view(moment) if known and did in subject_agents(event) else None
        changed = self.state.apply(event, record.position, moment)
        if self._started and did in changed:
            if before is None and known:
                before = self._view(moment)  # a cascade (grant, suspension above it)
            self._add("event", moment, before, self._view(moment), record)

    def result(self) -> Timeline:
        if not self._started and self.start is not None:
            self._begin(self.start)
        ends = [m for m in (self.last_seen, self.start) if m is not None]
        end = self.horizon if self.horizon is not None else max(ends, default=None)
        if end is None or self.did not in self.state.trust:
            when = "in the source" if end is None else f"at or before {format_time(end)}"
            raise ReplayError(f"agent {self.did} is not registered {when}")
        view = self._view(end)
        self._add("end", end, view, view, None)
        return Timeline(self.did, self.start, end, tuple(self.rows), self.state.config)

    def _begin(self, start: datetime) -> None:
        self._started = True
        if self.did in self.state.trust:
            view = self._view(start)
            self._add("start", start, view, view, None)

    def _view(self, moment: datetime) -> TrustView:
        return _known_view(self.state, self.did, moment)

    def _add(
        self,
        kind: RowKind,
        moment: datetime,
        before: TrustView | None,
        after: TrustView,
        record: RecordedEvent | None,
    ) -> None:
        if self.rows and before is not None:
            self._decay_rows(moment)
        previous = self.rows[-1] if self.rows else None
        decay = 0 if previous is None or before is None else previous.score_after - before.score
        trust = self.state.trust[self.did]
        self.rows.append(
            TimelineRow(
                kind=kind,
                time=moment,
                position=None if record is None else record.position,
                event=None if record is None else record.event_type,
                actor=None if record is None else record.actor,
                score_before=None if before is None else before.score,
                score_after=after.score,
                tier_before=None if before is None else before.tier,
                tier_after=after.tier,
                decay=decay,
                trust=dataclasses.replace(trust, violations=dict(trust.violations)),
                suspended=after.tier == "suspended",
            )
        )

    def _decay_rows(self, until: datetime) -> None:
        """A ``decay`` row wherever decay alone changes the tier after the last row
        and at or before ``until`` (the agent's state is the last row's till then)."""
        last, config = self.rows[-1], self.state.config
        if last.suspended:
            return  # the tier is "suspended" whatever the score
        lowest = _score_at(last.trust, config, to_micros(until))
        for boundary in sorted({config.min_threshold, *TIER_FLOORS}, reverse=True):
            if not lowest < boundary <= last.score_after:
                continue
            crossed = first_time_below(last.trust, config, boundary)
            assert crossed is not None  # the score does fall below it by `until`
            score = _score_at(last.trust, config, crossed)
            tier, previous = tier_for(score, config), self.rows[-1]
            if tier != previous.tier_after:
                self.rows.append(
                    dataclasses.replace(
                        previous,
                        kind="decay",
                        time=from_micros(crossed),
                        position=None,
                        event=None,
                        actor=None,
                        score_before=score,
                        score_after=score,
                        tier_before=previous.tier_after,
                        tier_after=tier,
                        decay=previous.score_after - score,
                    )
                )


class StateReplay(Replay[MeshAt]):
    """The mesh at ``at`` (see ``MeshAt``), ``lowest`` lowest-trust agents listed."""

    def __init__(
        self,
        source: ReplaySource,
        at: datetime,
        *,
        lowest: int = 10,
        config: TrustConfig | None = None,
    ) -> None:
        super().__init__(source, config, at)
        self._require_whole_ledger("the state of the mesh")
        self._check_window(at, "--at")
        self.at = at
        self.lowest = lowest

    def result(self) -> MeshAt:
        return mesh_at(self.state, self.at, self.lowest)


class DiffReplay(Replay[MeshDiff]):
    """What changed between ``start`` and ``end`` (see ``MeshDiff``)."""

    def __init__(
        self,
        source: ReplaySource,
        start: datetime,
        end: datetime,
        *,
        config: TrustConfig | None = None,
    ) -> None:
        super().__init__(source, config, end)
        self._require_whole_ledger("a diff of the mesh")
        _check_order(start, end)
        self._check_window(start, "--from")
        self.start, self.end = start, end
        self._at_start: dict[str, TrustView] | None = None
        self._start_position = 0

    def _fold(self, record: RecordedEvent, event: AnyEvent) -> None:
        if self._at_start is None and record.recorded_at > self.start:
            self._capture()
        super()._fold(record, event)

    def _capture(self) -> None:
        state = self.state
        self._at_start = {did: _known_view(state, did, self.start) for did in state.trust}
        self._start_position = state.position

    def result(self) -> MeshDiff:
        if self._at_start is None:
            self._capture()
        assert self._at_start is not None
        state, since = self.state, self._start_position
        crossings = []
        for did in sorted(state.trust):
            now, then = _known_view(state, did, self.end), self._at_start.get(did)
            if then is None or then.tier != now.tier:
                crossings.append(
                    TierCrossing(
                        did,
                        None if then is None else then.tier,
                        now.tier,
                        None if then is None else then.score,
                        now.score,
                    )
                )
        grants = state.delegations.grants.values()
        made = sorted((g for g in grants if g.granted_position > since), key=_granted_order)
        revoked = sorted(
            (g for g in grants if g.revoked_position is not None and g.revoked_position > since),
            key=lambda g: (g.revoked_position, g.grant_id),
        )
        return MeshDiff(
            start=self.start,
            end=self.end,
            start_position=since,
            end_position=state.position,
            crossings=tuple(crossings),
            granted=tuple(GrantAt.of(g) for g in made),
            revoked=tuple(self._revoked(g) for g in revoked),
        )

    def _revoked(self, grant: Grant) -> RevokedGrant:
        assert grant.revoked_at is not None
        assert grant.revoked_position is not None
        below = [g for g in self.state.delegations.subtree(grant.grant_id) if g is not grant]
        return RevokedGrant(
            GrantAt.of(grant),
            grant.revoked_at,
            grant.revoked_position,
            grant.revoked_reason or "",
            tuple(g.grant_id for g in sorted(below, key=_granted_order)),
        )


# -- helpers ----------------------------------------------------------------------


def text_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()
) -> list[str]:
    """Columns padded to their widest cell, two spaces apart; ``right`` columns
    right-aligned."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.rjust(width) if index in right else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    return [line(header), *(line(row) for row in rows)]


def _row_cells(row: TimelineRow) -> tuple[str, ...]:
    if row.kind == "event":
        score = f"{_points(row.score_before)} → {row.score_after}"
        event = row.event or ""
    else:
        score, event = str(row.score_after), f"({row.kind})"
    tier = f"{row.tier_before} → {row.tier_after}" if row.tier_changed else row.tier_after
    position = "" if row.position is None else str(row.position)
    return (format_time(row.time), position, event, row.actor or "", score, str(row.decay), tier)


def _grant_table(grants: Sequence[GrantAt]) -> list[str]:
    return text_table(
        ("grant", "delegator", "delegatee", "capabilities", "granted at", "expires"),
        [
            (
                g.grant_id,
                g.delegator,
                g.delegatee,
                ",".join(g.capabilities),
                format_time(g.granted_at),
                _time_text(g.expires_at) or "never",
            )
            for g in grants
        ],
    )


def _or_none(table: list[str], items: Sequence[object]) -> list[str]:
    return table if items else ["(none)"]


def _points(score: int | None) -> str:
    return "—" if score is None else str(score)


def _time_text(moment: datetime | None) -> str | None:
    return None if moment is None else format_time(moment)


def _granted_order(grant: Grant) -> tuple[int, str]:
    return (grant.granted_position, grant.grant_id)


def _score_at(trust: TrustState, config: TrustConfig, micros: int) -> int:
    milli = score_milli_at(trust, config.decay_rate_milli, config.decay_floor * MILLI, micros)
    return points(milli)


def _known_view(state: MeshState, did: str, moment: datetime) -> TrustView:
    view = state.trust_view(did, moment)
    assert view is not None  # only asked for registered agents
    return view


def _check_order(start: datetime | None, end: datetime | None) -> None:
    if start is not None and end is not None and start > end:
        raise ReplayError(f"--from {format_time(start)} is after --to {format_time(end)}")


def _start_state(initial: MeshState | None, config: TrustConfig | None) -> MeshState:
    """A private copy of ``initial`` (the caller's is never mutated), or an empty state."""
    if initial is None:
        return MeshState(config)
    try:
        return MeshState.from_snapshot(initial.snapshot(), config)
    except SnapshotError as exc:
        raise ReplayError(f"the source's starting snapshot cannot be used: {exc}") from exc
