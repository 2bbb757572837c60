"""Checking a run of entry lines, on a worker process: the links between them, each
event's hash, who may have signed it (``ledger.authority``) and its signature.

A task carries everything the check needs (picklable): the lines themselves
or a region of the bundle file that the worker reads, and the key history of
the bundle's key section. The verifier (``ledger.audit.verify``) links the
chunks to each other and reads the lines after the entries.
"""

from __future__ import annotations

import binascii
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import msgspec

from ledger import authority, tlog
from ledger.audit.bundle import (
    ENTRY_LINES,
    EventLine,
    LineError,
    StubLine,
    check_hash,
    clock_ran_back,
    decode_event,
    entry_signature,
    is_ledger_time,
    jsonl_decoder,
    key_before,
    raw_key,
    reason_of,
)
from ledger.audit.cloudevents import Envelope, decode_ce_entry
from ledger.audit.proofs import RootMemo
from ledger.errors import LedgerError, ProofError
from ledger.events import AgentRegistered, subject_agents
from ledger.signatures import verify_signature_chunk
from ledger.timefmt import parse_time


class SignerKeys:
    """The agents' keys by position (``positions``, ``raws``: ``KeyHistory``'s) and the
    key entries' hashes by position, as every chunk needs them.

    A bundle of the newest events of a large ledger has a key entry per signer (39k at
    10M entries): pickled with every task, these tables cost more than the task's own
    lines (0.3 s a task at 39k). They are pickled once per verification instead, and
    a worker process unpickles each verification's tables once (``_received``)."""

    __slots__ = ("_wire", "hashes", "positions", "raws")

    def __init__(
        self,
        positions: dict[str, list[int]],
        raws: dict[str, list[bytes]],
        hashes: dict[int, str],
    ) -> None:
        self.positions = positions
        self.raws = raws
        self.hashes = hashes
        self._wire: tuple[bytes, bytes] | None = None

    def __reduce__(self) -> tuple[Callable[[bytes, bytes], SignerKeys], tuple[bytes, bytes]]:
        if self._wire is None:  # the tables do not change once the key section is read
            tables = (self.positions, self.raws, self.hashes)
            self._wire = (os.urandom(16), pickle.dumps(tables, pickle.HIGHEST_PROTOCOL))
        return _received, self._wire


_RECEIVED: dict[bytes, SignerKeys] = {}  # in a worker: the tables of the latest verification


def _received(token: bytes, tables: bytes) -> SignerKeys:
    found = _RECEIVED.get(token)
    if found is None:
        # The bytes come from the verifying process through the pool's own pickle pipe
        # (as every task does), never from a file or the bundle.
        positions, raws, hashes = pickle.loads(tables)  # noqa: S301
        found = SignerKeys(positions, raws, hashes)
        _RECEIVED.clear()
        _RECEIVED[token] = found
    return found


@dataclass(frozen=True, slots=True)
class ChunkTask:
    """A run of lines to check, with everything the check needs (picklable).

    The lines are ``lines``, or ``region`` (path, offset, length) of the bundle
    file, which the worker reads itself so the lines never cross a pipe; a
    region's line numbers start at ``first_line`` 1 and the caller shifts them.
    """

    lines: list[bytes]
    region: tuple[str, int, int] | None
    first_line: int
    cloudevents: bool
    signatures: bool
    span: tuple[str, str]
    agent: str | None
    ledger: tuple[tuple[int, str, bytes], ...]  # (from position, DID, raw key), in order
    keys: SignerKeys
    proofs: bool = True
    """Whether every event must carry an inclusion proof (format version 2)."""
    envelope: Envelope | None = None
    """What a CloudEvents line's id, source and time must say (``cloudevents.Envelope``)."""


@dataclass(frozen=True, slots=True)
class ChunkResult:
    """What a chunk held. ``first``/``last`` are (line, position, hash) of its
    first entry (hash = prev_hash) and last entry (hash = entry_hash); ``rest``
    holds the lines from the first one that is not an entry on."""

    events: int = 0
    stubs: int = 0
    first: tuple[int, int, str] | None = None
    last: tuple[int, int, str] | None = None
    rest: list[tuple[int, bytes]] = field(default_factory=list)
    error: tuple[int, int, str] | None = None
    signatures: int = 0
    lines: int = 0
    leaves: list[bytes] = field(default_factory=list)
    """The Merkle leaf hash of every entry checked, in order (``ledger.tlog``)."""
    proofs: int = 0
    roots: dict[tuple[int, bytes], tuple[int, int]] = field(default_factory=dict)
    """The (tree size, root) the events' inclusion proofs lead to, each with the
    (line, position) of the first event whose proof leads there; the verifier holds
    them against the signed tree head, which comes after the entries."""
    first_time: tuple[int, int, str] | None = None
    """(line, position, recorded_at) of the chunk's first event, once its time was
    found to be a ledger time inside the range: the verifier holds it against the
    previous chunk's ``last_time`` (the ledger's clock never runs back)."""
    last_time: str | None = None
    """The recorded_at of the chunk's last event checked."""

    def shifted(self, delta: int) -> ChunkResult:
        """The same result with line numbers ``delta`` further on."""
        if not delta:
            return self

        def move(found: tuple[int, int, str] | None) -> tuple[int, int, str] | None:
            return None if found is None else (found[0] + delta, *found[1:])

        return replace(
            self,
            first=move(self.first),
            last=move(self.last),
            error=move(self.error),
            first_time=move(self.first_time),
            rest=[(number + delta, raw) for number, raw in self.rest],
            roots={key: (line + delta, pos) for key, (line, pos) in self.roots.items()},
        )


def check_chunk(task: ChunkTask) -> ChunkResult:
    """Check a run of entry lines; report the first problem (line, position, reason)."""
    return _ChunkCheck(task).run()


def _task_lines(task: ChunkTask) -> list[bytes]:
    if task.region is None:
        return task.lines
    path, offset, length = task.region
    with open(path, "rb") as handle:
        handle.seek(offset)
        lines = handle.read(length).split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return lines


class _ChunkCheck:
    def __init__(self, task: ChunkTask) -> None:
        self.task = task
        self.jobs: list[tuple[int, bytes, bytes, bytes]] = []
        self.job_lines: list[int] = []
        self.events = 0
        self.stubs = 0
        self.first: tuple[int, int, str] | None = None
        self.last: tuple[int, int, str] | None = None
        self.leaves: list[bytes] = []
        self.roots: dict[tuple[int, bytes], tuple[int, int]] = {}
        self.proofs = 0
        self.memo = RootMemo()
        self.first_time: tuple[int, int, str] | None = None
        self.last_time: str | None = None  # the previous event's recorded_at

    def run(self) -> ChunkResult:
        rest: list[tuple[int, bytes]] = []
        error: tuple[int, int, str] | None = None
        lines = _task_lines(self.task)
        envelope = self.task.envelope
        decode: Callable[[bytes], object] = (
            (lambda raw: decode_ce_entry(raw, envelope))
            if self.task.cloudevents
            else jsonl_decoder.decode
        )
        for offset, raw in enumerate(lines):
            if not raw or raw.isspace():
                continue
            try:
                item = decode(raw)
            except (msgspec.DecodeError, LineError):
                item = None  # the caller reports it, in order, with the lines after it
            if not isinstance(item, ENTRY_LINES):
                rest = [
                    (self.task.first_line + i, line)
                    for i, line in enumerate(lines[offset:], start=offset)
                ]
                break
            error = self._entry(self.task.first_line + offset, item)
            if error is not None:
                break
        error = self._signatures(error)
        return ChunkResult(
            events=self.events,
            stubs=self.stubs,
            first=self.first,
            last=self.last,
            rest=[] if error else rest,
            error=error,
            signatures=len(self.jobs),
            lines=len(lines),
            leaves=self.leaves,
            proofs=self.proofs,
            roots=self.roots,
            first_time=self.first_time,
            last_time=self.last_time,
        )

    def _entry(self, number: int, item: EventLine | StubLine) -> tuple[int, int, str] | None:
        # 1. linked to the entry before it in this chunk (the caller links chunks)
        if self.last is not None:
            _, position, digest = self.last
            if item.position != position + 1:
                return (
                    number,
                    position + 1,
                    f"missing or out of order: expected position {position + 1}, "
                    f"found {item.position}",
                )
            if item.prev_hash != digest:
                return number, item.position, "prev_hash does not match the previous entry"
        else:
            self.first = (number, item.position, item.prev_hash)
        # 2. the entry itself
        problem = self._event(number, item) if isinstance(item, EventLine) else None
        known = self.task.keys.hashes.get(item.position)
        if problem is None and known is not None and known != item.entry_hash:
            problem = "differs from the key entry at this position"
        if problem is not None:
            return number, item.position, problem
        self.last = (number, item.position, item.entry_hash)
        leaf = tlog.entry_leaf(bytes.fromhex(item.entry_hash))
        self.leaves.append(leaf)
        if isinstance(item, EventLine):
            problem = self._inclusion(number, item, leaf)
            if problem is not None:
                return number, item.position, problem
            self.events += 1
        else:
            self.stubs += 1
        return None

    def _inclusion(self, number: int, item: EventLine, leaf: bytes) -> str | None:
        """The root the event's audit path leads to, noted for the signed tree head."""
        proof = item.inclusion
        if proof is None:
            return "no inclusion proof" if self.task.proofs else None
        try:
            root = self.memo.root(leaf, item.position - 1, proof.tree_size, proof.hashes)
        except binascii.Error:
            return "inclusion proof: a hash is not base64"
        except ProofError as exc:
            return str(exc)
        self.roots.setdefault((proof.tree_size, root), (number, item.position))
        self.proofs += 1
        return None

    def _event(self, number: int, item: EventLine) -> str | None:
        low, high = self.task.span
        recorded_at = item.recorded_at
        # The ledger's own form (fixed width, UTC): its texts order as its times do.
        if not is_ledger_time(recorded_at):
            return f"recorded_at {recorded_at!r} is not a ledger time"
        if not low <= recorded_at < high:
            return f"recorded_at {recorded_at} is outside the bundle's range"
        before = self.last_time
        if before is None:
            self.first_time = (number, item.position, recorded_at)
        elif recorded_at < before:
            return clock_ran_back(recorded_at, before)
        self.last_time = recorded_at
        problem = check_hash(item)
        if problem is not None or not self.task.signatures:
            return problem
        try:
            job = self._job(item)
        except LedgerError as exc:
            return reason_of(exc)
        self.jobs.append(job)
        self.job_lines.append(number)
        return None

    def _job(self, item: EventLine) -> tuple[int, bytes, bytes, bytes]:
        event = decode_event(item)
        agent = self.task.agent
        if agent is not None and agent != event.actor and agent not in subject_agents(event):
            raise LineError(f"neither signed by nor about {agent}")
        ledger_did, ledger_raw = ledger_before(self.task.ledger, item.position)
        if event.actor == ledger_did:
            key = ledger_raw
        elif isinstance(event, AgentRegistered) and event.actor == event.did:
            key = raw_key(event.public_key).raw
        else:
            keys = self.task.keys
            found = key_before(keys.positions, keys.raws, event.actor, item.position)
            if found is None:
                raise LineError(f"signed by {event.actor}, which has no key entry before it")
            key = found
        if isinstance(event, AgentRegistered) and raw_key(event.public_key).did != event.did:
            raise LineError(f"the public key does not belong to {event.did}")
        body = item.body.encode()
        # The append rules one event shows by itself (who may sign it, its id, real and
        # fresh times, a rotation's proof); `ledger verify` replays the stateful ones.
        authority.check_static(event, body, parse_time(item.recorded_at), ledger_did)
        return item.position, key, entry_signature(item), body

    def _signatures(self, error: tuple[int, int, str] | None) -> tuple[int, int, str] | None:
        """The first bad signature, if it precedes ``error``; else ``error``."""
        if not self.jobs:
            return error
        bad = verify_signature_chunk(self.jobs)
        if not bad:
            return error
        index = next(i for i, job in enumerate(self.jobs) if job[0] == min(bad))
        return self.job_lines[index], min(bad), "signature does not verify"


def ledger_before(segments: tuple[tuple[int, str, bytes], ...], position: int) -> tuple[str, bytes]:
    """The ledger's DID and key that sign the entry at ``position``: the key in force
    at ``position - 1`` (a rotation is signed by the key it retires)."""
    did, raw = segments[0][1], segments[0][2]
    for start, next_did, next_raw in segments[1:]:
        if start > position - 1:
            break
        did, raw = next_did, next_raw
    return did, raw
