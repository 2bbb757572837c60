"""Retention: remove events older than the audit window without breaking verification.

A run follows these steps (``apply_retention``), each idempotent, so a run
that dies at any point is finished by the next one:

1. The cut: ``cut_time = now - days``; the cut position P is the last event
   recorded before it. Nothing to do if P is already anchored and recorded.
2. Anchor (one transaction, before anything is removed): the snapshot of every
   projection's state at P (built by the caller's ``snapshot_at``), the agent
   keys as of P, and the chain's hash at P, signed together by the ledger key;
   plus a signed checkpoint at P. If this cannot be written, nothing is removed.
3. Prune: whole daily partitions entirely before the cut are detached
   (CONCURRENTLY, so appends go on) and dropped; the rest of a partition that
   straddles the cut is deleted row by row; checkpoints of removed positions go
   too.
4. Record: ``ledger.retention_applied`` is appended, naming the cut, the
   anchor hash and the snapshot digest.

Every run, whatever the cut, also drops the single-use ids' and idempotency keys'
partitions of days whose bodies are stale (``authority.single_use_horizon`` of the
ledger's clock): they can match nothing that may still be appended (trust rule 2).

Afterwards verification starts from the latest anchor: its signature, its
checkpoint, and the keys it carries replace the removed history.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from ledger import authority, tlog
from ledger.anchor import Anchor, verify_anchor
from ledger.canonical import canonical_bytes
from ledger.chain import sign_checkpoint
from ledger.errors import LedgerError, StoreUnavailableError
from ledger.events import RetentionApplied
from ledger.identity import SigningKey, VerifyKey, b64encode
from ledger.ports import Ledger, LedgerReader, RetentionStore, StoredAnchor, Window

# The anchor's signed bytes live in a pure module: the offline audit verifier checks them.
from ledger.signatures import ANCHOR_TYPE as ANCHOR_TYPE
from ledger.signatures import anchor_signed_bytes as anchor_signed_bytes
from ledger.timefmt import format_time

SnapshotAt = Callable[[int], Awaitable[Mapping[str, Any]]]


class RetainedReader(LedgerReader, Protocol):
    """A ledger that can say where its retention statements run
    (``PostgresLedgerReader.retention_store``: ``ledger.postgres.retention``)."""

    def retention_store(self) -> RetentionStore: ...


class RetainedLedger(Ledger, RetainedReader, Protocol):
    """What a retention run holds: the ledger (it appends the record) and its store."""


class RetentionError(LedgerError):
    """Retention refused to run (nothing was removed) or could not finish."""


@dataclass(frozen=True, slots=True)
class RetentionPlan:
    cut_time: datetime
    cut_position: int
    anchored: int
    drop: list[str]
    straddling: list[str]
    rows: int
    stale: list[str] = field(default_factory=list)  # single-use days past the horizon

    @property
    def nothing_to_do(self) -> bool:
        return self.cut_position <= self.anchored

    def summary(self) -> str:
        stale = (
            f"; drop {len(self.stale)} stale single-use partitions ({', '.join(self.stale)})"
            if self.stale
            else ""
        )
        if self.nothing_to_do:
            return (
                f"retention: nothing before {format_time(self.cut_time)} left to remove "
                f"(anchored at position {self.anchored}){stale}"
            )
        return (
            f"retention: cut at {format_time(self.cut_time)} = position "
            f"{self.cut_position}; {self.rows} events; drop {len(self.drop)} partitions "
            f"({', '.join(self.drop) or '-'}); trim {', '.join(self.straddling) or '-'}{stale}"
        )


# -- reading anchors -----------------------------------------------------------------


async def latest_anchor(reader: RetainedReader, ledger_key: VerifyKey) -> Anchor | None:
    """The newest anchor, its signature and digests verified; None if retention never ran."""
    stored = await _store(reader).latest_anchor()
    return None if stored is None else verify_anchor(stored, ledger_key)


def _store(reader: RetainedReader) -> RetentionStore:
    return reader.retention_store()


# -- planning ------------------------------------------------------------------------------


async def plan_retention(
    reader: RetainedReader, ledger_key: VerifyKey, now: datetime, days: int
) -> RetentionPlan:
    cut_time = now - timedelta(days=days)
    store = _store(reader)
    cut = await store.cut_position(cut_time)
    anchor = await latest_anchor(reader, ledger_key)
    anchored = 0 if anchor is None or anchor.status != "recorded" else anchor.position
    drop, straddling = await store.partitions(cut_time)
    rows = await store.count_entries(anchored, cut)
    horizon = authority.single_use_horizon((await reader.head()).recorded_at)
    stale = await store.stale_partitions(horizon)
    return RetentionPlan(cut_time, max(cut, anchored), anchored, drop, straddling, rows, stale)


# -- applying ------------------------------------------------------------------------------


async def apply_retention(
    store: RetainedLedger,
    key: SigningKey,
    plan: RetentionPlan,
    snapshot_at: SnapshotAt,
    now: datetime,
) -> str:
    """Carry out ``plan`` (see the module docstring for the numbered steps)."""
    await _store(store).drop_partitions(plan.stale)
    # 1. Resume an interrupted run first, whatever the new cut.
    pending = await _pending_anchor(store, key)
    if pending is None and plan.nothing_to_do:
        return plan.summary()
    if pending is None:
        pending = await _anchor(store, key, plan, snapshot_at, now)
    if pending.status == "anchored":
        await _prune(_store(store), pending, plan)
        pending = await _set_status(_store(store), pending, "pruned")
    if pending.status == "pruned":
        await store.append_own(
            RetentionApplied(
                actor=key.did,
                occurred_at=format_time(now),
                cut_position=pending.position,
                cut_time=format_time(pending.cut_time),
                anchor_hash=pending.entry_hash.hex(),
                snapshot_digest=pending.snapshot_digest.hex(),
            ),
            idempotency_key=f"retention:{pending.position}",
        )
        await _set_status(_store(store), pending, "recorded")
    return (
        f"retention applied: events up to position {pending.position} "
        f"(recorded before {format_time(pending.cut_time)}) removed; "
        f"anchor {pending.entry_hash.hex()}, snapshot {pending.snapshot_digest.hex()}"
        + (f"; {len(plan.stale)} stale single-use partitions dropped" if plan.stale else "")
    )


async def _pending_anchor(store: RetainedLedger, key: SigningKey) -> Anchor | None:
    anchor = await latest_anchor(store, key.public)
    return None if anchor is None or anchor.status == "recorded" else anchor


async def _anchor(
    store: RetainedLedger,
    key: SigningKey,
    plan: RetentionPlan,
    snapshot_at: SnapshotAt,
    now: datetime,
) -> Anchor:
    """2. Snapshot, keys and checkpoint at the cut, signed, in one transaction."""
    position = plan.cut_position
    entry = await store.entry_at(position)
    if entry is None:
        raise RetentionError(f"position {position} is not in the ledger; refusing to run")
    try:
        snapshot = canonical_bytes(dict(await snapshot_at(position)))
    except Exception as exc:  # any failure to build the snapshot means: remove nothing
        raise RetentionError(f"cannot build the snapshot at {position}: {exc}") from exc
    keys = canonical_bytes(
        {did: b64encode(raw) for did, raw in (await store.keys_before(position + 1)).items()}
    )
    digest = hashlib.sha256(snapshot).digest()
    signature = key.sign(
        anchor_signed_bytes(position, entry.entry_hash, plan.cut_time, keys, digest)
    )
    checkpoint = sign_checkpoint(key, position, entry.entry_hash, now)
    # The tree's right edge at the cut: with it (and the stored subtrees of 16+
    # leaves), every proof about entries kept, and every consistency proof between
    # checkpoints at or after the cut, still works once the entries before are gone.
    frontier = await store.frontier_at(position)
    note = tlog.signed_tree_head(key, frontier.size, frontier.root())
    stored = StoredAnchor(
        position=position,
        entry_hash=entry.entry_hash,
        cut_time=plan.cut_time,
        keys=keys,
        snapshot=snapshot,
        snapshot_digest=digest,
        signer=key.did,
        signature=signature,
        status="anchored",
    )
    try:
        await _store(store).write_anchor(stored, checkpoint, note, frontier.subtrees(), now)
    except StoreUnavailableError as exc:
        raise RetentionError(
            f"cannot write the snapshot and anchor; nothing removed: {exc}"
        ) from exc
    anchor = await latest_anchor(store, key.public)
    if anchor is None or anchor.position != position:
        raise RetentionError(f"the anchor at {position} was not found after writing it")
    return anchor


async def _prune(retention: RetentionStore, anchor: Anchor, plan: RetentionPlan) -> None:
    """3. Drop whole partitions before the cut; trim the straddling one."""
    await retention.prune(anchor.position, anchor.cut_time)
    del plan  # the anchor, not the new plan, says what to remove when resuming


async def _set_status(retention: RetentionStore, anchor: Anchor, status: str) -> Anchor:
    await retention.set_status(anchor.position, status)
    return Anchor(
        anchor.position,
        anchor.entry_hash,
        anchor.cut_time,
        anchor.keys,
        anchor.snapshot,
        anchor.snapshot_digest,
        status,
    )


async def retention_window(reader: LedgerReader) -> Window | None:
    """The latest recorded anchor's snapshot, digest-checked; None if nothing was cut.

    For projections and time travel, which trust the database as they trust its
    events; ``ledger verify`` checks the anchor's signature (``latest_anchor``)."""
    return await reader.retention_window()
