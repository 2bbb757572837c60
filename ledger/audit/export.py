"""Export: a time range of a ledger as an audit bundle, checked before it is signed.

``export_bundle`` (or ``prepare_export`` then ``BundleExport.chunks()``)
streams the range in batches and recomputes every link of it (and checks
every stored checkpoint inside it) before the ledger key signs anything: the
covering checkpoint, when none is stored at the last position (it is then
stored; an earlier one wins), and the manifest.

The exporter reads the ledger through ``AuditSource`` (``ledger/postgres/audit.py``
implements it over PostgreSQL) and signs through ``ledger.signatures.Signer``;
it imports no driver.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

import msgspec

from ledger import keyhistory, tlog
from ledger.audit.bundle import (
    FORMAT,
    FORMAT_VERSION,
    AnchorLine,
    CheckpointLine,
    EventLine,
    Flavour,
    Header,
    Inclusion,
    KeyHistory,
    KeyLine,
    Manifest,
    StubLine,
    TreeLine,
    check_hash,
    entry_line,
    is_ledger_time,
    parse_flavour,
)
from ledger.audit.cloudevents import LineEncoder
from ledger.audit.proofs import Nodes, RootMemo, batch_proofs
from ledger.chain import (
    GENESIS_HASH,
    Checkpoint,
    RecordedEvent,
    entry_hash,
    sign_checkpoint,
    verify_checkpoint,
)
from ledger.errors import LedgerError, ProofError, VerificationError
from ledger.events import AgentKeyRotated, AgentRegistered, LedgerKeyRotated, decode_body
from ledger.identity import b64encode, is_did
from ledger.merkle import Frontier
from ledger.signatures import Signer
from ledger.timefmt import format_time, utc_now

_READ_BATCH = 2000


class AuditSource(Protocol):
    """What the exporter reads from a ledger, and the one thing it writes: the
    checkpoint that covers the end of the range when none is stored there."""

    async def entry_range(self, start: datetime, end: datetime) -> tuple[int, int] | None:
        """The first and last position with ``start <= recorded_at < end``; None if none."""

    async def entry_signers(
        self,
        first: int,
        last: int,
        start: datetime,
        end: datetime,
        *,
        exclude: str,
        agent: str | None,
    ) -> list[str]:
        """The distinct actors of the entries ``first..last`` inside the time range,
        except ``exclude`` (the ledger); with ``agent``, only of the entries that
        agent signed or is a subject of."""

    async def ledger_rotations(self) -> list[RecordedEvent]:
        """Every ``ledger.key_rotated`` entry (the ledger's key history), by position."""
        ...

    async def key_entries(self, dids: Sequence[str], last: int) -> list[RecordedEvent]:
        """The registrations and key rotations about any of ``dids`` up to position
        ``last``, in position order."""

    async def retention_anchor(self) -> AnchorLine | None:
        """The latest retention anchor as a bundle line; None if retention never cut."""

    async def read(self, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        """Entries with position > ``after``, at most ``limit``, in position order."""

    async def entry_at(self, position: int) -> RecordedEvent | None:
        """The entry at ``position``; None if there is none (or retention removed it)."""

    async def checkpoints(self, after: int = 0, limit: int = 10_000) -> list[Checkpoint]:
        """Stored checkpoints with position > ``after``, at most ``limit``, in order."""

    async def tree_edge(self, size: int) -> Frontier:
        """The Merkle tree's right edge over the first ``size`` entries."""

    async def tree_nodes(self, wanted: set[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """The hashes of the complete subtrees ``wanted`` ((level, index), as in
        ``ledger.merkle``) of the stored tree; one missing from the answer is not
        available."""

    async def store_checkpoint(self, checkpoint: Checkpoint) -> Checkpoint | None:
        """Store ``checkpoint`` if the stored entry at its position has its head hash and
        no checkpoint is stored there yet; return the one stored there now, or None
        when the stored entry differs (nothing is stored then)."""


class Writer(Protocol):
    def write(self, text: str, /) -> object: ...


ExportProgress = Callable[[int, int], None]  # (entries written, entries in the range)
Clock = Callable[[], datetime]


@runtime_checkable
class Exportable(Protocol):
    """A ledger that names its audit source (``PostgresLedgerReader.audit_source()``)."""

    def audit_source(self) -> AuditSource: ...


async def export_bundle(
    source: AuditSource | Exportable,
    signer: Signer,
    out: Writer,
    *,
    start: datetime,
    end: datetime,
    agent: str | None = None,
    fmt: Flavour = "jsonl",
    progress: ExportProgress | None = None,
    clock: Clock = utc_now,
) -> Manifest:
    """Write the bundle of ``start <= recorded_at < end`` to ``out``; return its manifest.

    Streamed in batches. Every link of the range is recomputed and checked
    (and every stored checkpoint in it) before ``signer`` (the ledger key)
    signs anything; a covering checkpoint is signed and stored when none exists
    at the last position. Raises ValueError for bad arguments,
    VerificationError when the stored ledger does not verify,
    StoreUnavailableError when the source fails.
    """
    export = await prepare_export(
        source, signer, start=start, end=end, agent=agent, fmt=fmt, clock=clock
    )
    async for text in export.chunks(progress):
        out.write(text)
    assert export.manifest is not None
    return export.manifest


async def prepare_export(
    source: AuditSource | Exportable,
    signer: Signer,
    *,
    start: datetime,
    end: datetime,
    agent: str | None = None,
    fmt: Flavour = "jsonl",
    clock: Clock = utc_now,
) -> BundleExport:
    """Check the arguments and find the range; ``chunks()`` then streams the bundle.
    ``source`` is the audit source, or a ledger that names its own."""
    if isinstance(source, Exportable):
        source = source.audit_source()
    parse_flavour(fmt)
    if agent is not None and not is_did(agent):
        raise ValueError(f"{agent!r} is not a DID like did:mesh:<32 hex>")
    for name, moment in (("from", start), ("to", end)):
        if moment.tzinfo is None or not is_ledger_time(format_time(moment)):
            raise ValueError(f"{name} is not a timezone-aware time the ledger can write")
    if not start < end:
        raise ValueError("from must be earlier than to")
    export = BundleExport(source, signer, start, end, agent, fmt, clock)
    await export.load()
    return export


class BundleExport:
    """One export: the range, the key entries, then ``chunks()`` of bundle text."""

    def __init__(
        self,
        source: AuditSource,
        key: Signer,
        start: datetime,
        end: datetime,
        agent: str | None,
        fmt: Flavour,
        clock: Clock,
    ) -> None:
        self.source = source
        self.key = key
        self.agent = agent
        self.clock = clock
        self.span = (format_time(start), format_time(end))
        self.bounds = (start, end)
        self.encoder = LineEncoder(fmt, key.did, format_time(clock()))
        self.first: int | None = None
        self.last: int | None = None
        self.key_records: list[RecordedEvent] = []
        self.rotations: list[RecordedEvent] = []
        self.stored: dict[int, str] = {}
        self.manifest: Manifest | None = None

    @property
    def filename(self) -> str:
        stamp = self.span[0].replace(":", "").replace("-", "")[:15]
        suffix = ".cloudevents.jsonl" if self.encoder.cloudevents else ".jsonl"
        return f"agentmesh-audit-{stamp}{suffix}"

    async def load(self) -> None:
        """Find the positions in the range and the key entries they need."""
        found = await self.source.entry_range(*self.bounds)
        if found is None:
            return
        self.first, self.last = found
        await self._ledger_keys(self.last)
        actors = await self._signers()
        if actors:
            self.key_records = await self._key_records(actors)
        self.stored = await self._stored_checkpoints()

    async def _ledger_keys(self, last: int) -> None:
        """The ledger's rotations, carried by the bundle (all of them: they link the key
        in force at ``last`` to ours); refuse a range whose checkpoint ours cannot sign."""
        self.rotations = await self.source.ledger_rotations()
        if not self.rotations:
            return
        keys = keyhistory.history(self.rotations, self.key.public)
        in_force = keys.at(last)
        if in_force.raw != self.key.public.raw:
            since = next(p for p, k in keys.rotations if k.raw == self.key.public.raw)
            raise VerificationError(
                last,
                f"the range ends at position {last}, under the ledger's earlier key "
                f"{in_force.did}: {self.key.did} signs no checkpoint before its rotation at "
                f"{since}; export a range that ends after position {since}",
            )

    async def _signers(self) -> list[str]:
        """Every agent (not the ledger) who signed an event that will be exported."""
        assert self.first is not None
        assert self.last is not None
        ledger = {self.key.did, *(_rotated(r).actor for r in self.rotations)}
        found = await self.source.entry_signers(
            self.first, self.last, *self.bounds, exclude=self.key.did, agent=self.agent
        )
        return [actor for actor in found if actor not in ledger]

    async def _key_records(self, actors: list[str]) -> list[RecordedEvent]:
        assert self.last is not None
        records = await self.source.key_entries(actors, self.last)
        # The source matches by subject; only an entry about the actor's own key counts.
        wanted = set(actors)
        return [r for r in records if _did_of(r) in wanted]

    async def _stored_checkpoints(self) -> dict[int, str]:
        """Stored checkpoints by our key in the range (and just before it), verified."""
        assert self.first is not None
        assert self.last is not None
        found: dict[int, str] = {}
        after = self.first - 2
        while True:
            page = await self.source.checkpoints(after=after, limit=10_000)
            for checkpoint in page:
                if checkpoint.position > self.last:
                    return found
                if checkpoint.signer == self.key.did:
                    verify_checkpoint(checkpoint, self.key.public)
                    found[checkpoint.position] = checkpoint.head_hash
            if len(page) < 10_000:
                return found
            after = page[-1].position

    async def chunks(self, progress: ExportProgress | None = None) -> AsyncGenerator[str, None]:
        """The bundle's text, a batch of lines at a time."""
        header = Header(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            from_=self.span[0],
            to=self.span[1],
            agent=self.agent,
            ledger_public_key=self.key.public.pem(),
            generated_at=self.encoder.generated_at,
        )
        keys = KeyHistory(self.key.public)
        lines = [self.encoder.line(header)]
        anchor = await self.source.retention_anchor()
        if anchor is not None:
            keys.add_anchor(2, anchor)  # its signature checked before it is written
            lines.append(self.encoder.line(anchor))
        records = [*self.rotations, *self.key_records]  # the ledger's keys first
        for number, record in enumerate(records, start=3 if anchor else 2):
            item = entry_line(KeyLine, record)
            keys.add(number, item)  # the key section must verify before anything is signed
            lines.append(self.encoder.line(item))
        # Their signatures (a key entry per signer: 39k for the newest 50k events of 10M
        # entries) are checked on threads while the entries stream; _tail waits for them
        # before the ledger key signs anything.
        signatures = asyncio.ensure_future(asyncio.to_thread(keys.check_signatures))
        try:
            async for text in self._stream(keys, lines, progress, signatures):
                yield text
        finally:
            signatures.cancel()  # if the export stopped early: nothing is signed then
            signatures.add_done_callback(_retrieved)

    async def _stream(
        self,
        keys: KeyHistory,
        lines: list[bytes],
        progress: ExportProgress | None,
        signatures: asyncio.Future[None],
    ) -> AsyncGenerator[str, None]:
        state = _ExportState()
        if self.first is not None:
            assert self.last is not None
            # The range proof: the tree's edge before the first entry (ledger.tlog).
            state.frontier = await self.source.tree_edge(self.first - 1)
            # Every event's audit path is checked against the stored tree's root at the
            # last position as it is made, and that root against the entries' own at the
            # end, before anything is signed.
            state.root = (await self.source.tree_edge(self.last)).root()
            edge = TreeLine(
                size=state.frontier.size, hashes=[b64encode(h) for h in state.frontier.hashes]
            )
            lines.append(self.encoder.line(edge))
        yield b"".join(lines).decode()
        if self.first is not None:
            # aclosing: a client that goes away mid-stream closes the inner generators
            # now (and cancels the prefetched read), not whenever they are collected.
            async with contextlib.aclosing(self._entries(state, progress)) as entries:
                async for text in entries:
                    yield text
        await signatures  # the key entries' signatures: a bad one fails the export here
        yield (await self._tail(state, keys)).decode()

    async def _entries(
        self, state: _ExportState, progress: ExportProgress | None
    ) -> AsyncGenerator[str, None]:
        assert self.first is not None
        assert self.last is not None
        total = self.last - self.first + 1
        state.prev = await self._anchor()
        async with contextlib.aclosing(self._batches()) as batches:
            async for batch in batches:
                checked = [self._check(state, record) for record in batch]
                leaves = [tlog.entry_leaf(record.entry_hash) for record in batch]
                proofs = await self._proofs(state, batch, leaves)
                lines = [self._line(state, line, proofs.get(line.position)) for line in checked]
                state.frontier = state.frontier.extend(leaves)
                if progress is not None:
                    progress(state.events + state.stubs, total)
                yield b"".join(lines).decode()
        if state.last_position != self.last:
            raise VerificationError(state.last_position + 1, "missing: the range ends early")

    def _shown(self, record: RecordedEvent) -> bool:
        return self.agent is None or self.agent in record.subjects

    async def _proofs(
        self, state: _ExportState, batch: list[RecordedEvent], leaves: list[bytes]
    ) -> dict[int, Inclusion]:
        """The audit path of every event of the batch the bundle shows, in the tree of
        ``last`` entries, each checked against the stored tree's root there."""
        assert self.last is not None
        size = self.last
        shown = [(i, r.position) for i, r in enumerate(batch) if self._shown(r)]
        try:
            paths = await batch_proofs(
                size,
                state.frontier,
                leaves,
                [position - 1 for _, position in shown],
                state.fetched,
                self.source.tree_nodes,
            )
        except ProofError as exc:
            failed = shown[0][1] if shown else batch[0].position
            raise VerificationError(
                failed, f"the stored Merkle tree gives no inclusion proof: {exc}"
            ) from None
        proofs: dict[int, Inclusion] = {}
        memo = RootMemo()  # per batch: its states are the batch's paths
        texts: dict[bytes, str] = {}  # the paths share most of their nodes: encode each once
        for (i, position), path in zip(shown, paths, strict=True):
            hashes = [texts.get(h) or texts.setdefault(h, b64encode(h)) for h in path]
            proof = Inclusion(tree_size=size, hashes=hashes)
            # followed as the verifier will (ledger.audit.proofs.RootMemo)
            if memo.root(leaves[i], position - 1, size, proof.hashes) != state.root:
                raise VerificationError(
                    position, "the stored Merkle tree's inclusion proof does not lead to its root"
                )
            proofs[position] = proof
        return proofs

    async def _batches(self) -> AsyncGenerator[list[RecordedEvent], None]:
        """Entries first..last, the next batch read while this one is written."""
        assert self.first is not None
        assert self.last is not None
        last = self.last

        def read(after: int) -> asyncio.Task[list[RecordedEvent]]:
            limit = min(_READ_BATCH, last - after)
            return asyncio.create_task(self.source.read(after, limit))

        pending = read(self.first - 1)
        try:
            while True:
                batch = await pending
                if not batch:
                    return
                after = batch[-1].position
                if after < last:
                    pending = read(after)
                yield batch
                if after >= last:
                    return
        finally:
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, LedgerError):
                    await pending

    async def _anchor(self) -> bytes | None:
        """The hash the first entry must link to: genesis, or the entry before it."""
        assert self.first is not None
        if self.first == 1:
            return GENESIS_HASH
        before = await self.source.entry_at(self.first - 1)
        if before is None:  # removed by retention: a checkpoint there, if any, is the anchor
            stored = self.stored.get(self.first - 1)
            return None if stored is None else bytes.fromhex(stored)
        if entry_hash(before.prev_hash, before.envelope()) != before.entry_hash:
            raise VerificationError(
                before.position, "entry_hash does not match the entry's content"
            )
        return before.entry_hash

    def _check(self, state: _ExportState, record: RecordedEvent) -> EventLine:
        """The link, recomputed from the very texts written (never sign what was not
        checked); the same checks, in the same order, as ledger.chain.check_link."""
        assert self.first is not None
        line: EventLine = entry_line(EventLine, record)
        expected = state.last_position + 1 if state.last_position else self.first
        if record.position != expected:
            raise VerificationError(
                expected,
                f"missing or out of order: expected position {expected}, found {record.position}",
            )
        if state.prev is not None and record.prev_hash != state.prev:
            raise VerificationError(record.position, "prev_hash does not match the previous entry")
        problem = check_hash(line)
        if problem is not None:
            raise VerificationError(record.position, problem)
        if not self.bounds[0] <= record.recorded_at < self.bounds[1]:
            raise VerificationError(record.position, "recorded_at is out of order")
        stored = self.stored.get(record.position)
        if stored is not None and stored != record.entry_hash.hex():
            raise VerificationError(
                record.position, "entry_hash differs from the signed checkpoint at this position"
            )
        if state.first_prev is None:
            state.first_prev = record.prev_hash
        state.prev, state.last_position = record.entry_hash, record.position
        return line

    def _line(self, state: _ExportState, line: EventLine, inclusion: Inclusion | None) -> bytes:
        """A checked entry as an event with its inclusion proof, or else a stub."""
        if inclusion is not None:
            state.events += 1
            return self.encoder.line(msgspec.structs.replace(line, inclusion=inclusion))
        state.stubs += 1
        stub = StubLine(
            position=line.position, prev_hash=line.prev_hash, entry_hash=line.entry_hash
        )
        return self.encoder.line(stub)

    async def _tail(self, state: _ExportState, keys: KeyHistory) -> bytes:
        lines = []
        checkpoint: Checkpoint | None = None
        if self.first is not None:
            assert state.prev is not None
            checkpoint = await self._covering_checkpoint(state.last_position, state.prev)
            # The entries' own hashes, folded onto the edge: what the ledger key signs;
            # the events' audit paths were checked against the stored tree's root.
            if state.frontier.root() != state.root:
                raise VerificationError(
                    state.last_position,
                    "the stored Merkle tree's root differs from the one of the entries",
                )
            tree_head = tlog.signed_tree_head(self.key, state.frontier.size, state.frontier.root())
            lines.append(
                self.encoder.line(
                    CheckpointLine(
                        origin=checkpoint.origin,
                        position=checkpoint.position,
                        head_hash=checkpoint.head_hash,
                        time=checkpoint.time,
                        signer=checkpoint.signer,
                        signature=checkpoint.signature,
                        note=tree_head,
                    )
                )
            )
        unsigned = Manifest(
            format_version=FORMAT_VERSION,
            from_=self.span[0],
            to=self.span[1],
            agent=self.agent,
            first_position=self.first,
            last_position=self.last,
            count=state.events,
            stubs=state.stubs,
            keys=keys.count,
            generated_at=self.encoder.generated_at,
            keys_digest=keys.digest(),
            head_hash=state.prev.hex() if state.prev is not None else None,
            start_hash=state.first_prev.hex() if state.first_prev is not None else None,
            checkpoint_position=checkpoint.position if checkpoint else None,
            signer=self.key.did,
        )
        self.manifest = msgspec.structs.replace(
            unsigned, signature=b64encode(self.key.sign(unsigned.signed_bytes()))
        )
        lines.append(self.encoder.line(self.manifest))
        return b"".join(lines)

    async def _covering_checkpoint(self, position: int, head_hash: bytes) -> Checkpoint:
        """A stored checkpoint of ours at ``position``, else a new one (stored)."""
        page = await self.source.checkpoints(after=position - 1, limit=1)
        existing = page[0] if page and page[0].position == position else None
        if existing is None:
            existing = await self.source.store_checkpoint(
                sign_checkpoint(self.key, position, head_hash, self.clock())
            )
            if existing is None:
                raise VerificationError(position, "the stored entry differs from the one checked")
        if existing.signer != self.key.did:
            # Stored under another ledger key: sign our own, which the bundle's header names.
            return sign_checkpoint(self.key, position, head_hash, self.clock())
        verify_checkpoint(existing, self.key.public)
        if existing.head_hash != head_hash.hex():
            raise VerificationError(
                position, "entry_hash differs from the signed checkpoint at this position"
            )
        return existing


@dataclass
class _ExportState:
    prev: bytes | None = None
    first_prev: bytes | None = None
    last_position: int = 0
    events: int = 0
    stubs: int = 0
    frontier: Frontier = field(default_factory=Frontier)
    root: bytes = b""
    fetched: Nodes = field(default_factory=dict)


def _retrieved(future: asyncio.Future[None]) -> None:
    """Take the outcome of a check nobody awaits any more (the export stopped first)."""
    if not future.cancelled():
        future.exception()


def _rotated(record: RecordedEvent) -> LedgerKeyRotated:
    event = decode_body(record.body)
    assert isinstance(event, LedgerKeyRotated)  # ledger_rotations() reads nothing else
    return event


def _did_of(record: RecordedEvent) -> str | None:
    event = decode_body(record.body)
    return event.did if isinstance(event, AgentRegistered | AgentKeyRotated) else None
