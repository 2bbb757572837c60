"""Verification of the ledger: chain, every signature, every checkpoint.

The chain is checked in order in this process (SHA-256 is cheap); Ed25519
signature checks, which dominate, are sent in chunks to a process pool so they
use every core. Whatever is found, the error names the *first* bad position.

Which key verifies an entry is itself a function of the ledger: the ledger's
key for ledger-signed events, the key inside a self-signed registration, and
otherwise the actor's key as of that position (registrations and rotations
are folded in order, so a rotation is checked against the key it replaces).

Every entry is also re-checked against the rules append enforced
(``ledger.authority``): who may sign it, single use of its event id,
fresh and real timestamps, the new key's proof in a rotation, no writes by a
suspended agent. Verifying from a later position (or after a retention cut)
starts from the keys and suspensions known there; event ids recorded before
the start are unknown, so replays are caught within the verified range.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterable, Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime

from ledger import authority, keyhistory, tlog
from ledger.anchor import Anchor, verify_anchor
from ledger.authority import AuthorityState
from ledger.chain import GENESIS_HASH, Checkpoint, Entry, check_link, verify_checkpoint
from ledger.errors import EventValidationError, LedgerError, SignatureError, VerificationError
from ledger.events import (
    AgentRegistered,
    AnyEvent,
    LedgerKeyRotated,
    decode_body,
    event_type,
    subject_agents,
)
from ledger.identity import VerifyKey
from ledger.keyhistory import LedgerKeys
from ledger.merkle import Frontier
from ledger.note import Checkpoint as NoteCheckpoint
from ledger.note import open_checkpoint
from ledger.ports import LedgerReader, RetentionAnchors

# Re-exported: callers import these three from here too.
from ledger.signatures import SignatureJob as SignatureJob
from ledger.signatures import make_executor as make_executor
from ledger.signatures import verify_signature_chunk as verify_signature_chunk
from ledger.timefmt import format_time

CHUNK = 2000
Progress = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class VerifyReport:
    first_position: int
    last_position: int
    entries: int
    signatures: int
    checkpoints: int
    head_hash: bytes

    def summary(self) -> str:
        if self.entries == 0:
            return "ledger OK: no entries to verify"
        return (
            f"ledger OK: positions {self.first_position}..{self.last_position} "
            f"({self.entries} entries, {self.signatures} signatures, "
            f"{self.checkpoints} checkpoints), head {self.head_hash.hex()}"
        )


class KeyRing:
    """The signing key of every agent, and the write-side state the authority
    rules read, as of the position being verified."""

    def __init__(
        self,
        ledger_key: VerifyKey,
        keys: dict[str, bytes] | None = None,
        suspended: set[str] | None = None,
        *,
        complete: bool | None = None,
    ) -> None:
        self.ledger_key = ledger_key
        self.authority = AuthorityState(
            ledger_key.did,
            keys=dict(keys or {}),
            suspended_dids=set(suspended or ()),
            complete=not keys if complete is None else complete,
        )
        self.keys = self.authority.keys
        self.recorded_at: datetime | None = None  # the entry before's: time never runs back

    def check(self, entry: Entry, event: AnyEvent) -> None:
        """The authority rules, as append applied them at this entry's ``recorded_at``
        (which is never earlier than the entry before's: the store's clock never runs
        back, and the single-use days, retention and partitions rely on it)."""
        before, now = self.recorded_at, entry.recorded_at
        if before is not None and now < before:
            raise VerificationError(
                entry.position,
                f"recorded_at {format_time(now)} is before the previous entry's "
                f"{format_time(before)}: the ledger's clock never runs back",
            )
        if before is None or now.date() != before.date():
            self.authority.forget_stale(now)
        self.recorded_at = now
        try:
            authority.check(event, entry.body, entry.recorded_at, self.authority)
        except LedgerError as exc:
            raise VerificationError(entry.position, f"not permitted: {exc}") from exc

    def key_for(self, position: int, event: AnyEvent) -> bytes:
        if event.actor == self.ledger_key.did:
            return self.ledger_key.raw
        if isinstance(event, AgentRegistered) and event.actor == event.did:
            return _raw_key(position, event.public_key)
        raw = self.keys.get(event.actor)
        if raw is None:
            raise VerificationError(position, f"signed by {event.actor}, which is not registered")
        return raw

    def advance(self, position: int, event: AnyEvent) -> None:
        # A malformed or weak key was refused at this position by ``check``, just before.
        if isinstance(event, LedgerKeyRotated):  # from here on, the new key is the ledger's
            self.ledger_key = VerifyKey.from_raw(_raw_key(position, event.public_key))
        self.authority.advance(event)


def _raw_key(position: int, pem: str) -> bytes:
    # The entry's key was admitted (group-checked) by ``check`` just before, through
    # ``authority.check``'s ``VerifyKey.from_pem``: parsing it again is enough.
    try:
        return VerifyKey.from_recorded_pem(pem).raw
    except SignatureError as exc:
        raise VerificationError(position, f"invalid public key in event: {exc}") from exc


@dataclass
class _Pending:
    first: int
    last: int
    future: asyncio.Future[list[int]]


class LedgerVerifier:
    """Checks entries fed in position order; call ``finish()`` for the report."""

    def __init__(
        self,
        ring: KeyRing,
        *,
        start_position: int,
        start_hash: bytes,
        checkpoints: Iterable[Checkpoint],
        executor: Executor | None = None,
        column_check: bool = True,
        tree: TreeCheck | None = None,
    ) -> None:
        self.tree = tree
        self.ring = ring
        self.expected = start_position
        self.prev = start_hash
        self.first = start_position
        self.checkpoints = {c.position: c for c in checkpoints}
        self.checkpoints_seen = 0
        self.executor = executor
        self.column_check = column_check
        self.jobs: list[SignatureJob] = []
        self.pending: list[_Pending] = []
        self.signatures = 0

    async def feed(
        self,
        entry: Entry,
        event_type_col: str | None = None,
        actor_col: str | None = None,
        subjects_col: tuple[str, ...] | None = None,
    ) -> None:
        try:
            check_link(entry, self.expected, self.prev)
            event = self._decode(entry)
            if self.column_check:
                _check_columns(entry.position, event, event_type_col, actor_col)
                _check_subjects(entry.position, event, subjects_col, self.ring.ledger_key.did)
            self.ring.check(entry, event)
            self.jobs.append(
                (
                    entry.position,
                    self.ring.key_for(entry.position, event),
                    entry.signature,
                    entry.body,
                )
            )
            self.ring.advance(entry.position, event)
            # Checkpoints and tree heads of this size: by the key in force here.
            if self.tree is not None:
                self.tree.add(entry, self.ring.ledger_key)
            self._check_checkpoint(entry)
        except VerificationError as exc:
            await self._fail_at(exc)
        self.expected = entry.position + 1
        self.prev = entry.entry_hash
        if len(self.jobs) >= CHUNK:
            await self._submit()

    @staticmethod
    def _decode(entry: Entry) -> AnyEvent:
        try:
            return decode_body(entry.body)
        except EventValidationError as exc:
            raise VerificationError(entry.position, f"body is not a valid event: {exc}") from exc

    def _check_checkpoint(self, entry: Entry) -> None:
        checkpoint = self.checkpoints.get(entry.position)
        if checkpoint is None:
            return
        verify_checkpoint(checkpoint, self.ring.ledger_key)
        if checkpoint.head_hash != entry.entry_hash.hex():
            raise VerificationError(
                entry.position, "entry_hash differs from the signed checkpoint at this position"
            )
        self.checkpoints_seen += 1

    async def _submit(self) -> None:
        jobs, self.jobs = self.jobs, []
        if not jobs:
            return
        self.signatures += len(jobs)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.executor, verify_signature_chunk, jobs)
        self.pending.append(_Pending(jobs[0][0], jobs[-1][0], future))
        # Bound memory: never more than a few chunks in flight per worker.
        while len(self.pending) > 2 * (os.cpu_count() or 1):
            await self._collect(self.pending.pop(0))

    async def _collect(self, pending: _Pending) -> None:
        bad = await pending.future
        if bad:
            raise VerificationError(min(bad), "signature does not verify")

    async def _fail_at(self, error: VerificationError) -> None:
        """Report the earliest problem: a pending signature failure may precede it."""
        self.jobs = [j for j in self.jobs if j[0] < error.position]
        await self._submit()
        earliest: VerificationError = error
        for pending in self.pending:
            bad = await pending.future
            if bad and min(bad) < earliest.position:
                earliest = VerificationError(min(bad), "signature does not verify")
        self.pending.clear()
        raise earliest

    async def finish(
        self, head_position: int | None = None, head_hash: bytes | None = None
    ) -> VerifyReport:
        await self._submit()
        for pending in self.pending:
            await self._collect(pending)
        self.pending.clear()
        last = self.expected - 1
        if self.tree is not None:
            self.tree.finish(last)
        beyond = [p for p in self.checkpoints if p > last]
        if beyond:
            raise VerificationError(
                min(beyond),
                f"a signed checkpoint covers position {min(beyond)}, "
                f"but the ledger ends at {last} (entries were removed from the tail)",
            )
        if head_position is not None and head_position != last:
            raise VerificationError(
                min(head_position, last) + 1,
                f"the head says position {head_position}, the entries end at {last}",
            )
        if head_hash is not None and head_hash != self.prev:
            raise VerificationError(last, "the head hash differs from the last entry's hash")
        return VerifyReport(
            first_position=self.first,
            last_position=last,
            entries=last - self.first + 1,
            signatures=self.signatures,
            checkpoints=self.checkpoints_seen,
            head_hash=self.prev,
        )


class TreeCheck:
    """The Merkle tree recomputed from the entries, held against every signed tree
    head (C2SP note) the ledger stored and against a checkpoint seen before.

    ``trusted`` is a checkpoint kept *outside* the database (a witness's, or one
    saved with ``curl /v1/ledger/checkpoint``): a writer without the ledger key
    can rewrite the tables, chain and all, but cannot make the recomputed root at
    that size match it again, nor hide that entries were removed below it."""

    def __init__(
        self,
        frontier: Frontier,
        notes: dict[int, str],
        trusted: NoteCheckpoint | None = None,
    ) -> None:
        self.frontier = frontier
        self.notes = notes
        self.trusted = trusted
        self.heads_checked = 0

    def add(self, entry: Entry, ledger_key: VerifyKey) -> None:
        """Extend the tree by ``entry``; a tree head of this size must be signed by
        ``ledger_key``, the key in force at it."""
        self.frontier = self.frontier.append(tlog.entry_leaf(entry.entry_hash))
        position = entry.position
        note = self.notes.get(position)
        if note is not None:
            try:
                head, _ = open_checkpoint(note, [tlog.verifier(ledger_key)])
            except LedgerError as exc:
                raise VerificationError(position, f"signed tree head: {exc}") from exc
            self._compare(position, head, "the signed tree head stored at this position")
            self.heads_checked += 1
        if self.trusted is not None and self.trusted.size == position:
            self._compare(position, self.trusted, "the trusted checkpoint")

    def _compare(self, position: int, head: NoteCheckpoint, what: str) -> None:
        if head.size != position or head.root_hash != self.frontier.root():
            raise VerificationError(
                position,
                f"the ledger's Merkle root at size {position} differs from {what}: "
                "history was rewritten",
            )

    def finish(self, last: int) -> None:
        if self.trusted is not None and self.trusted.size > last:
            raise VerificationError(
                last + 1,
                f"the ledger ends at position {last}, but a checkpoint seen before covers "
                f"{self.trusted.size} entries: entries were removed from the tail",
            )


def trusted_checkpoint(note: str, ledger_key: VerifyKey | LedgerKeys) -> NoteCheckpoint:
    """A checkpoint kept outside the database: its C2SP note, signed by the ledger key
    in force at its size (any key of the history, held to its place in it)."""
    keys = ledger_key if isinstance(ledger_key, LedgerKeys) else LedgerKeys(ledger_key)
    for key in keys.all():
        try:
            checkpoint, _ = open_checkpoint(note, [tlog.verifier(key)])
        except LedgerError:
            continue
        if keys.at(checkpoint.size).raw != key.raw:
            raise VerificationError(
                checkpoint.size,
                f"the trusted checkpoint is signed by {key.did}, not the ledger key in force "
                f"at size {checkpoint.size} ({keys.at(checkpoint.size).did})",
            )
        return checkpoint
    try:
        open_checkpoint(note, [tlog.verifier(keys.current)])
    except LedgerError as exc:
        raise VerificationError(0, f"the trusted checkpoint does not verify: {exc}") from exc
    raise VerificationError(0, "the trusted checkpoint does not verify")


def _check_subjects(
    position: int, event: AnyEvent, subjects_col: tuple[str, ...] | None, ledger_did: str
) -> None:
    """``subjects`` drives /events and ?at=: it must be what the body says."""
    if subjects_col is None:
        return
    expected = set(subject_agents(event))
    if event.actor != ledger_did:
        expected.add(event.actor)
    if sorted(subjects_col) != sorted(expected):
        raise VerificationError(position, "subjects column differs from the body")


def _check_columns(
    position: int, event: AnyEvent, type_col: str | None, actor_col: str | None
) -> None:
    """The indexed columns are derived from the body; a mismatch means tampering."""
    if type_col is not None and type_col != event_type(event):
        raise VerificationError(position, f"event_type column {type_col!r} differs from the body")
    if actor_col is not None and actor_col != event.actor:
        raise VerificationError(position, f"actor column {actor_col!r} differs from the body")


async def verify_entries(
    entries: AsyncIterable[Entry],
    ring: KeyRing,
    *,
    start_position: int,
    start_hash: bytes,
    checkpoints: Iterable[Checkpoint],
    executor: Executor | None = None,
    progress: Progress | None = None,
    head: tuple[int, bytes] | None = None,
) -> VerifyReport:
    """Verify ``entries`` (in position order) from ``start_position``.

    ``head`` (position, hash), when known from a trusted source, also catches
    entries dropped from the tail, which no chain can reveal by itself.
    """
    verifier = LedgerVerifier(
        ring,
        start_position=start_position,
        start_hash=start_hash,
        checkpoints=checkpoints,
        executor=executor,
        column_check=False,
    )
    async for entry in entries:
        await verifier.feed(entry)
        if progress is not None and entry.position % CHUNK == 0:
            progress(entry.position)
    if head is None:
        return await verifier.finish()
    return await verifier.finish(head[0], head[1])


async def _retention_anchor(
    reader: LedgerReader, anchors: RetentionAnchors | None, keys: LedgerKeys
) -> Anchor | None:
    """The latest retention anchor, verified; None if retention never cut. Without
    ``anchors`` a ledger retention has cut cannot be verified: that is said."""
    if anchors is None:
        window = await reader.retention_window()
        if window is not None:
            raise VerificationError(
                window.position,
                f"retention cut the ledger at position {window.position}: verifying it "
                "needs its retention anchors",
            )
        return None
    stored = await anchors.latest_anchor()
    if stored is None:
        return None
    # Signed by the key the ledger held when retention ran: one of its keys.
    for key in reversed(keys.all()[1:]):
        try:
            return verify_anchor(stored, key)
        except VerificationError:
            continue
    return verify_anchor(stored, keys.genesis)


async def verify_ledger(
    reader: LedgerReader,
    ledger_key: VerifyKey,
    *,
    anchors: RetentionAnchors | None = None,
    from_position: int = 1,
    executor: Executor | None = None,
    progress: Progress | None = None,
    trusted: str | None = None,
) -> VerifyReport:
    """Verify the stored ledger from ``from_position`` to the head.

    From position 1 the chain starts at the genesis hash. From a later
    position it starts at the stored hash of the entry before it, which a
    signed checkpoint at that position confirms when there is one; agent keys
    are folded from the registrations and rotations before it. The Merkle tree
    is recomputed along the way and held against every stored signed tree head
    and against ``trusted``, the C2SP note of a checkpoint seen before.

    After a retention cut, verification starts from the latest anchor, read from
    ``anchors`` (``ledger.postgres.retention.PostgresRetentionStore``) and checked
    against ``ledger_key``; a cut ledger given without them is refused.
    """
    if from_position < 1:
        raise VerificationError(from_position, "positions start at 1")
    keys = await ledger_keys(reader, ledger_key)
    pinned = None if trusted is None else trusted_checkpoint(trusted, keys)
    head = await reader.head()
    start_hash = GENESIS_HASH
    checkpoints = await reader.checkpoints(after=max(from_position - 2, 0))
    anchor = await _retention_anchor(reader, anchors, keys)
    if anchor is not None and from_position <= anchor.position:
        if from_position > 1:
            raise VerificationError(
                from_position,
                f"before the retention window: the ledger starts after position {anchor.position}",
            )
        from_position = anchor.position + 1  # verify from the anchor
        checkpoints = await reader.checkpoints(after=anchor.position - 1)
    if from_position > 1:
        before = await reader.entry_at(from_position - 1)
        if before is not None:
            start_hash = before.entry_hash
        elif anchor is not None and anchor.position == from_position - 1:
            start_hash = anchor.entry_hash
        else:
            head = await reader.head()
            if from_position > head.position:  # name the position asked for, not the one before
                raise VerificationError(
                    from_position, f"past the head: the ledger ends at position {head.position}"
                )
            raise VerificationError(from_position - 1, "no entry to start verifying from")
        start = next((c for c in checkpoints if c.position == from_position - 1), None)
        if start is not None:
            verify_checkpoint(start, keys.at(start.position))
            if start.head_hash != start_hash.hex():
                raise VerificationError(start.position, "entry_hash differs from its checkpoint")
        elif anchor is not None and anchor.position == from_position - 1:
            raise VerificationError(anchor.position, "the retention anchor has no checkpoint")
    ring = KeyRing(
        keys.at(from_position - 1),
        await reader.keys_before(from_position),
        await reader.suspended_before(from_position),
        complete=from_position == 1,
    )
    if pinned is not None and 0 < pinned.size < from_position:
        raise VerificationError(
            pinned.size, "the trusted checkpoint is before the range verified: verify from 1"
        )
    tree = TreeCheck(
        await _frontier_before(reader, from_position),
        await reader.tree_heads(after=from_position - 1),
        pinned,
    )
    verifier = LedgerVerifier(
        ring,
        start_position=from_position,
        start_hash=start_hash,
        checkpoints=[c for c in checkpoints if c.position >= from_position],
        executor=executor,
        tree=tree,
    )
    async for record in reader.iter_entries(after=from_position - 1, batch=CHUNK):
        await verifier.feed(record, record.event_type, record.actor, record.subjects)
        if progress is not None and record.position % CHUNK == 0:
            progress(record.position)
    return await verifier.finish(head.position, head.entry_hash)


async def ledger_keys(reader: LedgerReader, pinned: VerifyKey) -> LedgerKeys:
    """The ledger's key history (its rotation entries, each checked, linked and ending
    at the recorded key), which must hold ``pinned``: a key got out of band, the
    genesis key or any later one (the rotations link them all)."""
    recorded = await reader.ledger_identity()
    rotations = await reader.ledger_rotations()
    if not rotations:
        if recorded is not None and recorded.raw != pinned.raw:
            raise VerificationError(
                0,
                f"ledger key mismatch: the ledger recorded {recorded.did} at genesis, "
                f"the key given is {pinned.did}",
            )
        return LedgerKeys(pinned)
    keys = keyhistory.history(rotations, recorded)
    keys.require(pinned)
    return keys


async def _frontier_before(reader: LedgerReader, position: int) -> Frontier:
    """The tree's right edge just before ``position`` (from its stored subtrees)."""
    if position == 1:
        return Frontier()
    try:
        return await reader.frontier_at(position - 1)
    except LedgerError as exc:
        raise VerificationError(position - 1, f"the Merkle tree there: {exc}") from exc
