"""``MemoryLedger``: the ledger in one process, for unit tests and tools.

The same rules (``ledger.authority``), the same chain (``ledger.chain``), the
same signed checkpoints as ``ledger.postgres``, with none of its durability:
what it holds is gone with the process. It passes the ledger's contract
suite (``tests/test_ledger_contract.py``) beside the PostgreSQL adapter.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import date, datetime

from ledger import authority, merkle, tlog
from ledger.authority import AuthorityState
from ledger.chain import (
    GENESIS_HASH,
    AppendResult,
    Checkpoint,
    Head,
    RecordedEvent,
    entry_hash,
    envelope_bytes,
    sign_checkpoint,
)
from ledger.errors import (
    ConcurrencyError,
    IdempotencyConflictError,
    LedgerKeyMismatchError,
    NotPermittedError,
    ProofError,
    SignatureError,
)
from ledger.events import (
    AgentKeyRotated,
    AgentRegistered,
    AgentReinstated,
    AgentSuspended,
    Event,
    LedgerKeyRotated,
    decode_body,
    subject_agents,
)
from ledger.identity import SigningKey, VerifyKey
from ledger.merkle import Frontier
from ledger.ports import StoredBody, Window
from ledger.signatures import Signer
from ledger.signed import SignedEvent, append_stream
from ledger.timefmt import utc_now

__all__ = ["MemoryLedger"]

_EPOCH = datetime.fromisoformat("1970-01-01T00:00:00+00:00")


class _Overlay:
    """The ledger's write state plus one append's own changes (kept only if every
    event of the append passes)."""

    def __init__(self, state: AuthorityState) -> None:
        self.state = state
        self.ledger_did = state.ledger_did
        self.scratch = AuthorityState(state.ledger_did)
        self.suspended_changes: dict[str, bool] = {}

    def key(self, did: str) -> bytes | None:
        return self.scratch.keys.get(did) or self.state.key(did)

    def suspended(self, did: str) -> bool:
        return self.suspended_changes.get(did, self.state.suspended(did))

    def has_agents(self) -> bool:
        return bool(self.scratch.keys) or self.state.has_agents()

    def seen(self, actor: str, event_id: str, day: date) -> bool:
        return self.scratch.seen(actor, event_id, day) or self.state.seen(actor, event_id, day)

    def advance(self, event: Event) -> None:
        day = authority.single_use_day(event)
        if event.event_id is not None and day is not None:
            self.scratch.remember(event.actor, event.event_id, day)
        if isinstance(event, AgentRegistered | AgentKeyRotated):
            self.scratch.keys[event.did] = VerifyKey.from_recorded_pem(event.public_key).raw
        elif isinstance(event, AgentSuspended | AgentReinstated):
            self.suspended_changes[event.did] = isinstance(event, AgentSuspended)
        elif isinstance(event, LedgerKeyRotated):
            self.ledger_did = event.did  # the old key signs nothing after this

    def commit(self) -> None:
        self.state.ledger_did = self.ledger_did
        self.state.keys.update(self.scratch.keys)
        self.state.merge_ids(self.scratch)
        for did, suspended in self.suspended_changes.items():
            if suspended:
                self.state.suspended_dids.add(did)
            else:
                self.state.suspended_dids.discard(did)


class MemoryLedger:
    """A ``ledger.ports.Ledger`` in memory. Appends are serialized by one lock."""

    def __init__(
        self,
        ledger_key: SigningKey,
        *,
        clock: Callable[[], datetime] = utc_now,
        checkpoint_every: int = 1000,
    ) -> None:
        self._key = ledger_key
        self._clock = clock
        self._checkpoint_every = checkpoint_every
        self._entries: list[RecordedEvent] = []
        self._state = AuthorityState(ledger_key.did)
        self._identity = ledger_key.public  # the ledger's key: genesis, then each rotation's
        self._versions: dict[str, int] = {}
        # (signer, key, the first event's single_use_day): a retry resends the same events
        self._idempotency: dict[tuple[str, str, date | None], tuple[bytes, AppendResult]] = {}
        self._checkpoints: dict[int, Checkpoint] = {}
        self._tree_heads: dict[int, str] = {}
        self._frontier = Frontier()
        self._nodes: dict[tuple[int, int], bytes] = {}  # every complete subtree
        self._lock = asyncio.Lock()

    # -- writer ---------------------------------------------------------------

    @property
    def ledger_did(self) -> str:
        return self._key.did

    @property
    def signer(self) -> Signer:
        return self._key

    @property
    def ledger_key(self) -> VerifyKey:
        return self._key.public

    def use_key(self, key: SigningKey) -> None:
        """Hold ``key`` from now on: what restarting a PostgreSQL writer with the key a
        rotation installed is. Any other key is refused (``LedgerKeyMismatchError``)."""
        if key.did != self._state.ledger_did:
            raise LedgerKeyMismatchError(
                f"this ledger's key is {self._state.ledger_did}, not {key.did}"
            )
        self._key = key

    def _check_key(self) -> None:
        """A ledger whose key was rotated away from ours: refuse, never fork."""
        if self._state.ledger_did != self._key.did:
            raise LedgerKeyMismatchError(
                f"the ledger's key was rotated to {self._state.ledger_did}; this process holds "
                f"the retired key {self._key.did}: restart it with the new key "
                "(AGENTMESH_AGENT_PRIVATE_KEY)"
            )

    async def append(
        self,
        events: Sequence[SignedEvent],
        *,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
        bootstrap: bool = False,
    ) -> AppendResult:
        """Append events of one stream atomically, by the same rules as PostgreSQL."""
        stream = append_stream(events, idempotency_key)
        digest = hashlib.sha256(b"\n".join(e.body for e in events)).digest()
        async with self._lock:
            self._check_key()
            scope = (
                events[0].actor,
                idempotency_key or "",
                authority.single_use_day(events[0].event),
            )
            if idempotency_key is not None and scope in self._idempotency:
                stored, result = self._idempotency[scope]
                if stored != digest:
                    raise IdempotencyConflictError(
                        f"idempotency key {idempotency_key!r} was used for different events"
                    )
                return result
            result = self._append(events, stream, expected_version, bootstrap)
            if idempotency_key is not None:
                duplicate = AppendResult(
                    result.positions, result.stream_id, result.stream_version, duplicate=True
                )
                self._idempotency[scope] = (digest, duplicate)
            return result

    def _append(
        self,
        events: Sequence[SignedEvent],
        stream: str,
        expected_version: int | None,
        bootstrap: bool,
    ) -> AppendResult:
        version = self._versions.get(stream, 0)
        if expected_version is not None and expected_version != version:
            raise ConcurrencyError(stream, expected_version, version)
        if bootstrap and self._state.has_agents():
            raise NotPermittedError(
                "the ledger already holds a registration: registering needs the admin token"
            )
        head = self._head()
        now = max(self._clock(), head.recorded_at)
        overlay = _Overlay(self._state)
        for signed in events:
            # Signatures first, as the PostgreSQL adapter verifies before its lock.
            if not self._signer_key(signed, overlay).is_valid(signed.signature, signed.body):
                raise SignatureError(f"{signed.type}: signature by {signed.actor} does not verify")
            authority.check(signed.event, signed.body, now, overlay)
            overlay.advance(signed.event)
        overlay.commit()
        for signed in events:
            if isinstance(signed.event, LedgerKeyRotated):
                self._identity = VerifyKey.from_recorded_pem(signed.event.public_key)
        positions = [
            self._record(signed, stream, version + index, now)
            for index, signed in enumerate(events, start=1)
        ]
        leaves = [tlog.entry_leaf(e.entry_hash) for e in self._entries[-len(events) :]]
        self._frontier, completed = self._frontier.extend_with_subtrees(leaves)
        self._nodes.update({(n.level, n.index): n.hash for n in completed})
        self._versions[stream] = version + len(events)
        rotated = self._state.ledger_did != self._key.did  # the new key signs the next one
        if (
            not rotated
            and self._head().position - max(self._checkpoints, default=0) >= self._checkpoint_every
        ):
            self._sign_head()
        return AppendResult(tuple(positions), stream, version + len(events))

    def _signer_key(self, signed: SignedEvent, view: _Overlay) -> VerifyKey:
        event = signed.event
        if signed.actor == self.ledger_did:
            return self._key.public
        if isinstance(event, AgentRegistered) and event.actor == event.did:
            return VerifyKey.from_pem(event.public_key)
        raw = view.key(signed.actor)
        if raw is None:
            raise SignatureError(f"{signed.type}: unknown signer {signed.actor}")
        return VerifyKey.from_raw(raw)

    def _record(self, signed: SignedEvent, stream: str, version: int, now: datetime) -> int:
        head = self._head()
        position = head.position + 1
        envelope = envelope_bytes(
            position=position,
            recorded_at=now,
            stream_id=stream,
            stream_version=version,
            body=signed.body,
            signature=signed.signature,
        )
        subjects = set(subject_agents(signed.event))
        if signed.actor != self.ledger_did:
            subjects.add(signed.actor)
        self._entries.append(
            RecordedEvent(
                position=position,
                recorded_at=now,
                stream_id=stream,
                stream_version=version,
                body=signed.body,
                signature=signed.signature,
                prev_hash=head.entry_hash,
                entry_hash=entry_hash(head.entry_hash, envelope),
                event_type=signed.type,
                actor=signed.actor,
                subjects=tuple(sorted(subjects)),
            )
        )
        return position

    async def append_own(
        self,
        event: Event,
        *,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
    ) -> AppendResult:
        return await self.append(
            [self.sign_own(event)],
            expected_version=expected_version,
            idempotency_key=idempotency_key,
        )

    def sign_own(self, event: Event) -> SignedEvent:
        return SignedEvent.create(event, self._key)

    async def checkpoint(self) -> Checkpoint:
        async with self._lock:
            head = self._head()
            existing = self._checkpoints.get(head.position)
            if existing is not None:
                return existing
            self._check_key()
            return self._sign_head()

    def _sign_head(self) -> Checkpoint:
        head = self._head()
        moment = max(self._clock(), head.recorded_at)
        checkpoint = sign_checkpoint(self._key, head.position, head.entry_hash, moment)
        self._checkpoints[head.position] = checkpoint
        self._tree_heads[head.position] = tlog.signed_tree_head(
            self._key, self._frontier.size, self._frontier.root()
        )
        return checkpoint

    async def close(self) -> None:
        async with self._lock:
            return

    # -- reader ---------------------------------------------------------------

    def _head(self) -> Head:
        if not self._entries:
            return Head(0, GENESIS_HASH, _EPOCH)
        last = self._entries[-1]
        return Head(last.position, last.entry_hash, last.recorded_at)

    async def head(self) -> Head:
        return self._head()

    async def read_bodies(self, after: int = 0, limit: int = 1000) -> list[StoredBody]:
        return [
            StoredBody(e.position, e.recorded_at, e.body) for e in await self.read(after, limit)
        ]

    async def read(self, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        return self._entries[max(after, 0) : max(after, 0) + limit]

    async def read_agent(self, did: str, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        found = [e for e in self._entries[max(after, 0) :] if did in e.subjects]
        return found[:limit]

    async def iter_entries(self, after: int = 0, batch: int = 2000) -> AsyncIterator[RecordedEvent]:
        while chunk := await self.read(after, batch):
            for entry in chunk:
                yield entry
            after = chunk[-1].position

    async def entry_at(self, position: int) -> RecordedEvent | None:
        return self._entries[position - 1] if 1 <= position <= len(self._entries) else None

    async def first_position(self) -> int | None:
        return 1 if self._entries else None

    async def latest_checkpoint(self) -> Checkpoint | None:
        return self._checkpoints[max(self._checkpoints)] if self._checkpoints else None

    async def checkpoints(self, after: int = 0, limit: int = 10_000) -> list[Checkpoint]:
        return [self._checkpoints[p] for p in sorted(self._checkpoints) if p > after][:limit]

    async def current_key(self, did: str) -> VerifyKey | None:
        raw = self._state.key(did)
        return None if raw is None else VerifyKey.from_raw(raw)

    async def keys_before(self, position: int) -> dict[str, bytes]:
        return self._fold_before(position).keys

    async def key_before(self, did: str, position: int) -> bytes | None:
        return self._fold_before(position).keys.get(did)

    async def suspended_before(self, position: int) -> set[str]:
        return self._fold_before(position).suspended_dids

    def _fold_before(self, position: int) -> AuthorityState:
        state = AuthorityState(self.ledger_did)
        for entry in self._entries[: max(position - 1, 0)]:
            state.advance(decode_body(entry.body))
        return state

    async def tree_root(self, size: int) -> bytes:
        self._check_tree_size(size)
        return merkle.root_at(size, self._hash_at)

    async def inclusion_proof(self, position: int, tree_size: int) -> list[bytes]:
        self._check_tree_size(tree_size)
        if not 1 <= position <= tree_size:
            raise ProofError(f"position {position} is not in a tree of {tree_size} entries")
        return merkle.inclusion_proof(position - 1, tree_size, self._hash_at)

    async def consistency_proof(self, first: int, second: int) -> list[bytes]:
        self._check_tree_size(second)
        if not 1 <= first <= second:
            raise ProofError(
                f"no consistency proof from size {first} to {second}: "
                "the sizes must satisfy 1 <= first <= second"
            )
        return merkle.consistency_proof(first, second, self._hash_at)

    async def frontier_at(self, size: int) -> Frontier:
        self._check_tree_size(size)
        return merkle.frontier_at(size, self._hash_at)

    async def tree_nodes(self, wanted: set[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """The complete subtrees ``wanted`` ((level, index)) that exist."""
        return {key: self._nodes[key] for key in wanted if key in self._nodes}

    async def latest_tree_head(self) -> str | None:
        return self._tree_heads[max(self._tree_heads)] if self._tree_heads else None

    async def tree_heads(self, after: int = 0) -> dict[int, str]:
        return {p: note for p, note in sorted(self._tree_heads.items()) if p > after}

    async def ledger_identity(self) -> VerifyKey | None:
        return self._identity

    async def ledger_rotations(self) -> list[RecordedEvent]:
        return [e for e in self._entries if e.event_type == "ledger.key_rotated"]

    def _check_tree_size(self, size: int) -> None:
        if not 0 <= size <= self._frontier.size:
            raise ProofError(f"tree size {size} is not in 0..{self._frontier.size} (the head)")

    def _hash_at(self, level: int, index: int) -> bytes:
        return self._nodes[(level, index)]

    async def retention_window(self) -> Window | None:
        return None  # retention runs against PostgreSQL only

    async def schema_revision(self) -> str | None:
        return None
