"""One agent's state at a past moment, folded exactly as the live projection folds it.

A score depends on more than the agent's own events: a peer's report counts
by the *peer's* standing at that moment (``state._peer_effect``). So the
moment is rebuilt from the agent's events and, transitively, the events of
every peer that reported about an agent already included — the closure of
"reported by". Every event that can move any of those scores names one of
them as a subject, so folding the union of their streams (from the retention
snapshot, restricted to them) gives exactly what a full replay gives, while
reading only the part of the ledger that matters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from projections.config import TrustConfig
from projections.errors import ProjectionError
from projections.start import Start
from projections.state import MeshState

PAGE = 1000
_REPORTS = frozenset({"policy.violation", "trust.signal"})


@dataclass(frozen=True)
class FoldLimits:
    """The most a fold may read: ledger entries (counted as read, an entry naming two
    included agents twice) and agents in the closure (each one at least a query)."""

    events: int
    agents: int


class FoldTooLargeError(ProjectionError):
    """The moment's fold would read more than its ``FoldLimits``; nothing is folded."""


class AgentHistory(Protocol):
    """What this needs of the ledger: one agent's entries by position."""

    async def read_agent(self, did: str, after: int = 0, limit: int = 1000) -> Sequence[Any]: ...


async def state_at(
    ledger: AgentHistory,
    did: str,
    moment: datetime,
    *,
    ledger_did: str,
    config: TrustConfig,
    start: Start | None = None,
    limits: FoldLimits | None = None,
) -> MeshState:
    """The fold of every event recorded up to ``moment`` that can move ``did``'s score.

    ``start`` is where the stored ledger starts (``projections.start.ledger_start``;
    None: its beginning). Grants are left out (trust only). With ``limits``, a
    closure that would read more raises ``FoldTooLargeError`` as soon as it does.
    """
    start = Start() if start is None else start
    after = start.position
    records: dict[int, Any] = {}
    included: set[str] = set()
    frontier = [did]
    budget = _Budget(limits)
    while frontier:
        peers: set[str] = set()
        for agent in frontier:
            included.add(agent)
            budget.take_agent()
            for record in await _history(ledger, agent, after, moment, budget):
                records[record.position] = record
                if record.event_type in _REPORTS and record.actor not in (ledger_did, agent):
                    peers.add(record.actor)
        frontier = sorted(peers - included)
    state = start.state(config, agents=included)
    state.apply_all_recorded(records[p] for p in sorted(records))
    return state


class _Budget:
    """What a fold may still read under its ``FoldLimits`` (None: everything),
    charged as it reads: an agent before its first query, entries per page."""

    def __init__(self, limits: FoldLimits | None) -> None:
        self.limits = limits
        self.agents = 0
        self.events = 0

    def take_agent(self) -> None:
        self.agents += 1
        if self.limits is not None and self.agents > self.limits.agents:
            raise FoldTooLargeError(
                f"the moment's fold reaches more than {self.limits.agents:,} agents "
                "(the peers whose reports weigh on this agent, transitively)"
            )

    def take_entries(self, count: int) -> None:
        self.events += count
        if self.limits is not None and self.events > self.limits.events:
            raise FoldTooLargeError(
                "the moment's fold reads more ledger entries than one request may"
            )


async def _history(
    ledger: AgentHistory, did: str, after: int, moment: datetime, budget: _Budget
) -> list[Any]:
    """The agent's entries up to ``moment``, each page charged to ``budget``."""
    found: list[Any] = []
    while True:
        batch = await ledger.read_agent(did, after, PAGE)
        budget.take_entries(len(batch))
        for record in batch:
            if record.recorded_at > moment:
                return found
            found.append(record)
        if len(batch) < PAGE:
            return found
        after = batch[-1].position
