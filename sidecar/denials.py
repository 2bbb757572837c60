"""Denials as evidence, not as a spiral.

The first denial of a kind — same agent (a sidecar serves one), same rule (or
mode and reason when no rule decided), same tool or host — opens a window of
``window_seconds`` (60 by default) and is reported as an ordinary
``policy.violation``: the penalty, by the rule's severity. Every further
identical denial inside the window is only counted. When the window closes
(at its end, swept every second, or when a new denial of the kind arrives
after it), the count becomes ONE follow-up violation with ``repeat_of`` = the
first's ``event_id`` and ``count`` = the repeats, which the ledger keeps as
evidence and which moves no score. An agent retrying a blocked call 1,000
times in a minute pays one penalty.

Durability (see ``sidecar.outbox``): a denial is answered only after the
writer committed it — the first as a signed report, a repeat as +1 on the
window's committed count. A crash therefore loses no answered denial: on
restart the windows are read back and go on counting (no new penalty for a
window still open); a window that ended meanwhile is closed by the first
sweep. A graceful shutdown sends the counts so far as a follow-up and keeps
the windows open for the next start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from ledger.events import PolicyViolation, new_event_id
from ledger.timefmt import format_time
from sidecar.outbox import Outbox
from sidecar.policy import Action, Decision

log = logging.getLogger("agentmesh.sidecar.denials")

DEFAULT_WINDOW_SECONDS = 60.0


@dataclass(slots=True)
class _Open:
    first_event_id: str
    opened_at: float  # unix seconds, by the sidecar's clock


def window_key(action: Action, decision: Decision) -> str:
    rule = decision.rule or f"{decision.mode}:{decision.reason}"
    return f"{rule}\x00{action.kind}\x00{action.name}"


class Denials:
    """Aggregates the sidecar's denials into violations (one per window and kind)."""

    def __init__(
        self,
        outbox: Outbox,
        did: str,
        clock: Callable[[], datetime],
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
    ) -> None:
        if not window_seconds > 0:
            raise ValueError("the denial window must be > 0 seconds")
        self.outbox = outbox
        self.did = did
        self.clock = clock
        self.window_seconds = window_seconds
        self._open = {w.key: _Open(w.first_event_id, w.opened_at) for w in outbox.windows()}
        self.first = 0  # reports that carried a penalty
        self.repeats = 0  # denials counted into a window

    @property
    def open_windows(self) -> int:
        return len(self._open)

    async def record(self, action: Action, decision: Decision, note: str = "") -> None:
        """Record one denial (or would-be denial); return once it is committed."""
        key = window_key(action, decision)
        now = self.clock().timestamp()
        window = self._open.get(key)
        if window is not None and now - window.opened_at < self.window_seconds:
            self.repeats += 1
            await self.outbox.repeat(key)
            return
        event = PolicyViolation(
            actor=self.did,
            occurred_at=format_time(self.clock()),
            event_id=new_event_id(),
            agent=self.did,
            severity=decision.severity,
            rule=(decision.rule or f"{decision.mode}:{decision.reason}")[:200],
            detail=f"{action.kind} {action.name}: {decision.detail}{note}"[:4000],
        )
        assert event.event_id is not None
        # Set before the await: a concurrent identical denial counts into this window.
        # (The writer closes an ended window of the same key in the same transaction.)
        self._open[key] = _Open(event.event_id, now)
        self.first += 1
        await self.outbox.record(event, (key, now))

    async def sweep(self) -> int:
        """Close every window that has ended; return how many."""
        now = self.clock().timestamp()
        ended = [k for k, w in self._open.items() if now - w.opened_at >= self.window_seconds]
        for key in ended:
            del self._open[key]
        await asyncio.gather(*(self.outbox.close_window(key) for key in ended))
        return len(ended)

    async def flush(self) -> None:
        """Shutdown: report the repeats counted so far; the windows stay open."""
        await asyncio.gather(*(self.outbox.close_window(k, keep=True) for k in list(self._open)))
