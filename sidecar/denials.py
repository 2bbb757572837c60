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

Durability (see ``sidecar.outbox``) — what is acknowledged, precisely:

* the **penalty** (the first denial of a window) is answered only after its
  signed report is committed (fsync'd); no crash loses it, and it is
  delivered exactly once;
* a **repeat** is answered at once — a retry storm costs no disk wait, no
  signing and one in-memory increment per retry — and its +1 is committed by the
  writer within 10 ms (counts are gathered that long) plus one commit.
  A crash (SIGKILL, power loss) can lose the count of the repeats answered in
  that last moment: evidence only, never a penalty. Every committed count is
  reported exactly once.

On restart the windows are read back and go on counting (no new penalty for a
window still open); a window that ended meanwhile is closed by the first sweep.
A graceful shutdown commits every count, sends the counts so far as a
follow-up and keeps the windows open for the next start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
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
    committed: asyncio.Event | None = None  # set once the first report is on disk


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
        wait = self.record_now(action, decision, note)
        if wait is not None:
            await wait

    def record_now(
        self, action: Action, decision: Decision, note: str = ""
    ) -> Awaitable[bool] | None:
        """``record`` without waiting where no wait is owed: None when the denial was
        a repeat, counted at once; else an awaitable that returns once the report is
        committed (True: it was the first of its window, the penalty). Everything that
        decides between first and repeat happens before this returns, so concurrent
        identical denials can never open two windows."""
        key = window_key(action, decision)
        now = self.clock().timestamp()
        window = self._open.get(key)
        if window is not None and now - window.opened_at < self.window_seconds:
            if window.committed is not None and not window.committed.is_set():
                return self._count_when_committed(window)  # into a window whose row exists
            self.repeats += 1
            self.outbox.count_repeat(window.first_event_id)
            return None
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
        # Set before answering: a concurrent identical denial counts into this window.
        # (The writer closes an ended window of the same key in the same transaction.)
        opened = _Open(event.event_id, now, asyncio.Event())
        self._open[key] = opened
        self.first += 1
        try:
            committed = self.outbox.record_nowait(event, (key, now))
        except BaseException:
            self._forget(key, opened)
            raise
        return self._first_committed(key, opened, committed)

    async def _count_when_committed(self, window: _Open) -> bool:
        assert window.committed is not None
        await window.committed.wait()
        self.repeats += 1
        self.outbox.count_repeat(window.first_event_id)
        return False

    async def _first_committed(self, key: str, opened: _Open, committed: Awaitable[str]) -> bool:
        try:
            await committed
        except BaseException:
            self._forget(key, opened)
            raise
        finally:
            assert opened.committed is not None
            opened.committed.set()
        return True

    def _forget(self, key: str, opened: _Open) -> None:
        if self._open.get(key) is opened:
            del self._open[key]  # not on disk: the next denial is a first again

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
