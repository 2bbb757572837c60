"""The ledger's ports: what the rest of the system may ask of a ledger.

Split by role, as the read side's ``ProjectionStore`` is: ``LedgerReader``
(entries, head, checkpoints, keys — needs no key) and ``LedgerWriter``
(append under the trust model's rules, sign as the ledger). Adapters:
``ledger.postgres`` (production) and ``ledger.memory`` (one process, for
unit tests and tools). One contract suite (``tests/test_ledger_contract.py``)
runs over both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, NamedTuple, Protocol, runtime_checkable

from ledger.chain import AppendResult, Checkpoint, Head, RecordedEvent
from ledger.events import Event
from ledger.identity import VerifyKey
from ledger.merkle import Frontier, Subtree
from ledger.signatures import Signer
from ledger.signed import SignedEvent

__all__ = [
    "Ledger",
    "LedgerReader",
    "LedgerWriter",
    "RetentionAnchors",
    "RetentionStore",
    "StoredAnchor",
    "Window",
]


@dataclass(frozen=True, slots=True)
class Window:
    """Where the stored ledger starts after a retention cut: the cut's position and
    time and the projections' snapshot there (digest-checked by the adapter)."""

    position: int
    cut_time: datetime
    snapshot: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StoredAnchor:
    """A retention anchor as stored, not yet checked (``ledger.anchor.verify_anchor``
    checks its digest and the ledger's signature)."""

    position: int
    entry_hash: bytes
    cut_time: datetime
    keys: bytes  # canonical JSON {did: base64 raw key}
    snapshot: bytes  # canonical JSON of every projection's state at ``position``
    snapshot_digest: bytes
    signer: str
    signature: bytes
    status: str  # anchored | pruned | recorded


class RetentionAnchors(Protocol):
    """The signed anchors retention leaves where it cut (``ledger.retention``); what
    verification starts from once the history before them is gone."""

    async def latest_anchor(self) -> StoredAnchor | None:
        """The newest anchor whatever its status; None if retention never ran."""


class RetentionStore(RetentionAnchors, Protocol):
    """What a retention run (``ledger.retention``) asks of the stored ledger beyond
    ``Ledger``: where to cut, what a cut removes, and the anchor it leaves."""

    async def cut_position(self, cut_time: datetime) -> int:
        """The last position recorded before ``cut_time`` (0 if none)."""

    async def count_entries(self, after: int, upto: int) -> int:
        """How many entries are stored with ``after < position <= upto``."""

    async def partitions(self, cut_time: datetime) -> tuple[list[str], list[str]]:
        """The storage units wholly before ``cut_time`` (removed whole) and the one that
        straddles it (trimmed), by name."""

    async def write_anchor(
        self,
        anchor: StoredAnchor,
        checkpoint: Checkpoint,
        note: str,
        edge: Sequence[Subtree],
        now: datetime,
    ) -> None:
        """The anchor, the signed checkpoint and tree head at its position, and the
        tree's right edge there, atomically: all or nothing."""

    async def prune(self, position: int, cut_time: datetime) -> None:
        """Remove everything stored at or before ``position`` (recorded before
        ``cut_time``), keeping the checkpoint at ``position``."""

    async def stale_partitions(self, before: date) -> list[str]:
        """The storage units of single-use ids and idempotency keys of bodies that
        occurred before ``before`` (``ledger.authority.single_use_horizon``), by name."""

    async def drop_partitions(self, names: Sequence[str]) -> None:
        """Remove these storage units whole."""

    async def set_status(self, position: int, status: str) -> None:
        """Record how far the run at this anchor got: anchored, pruned, recorded."""


class StoredBody(NamedTuple):
    """What a fold reads of an entry: its position, when it was recorded, its body."""

    position: int
    recorded_at: datetime
    body: bytes


@runtime_checkable
class BodyReader(Protocol):
    """A ledger that can read entries' bodies alone (``PostgresLedgerReader``,
    ``MemoryLedger``): a rebuild or a snapshot folds nothing else, and the other
    columns cost most of a full read."""

    async def read_bodies(self, after: int = 0, limit: int = 1000) -> list[StoredBody]:
        """``StoredBody`` of the entries with position > ``after``, at most ``limit``."""


class LedgerReader(Protocol):
    """Read access to a ledger, in position order."""

    async def head(self) -> Head: ...

    async def read(self, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        """Entries with position > ``after``, at most ``limit``."""

    async def read_agent(self, did: str, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        """Entries the agent signed or is a subject of, by position."""

    def iter_entries(self, after: int = 0, batch: int = 2000) -> AsyncIterator[RecordedEvent]:
        """Every entry after ``after``, read ``batch`` at a time."""

    async def entry_at(self, position: int) -> RecordedEvent | None: ...

    async def first_position(self) -> int | None: ...

    async def latest_checkpoint(self) -> Checkpoint | None: ...

    async def checkpoints(self, after: int = 0, limit: int = 10_000) -> list[Checkpoint]: ...

    async def current_key(self, did: str) -> VerifyKey | None: ...

    async def keys_before(self, position: int) -> dict[str, bytes]:
        """Every agent's raw key as of just before ``position``."""

    async def key_before(self, did: str, position: int) -> bytes | None:
        """One agent's raw key as of just before ``position`` (None: not registered
        then); reads that agent's key entries, not every agent's."""

    async def suspended_before(self, position: int) -> set[str]:
        """The agents suspended as of just before ``position``."""

    async def tree_root(self, size: int) -> bytes:
        """The Merkle root (RFC 9162) of the first ``size`` entries (``ledger.tlog``)."""

    async def inclusion_proof(self, position: int, tree_size: int) -> list[bytes]:
        """The audit path of the entry at ``position`` in the tree of ``tree_size``."""

    async def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """The proof that the tree of ``first`` entries is a prefix of that of ``second``."""

    async def frontier_at(self, size: int) -> Frontier:
        """The tree's right edge over the first ``size`` entries (a range proof's start)."""

    async def latest_tree_head(self) -> str | None:
        """The latest checkpoint as a C2SP signed note (None before the first)."""

    async def tree_heads(self, after: int = 0) -> dict[int, str]:
        """The stored signed tree heads (C2SP notes) after ``after``, by position."""

    async def ledger_identity(self) -> VerifyKey | None:
        """The ledger's current public key: recorded at genesis, replaced by each
        ``ledger.key_rotated`` (None before the first open)."""

    async def ledger_rotations(self) -> list[RecordedEvent]:
        """Every ``ledger.key_rotated`` entry, by position: the ledger's key history
        (``ledger.keyhistory``)."""

    async def retention_window(self) -> Window | None:
        """The latest retention cut, or None if nothing was ever cut."""

    async def schema_revision(self) -> str | None:
        """The storage schema's revision (readiness); None when it has none yet."""


class LedgerWriter(Protocol):
    """Appends under the trust model's rules (``ledger.authority``) and the ledger's own
    signature for events the server originates."""

    @property
    def ledger_did(self) -> str: ...

    @property
    def ledger_key(self) -> VerifyKey:
        """The ledger's public key."""

    @property
    def signer(self) -> Signer:
        """The ledger key as a ``Signer`` (DID, public key, ``sign``), for the ledger's own
        statements such as an audit bundle's manifest; never the private bytes."""

    async def append(
        self,
        events: Sequence[SignedEvent],
        *,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
        bootstrap: bool = False,
    ) -> AppendResult: ...

    async def append_own(
        self,
        event: Event,
        *,
        expected_version: int | None = None,
        idempotency_key: str | None = None,
    ) -> AppendResult: ...

    def sign_own(self, event: Event) -> SignedEvent: ...

    async def checkpoint(self) -> Checkpoint:
        """Sign the current head now (idempotent per position)."""

    async def close(self) -> None:
        """Finish every queued append, then release what the adapter holds."""


class Ledger(LedgerReader, LedgerWriter, Protocol):
    """Both roles: what the API and the retention job hold."""
