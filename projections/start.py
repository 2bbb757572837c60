"""Where a fold of the ledger starts, and the state at a position.

After a retention cut the events before it are gone and the cut's snapshot
stands in for them, so every fold of the stored ledger starts the same way:
the snapshot (or an empty state at the ledger's beginning), then the events
after it. ``ledger_start`` reads that starting point through the ledger port;
``state_at_position`` folds on from it. Their users:

* the projector's rebuild and the retention job's snapshot: ``state_at_position``;
* ``agentmesh replay`` over the live ledger: ``ledger_start``, then the replay
  streams the entries after ``Start.position``;
* the API's ``?at=``: ``ledger_start``, then ``projections.history.state_at``
  folds only the agents that can move one score (``Start.state(agents=…)``).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ledger.ports import BodyReader, LedgerReader
from projections.config import TrustConfig
from projections.errors import SnapshotError
from projections.state import Folded, MeshState

__all__ = ["Start", "ledger_start", "state_at_position"]

# Entries read per query while folding a whole ledger.
BATCH = 10_000
# Entries folded between two turns of the event loop (which let the next batch arrive).
_SLICE = 1000


@dataclass(frozen=True, slots=True)
class Start:
    """Where the stored ledger starts: ``position`` 0 (its beginning) or a retention
    cut's position, with the cut's time and the projections' snapshot there."""

    position: int = 0
    cut_time: datetime | None = None
    snapshot: Mapping[str, Any] | None = None

    def state(self, config: TrustConfig, agents: Collection[str] | None = None) -> MeshState:
        """A fresh state at ``position``: empty at the beginning, else the snapshot
        loaded under ``config``. With ``agents``, only those agents and no grants
        (a partial fold, as ``projections.history`` does).

        Raises ``SnapshotError`` when the snapshot was folded under another trust
        configuration or is malformed: the events before it are gone, so no other
        start exists."""
        if self.snapshot is None:
            return MeshState(config)
        data: Mapping[str, Any] = self.snapshot
        if agents is not None:
            kept = data["agents"]
            data = {**data, "agents": {d: kept[d] for d in agents if d in kept}, "grants": {}}
        try:
            return MeshState.from_snapshot(data, config)
        except SnapshotError as exc:
            raise SnapshotError(
                f"the retention snapshot at position {self.position} cannot be used: {exc}; "
                "events before it are gone, so the trust configuration it was folded under "
                "must be kept"
            ) from exc


async def ledger_start(ledger: LedgerReader) -> Start:
    """The stored ledger's starting point: its latest retention cut, if any."""
    window = await ledger.retention_window()
    if window is None:
        return Start()
    return Start(window.position, window.cut_time, window.snapshot)


async def state_at_position(
    ledger: LedgerReader,
    config: TrustConfig,
    position: int | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> MeshState:
    """Every projection's state at ``position`` (None: the head): the retention
    snapshot, then the events after it folded with the projections' pure fold.

    ``progress`` is called with the position reached every ``BATCH`` events."""
    state = (await ledger_start(ledger)).state(config)
    batches = _Prefetched(ledger, state.position, position)
    # The fold allocates a container per peer window and keeps nearly all of them:
    # the cyclic collector would walk the growing state again and again (a tenth of
    # the fold at a million events) and find nothing, since the state holds no
    # cycles. It runs again at the end; cyclic garbage made meanwhile waits for it.
    collecting = gc.isenabled()
    gc.disable()
    try:
        count = 0
        while records := await batches.next():
            for start in range(0, len(records), _SLICE):
                state.fold_records(records[start : start + _SLICE])
                # A turn of the event loop: the next batch's rows arrive meanwhile.
                await asyncio.sleep(0)
            count += len(records)
            if progress is not None and count % BATCH == 0:
                progress(records[-1].position)
    finally:
        batches.close()
        if collecting:
            gc.enable()
    return state


class _Prefetched:
    """The entries after ``after`` (up to ``upto``) in batches of ``BATCH``, each one
    asked for before the previous one is folded: the database finds and sends the
    next rows while this process folds, instead of both taking turns."""

    def __init__(self, ledger: LedgerReader, after: int, upto: int | None) -> None:
        self._ledger = ledger
        # Bodies alone where the ledger can read them so (``ports.BodyReader``): the
        # fold reads nothing else, and the other columns cost most of a full read.
        self._bodies = ledger if isinstance(ledger, BodyReader) else None
        self._upto = upto
        self._pending: asyncio.Future[Sequence[Folded]] | None = self._read(after)

    def _read(self, after: int) -> asyncio.Future[Sequence[Folded]]:
        if self._bodies is not None:
            return asyncio.ensure_future(self._bodies.read_bodies(after, BATCH))
        return asyncio.ensure_future(self._ledger.read(after, BATCH))

    async def next(self) -> Sequence[Folded]:
        """The next batch, or an empty list at the end."""
        if self._pending is None:
            return []
        records = await self._pending
        self._pending = None
        upto = self._upto
        if upto is not None and records and records[-1].position > upto:
            return [r for r in records if r.position <= upto]
        if len(records) == BATCH:
            self._pending = self._read(records[-1].position)
        return records

    def close(self) -> None:
        """Stop a read still running (the fold failed, or was cancelled)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.done():
            if not pending.cancelled():
                pending.exception()  # retrieved: a failed read is not logged as lost
        else:
            pending.cancel()
