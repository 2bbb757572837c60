"""When the PostgreSQL writer signs a checkpoint, and what it signs (no I/O).

A checkpoint is due every ``every`` entries or ``interval`` of ledger time since
the last one; the commit that reaches it signs the head (``sign_checkpoint``) and
the same head as a C2SP signed note over the Merkle root (``tlog``), for
witnesses. A batch that rotates the ledger's key signs none: the new key signs
the next.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from ledger import tlog
from ledger.chain import Checkpoint, Head, sign_checkpoint
from ledger.identity import SigningKey
from ledger.merkle import Frontier
from ledger.postgres.batch import BatchState, CheckpointRow
from ledger.timefmt import parse_time

__all__ = ["CheckpointPolicy"]


class CheckpointPolicy:
    def __init__(
        self,
        key: SigningKey,
        clock: Callable[[], datetime],
        every: int,
        interval: timedelta,
    ) -> None:
        self.key = key
        self.clock = clock
        self.every = every
        self.interval = interval
        self.last: tuple[int, datetime] = (0, clock())  # position, time of the last one

    def due(self, head: Head) -> bool:
        last_position, last_time = self.last
        if head.position <= last_position:
            return False
        return (
            head.position - last_position >= self.every
            or head.recorded_at - last_time >= self.interval
        )

    def sign(self, head: Head, frontier: Frontier) -> tuple[Checkpoint, str]:
        """The head's checkpoint and its C2SP note, at the ledger's time."""
        now = max(self.clock(), head.recorded_at)
        checkpoint = sign_checkpoint(self.key, head.position, head.entry_hash, now)
        return checkpoint, tlog.signed_tree_head(self.key, frontier.size, frontier.root())

    def for_batch(self, state: BatchState) -> CheckpointRow | None:
        """The checkpoint this batch's commit signs, when one is due."""
        head = state.head
        if state.ledger_did != self.key.did or not self.due(head):
            return None  # a rotation in this batch: the new key signs the next checkpoint
        checkpoint, note = self.sign(head, state.frontier)
        signed_at = parse_time(checkpoint.time)  # the time signed, not a second reading
        return (
            head.position,
            head.entry_hash,
            signed_at,
            checkpoint.signer,
            checkpoint.signature,
            note,
        )

    def signed(self, position: int, time: datetime) -> None:
        self.last = (position, time)
