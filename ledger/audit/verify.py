"""Offline verification of a bundle: ``verify_bundle`` names the first bad line.

It checks the chain from the first entry (each event's hash recomputed, every
``prev_hash`` equal to the previous entry's hash, stubs included, positions
consecutive, times in the ledger's form, inside the range and never running
back from one event to the next), every event signature against its
signer's key at that position (on a process pool) and the append rules one
event shows by itself (``ledger.authority.check_static``), the checkpoint and
its tree head by the ledger key in force at their size, the manifest by the
header's ledger key, and header, manifest and content against each other. The
ledger's key history is the bundle's ``ledger.key_rotated`` key lines (first
among the key lines, every rotation: ``ledger.keyhistory``); it must end at the
header's key. Blank lines are ignored. The header names the
ledger key; pin the one you expect with ``ledger_key``, or compare the DID
the report prints.

The header and key entries are read in this process, the entries in chunks
on a process pool (``ledger.audit.chunks``), the checkpoint and the manifest
in this process again. Nothing here touches a database.
"""

from __future__ import annotations

import base64
import collections
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import BinaryIO, TypeAlias

from ledger import tlog
from ledger.audit.bundle import (
    FORMAT,
    FORMAT_VERSIONS,
    AnchorLine,
    BundleVerificationError,
    CheckpointLine,
    EventLine,
    Header,
    KeyHistory,
    KeyLine,
    Line,
    LineError,
    Manifest,
    StubLine,
    TreeLine,
    clock_ran_back,
    is_ledger_time,
    raise_first_bad,
    signature_bytes,
)
from ledger.audit.chunks import ChunkResult, ChunkTask, SignerKeys, check_chunk
from ledger.audit.cloudevents import Envelope, decode_line, is_cloudevents
from ledger.audit.report import BundleReport
from ledger.chain import CHECKPOINT_ORIGIN, Checkpoint, verify_checkpoint
from ledger.errors import LedgerError, VerificationError
from ledger.identity import VerifyKey, is_did
from ledger.merkle import Frontier
from ledger.note import Checkpoint as NoteCheckpoint
from ledger.note import open_checkpoint
from ledger.signatures import KeyEntryJob, check_key_entries, make_executor
from ledger.verify import trusted_checkpoint

Source: TypeAlias = str | os.PathLike[str] | Iterable[str | bytes]
_KEY_CHUNK = 2000  # key entries' signatures sent to the pool at a time, from this many on
Progress = Callable[[int], None]


def verify_bundle(
    source: Source,
    *,
    workers: int | None = None,
    signatures: bool = True,
    ledger_key: VerifyKey | None = None,
    executor: Executor | None = None,
    progress: Progress | None = None,
    chunk: int | None = None,
    trusted: str | None = None,
) -> BundleReport:
    """Verify a bundle (a path, or an iterable of lines) offline.

    Returns a report, or raises ``BundleVerificationError`` naming the first
    bad line. ``workers`` processes check entries in chunks of ``chunk`` lines,
    or of ``chunk`` KiB of a file (default 2000; workers default to one per
    core; 0 checks everything in this process); a pool is only started for a
    bundle of more than one chunk, and ``executor`` replaces it.
    ``signatures=False`` checks the chain, the key entries' hashes, the
    checkpoint and the manifest but no event or key signature. ``ledger_key``
    pins the ledger key the header must name. ``progress`` gets the bytes
    read so far. OSError propagates when the path cannot be read. ``trusted``
    is the C2SP note of a checkpoint seen before (a witness's): the bundle's
    tree must contain it (its size must lie within the bundle's tree range).
    """
    verifier = _BundleVerifier(
        signatures=signatures,
        ledger_key=ledger_key,
        workers=(os.cpu_count() or 1) if workers is None else workers,
        executor=executor,
        chunk=chunk or 2000,
        progress=progress,
        trusted=trusted,
    )
    return verifier.run(source)


def _counted(
    lines: Iterable[str | bytes], progress: Progress | None
) -> Iterator[tuple[int, bytes]]:
    done = 0
    for number, line in enumerate(lines, start=1):
        raw = line.encode() if isinstance(line, str) else line
        if progress is not None:
            done += len(raw)
            if number % 10_000 == 0:
                progress(done)
        yield number, raw
    if progress is not None:
        progress(done)


class _BundleVerifier:
    """Reads lines in order: header, key entries, entries (in chunks), the tail."""

    def __init__(
        self,
        *,
        signatures: bool,
        ledger_key: VerifyKey | None,
        workers: int,
        executor: Executor | None,
        chunk: int,
        progress: Progress | None,
        trusted: str | None = None,
    ) -> None:
        self.trusted_note = trusted
        self.trusted: NoteCheckpoint | None = None
        self.frontier: Frontier | None = None  # the tree over the entries read so far
        self.tree_size: int | None = None
        self.progress = progress
        self.signatures = signatures
        self.pinned = ledger_key
        self.workers = workers
        self.executor = executor
        self.own_executor: Executor | None = None
        self.chunk = chunk
        self.cloudevents = False
        self.envelope: Envelope | None = None
        self.header: Header | None = None
        self.keys: KeyHistory | None = None
        self.signer_keys: SignerKeys | None = None
        # Key entries' checks (signatures, installed keys' group) sent to the pool,
        # (lines and jobs, futures): checked beside the entries, and looked at before
        # any result or error after them.
        self.key_checks: list[tuple[list[tuple[int, KeyEntryJob]], Future[dict[int, str]]]] = []
        self.events = 0
        self.stubs = 0
        self.signatures_done = 0
        self.first: tuple[int, int, str] | None = None
        self.last: tuple[int, int, str] | None = None
        self.last_time: str | None = None  # the last event's recorded_at
        self.checkpoint: Checkpoint | None = None
        self.manifest: Manifest | None = None
        self.lines_seen = 0
        self.sealed = False  # the key entries are read
        self.next_line = 0  # the number of the next region's first line
        self.version = 0
        self.proofs = 0
        # (tree size, root) each event's inclusion proof leads to, with the (line,
        # position) of the first such event: held against the signed tree head
        self.proof_roots: dict[tuple[int, bytes], tuple[int, int]] = {}

    # 1. header and key entries, in this process
    def run(self, source: Source) -> BundleReport:
        try:
            if isinstance(source, str | os.PathLike):
                with open(source, "rb") as handle:
                    self._read_file(handle, os.fspath(source))
            else:
                self._read_lines(_counted(source, self.progress))
            return self._finish()
        except BundleVerificationError:
            self._key_signatures()  # a bad key entry comes before any later line's error
            raise
        finally:
            if self.own_executor is not None:
                self.own_executor.shutdown(cancel_futures=True)

    def _read_lines(self, lines: Iterator[tuple[int, bytes]]) -> None:
        for number, raw in lines:
            self.lines_seen = number
            if self._prelude(number, raw):
                self._entries(self._line_tasks(number, raw, lines))
                return

    def _read_file(self, handle: BinaryIO, path: str) -> None:
        number = 0
        while True:
            offset = handle.tell()
            raw = handle.readline()
            if not raw:
                return
            number += 1
            self.lines_seen = number
            if self._prelude(number, raw):
                self._entries(self._file_tasks(handle, path, offset, number))
                return

    def _prelude(self, number: int, raw: bytes) -> bool:
        """Check a line before the entries; True when it is the first entry."""
        if not raw.strip():
            return False
        if self.header is None:
            self._header(number, raw)
            return False
        item = self._decode(number, raw)
        if isinstance(item, AnchorLine) and self.checkpoint is None and self.manifest is None:
            assert self.keys is not None
            self.keys.add_anchor(number, item)
        elif isinstance(item, KeyLine) and self.checkpoint is None and self.manifest is None:
            assert self.keys is not None
            self.keys.add(number, item)
            if len(self.keys.unchecked) >= _KEY_CHUNK and self.workers > 0:
                self._send_key_signatures()
        elif isinstance(item, TreeLine) and self.frontier is None and self.checkpoint is None:
            self._keys_read(number)
            self._tree(number, item)
        elif isinstance(item, EventLine | StubLine):
            self._keys_read(number)
            return True
        else:
            self._keys_read(number)
            self._tail(number, item)
        return False

    def _decode(self, number: int, raw: bytes) -> Line:
        try:
            return decode_line(raw, self.cloudevents, self.envelope)
        except LineError as exc:
            if self.keys is not None and not self.sealed:
                self.keys.check_signatures()  # a bad key entry before it is named first
            raise BundleVerificationError(number, 0, str(exc)) from None

    def _header(self, number: int, raw: bytes) -> None:
        self.cloudevents = is_cloudevents(raw)
        item = self._decode(number, raw)
        if not isinstance(item, Header):
            raise BundleVerificationError(number, 0, "the first line is not a bundle header")
        if item.format != FORMAT or item.format_version not in FORMAT_VERSIONS:
            versions = " or ".join(str(v) for v in FORMAT_VERSIONS)
            raise BundleVerificationError(number, 0, f"not a {FORMAT} version {versions} header")
        self.version = item.format_version
        for name, text in (("from", item.from_), ("to", item.to)):
            if not is_ledger_time(text):
                raise BundleVerificationError(number, 0, f"{name} is not a ledger time: {text!r}")
        if not item.from_ < item.to or (item.agent is not None and not is_did(item.agent)):
            raise BundleVerificationError(number, 0, "from must precede to; agent must be a DID")
        try:
            key = VerifyKey.from_pem(item.ledger_public_key)
        except LedgerError as exc:
            raise BundleVerificationError(number, 0, f"ledger_public_key: {exc}") from None
        if self.pinned is not None and key.raw != self.pinned.raw:
            raise BundleVerificationError(
                number,
                0,
                f"ledger key mismatch: the bundle is signed by {key.did}, the pinned key "
                f"is {self.pinned.did}",
            )
        self.header = item
        self.keys = KeyHistory(key, self.signatures)
        if self.cloudevents:  # from here on, every line's id, source and time are checked
            self.envelope = Envelope(key.did, item.generated_at)
            self._decode(number, raw)  # the header's own

    def _keys_read(self, number: int) -> None:
        """After the key entries: the ledger's key history ends at the header's key, and
        a trusted checkpoint is signed by the key in force at its size."""
        assert self.keys is not None
        if self.sealed:
            return
        self.sealed = True
        if self.key_checks:
            self._send_key_signatures()  # the rest, beside the entries
        else:
            self.keys.check_signatures()  # a few: on threads, here
        try:
            self.keys.sealed()
        except VerificationError as exc:
            raise BundleVerificationError(number, exc.position, exc.reason) from None
        if self.trusted_note is not None:
            try:
                self.trusted = trusted_checkpoint(self.trusted_note, self.keys.ledger)
            except LedgerError as exc:
                raise BundleVerificationError(
                    0, 0, f"the trusted checkpoint does not verify with the bundle's keys: {exc}"
                ) from None

    def _tree(self, number: int, item: TreeLine) -> None:
        try:
            hashes = tuple(base64.b64decode(h, validate=True) for h in item.hashes)
            self.frontier = Frontier(item.size, hashes)
        except (ValueError, LedgerError) as exc:
            raise BundleVerificationError(
                number, 0, f"the tree's edge is malformed: {exc}"
            ) from None
        self._held_against_trusted(number)

    def _grow(self, number: int, leaves: list[bytes]) -> None:
        """Extend the tree by a chunk's leaves, stopping at the trusted size if it falls
        inside (the root there must be the trusted one)."""
        assert self.frontier is not None
        if self.trusted is not None and self.frontier.size < self.trusted.size:
            cut = self.trusted.size - self.frontier.size
            if cut <= len(leaves):
                self.frontier = self.frontier.extend(leaves[:cut])
                self._held_against_trusted(number)
                leaves = leaves[cut:]
        self.frontier = self.frontier.extend(leaves)

    def _held_against_trusted(self, number: int) -> None:
        assert self.frontier is not None
        trusted = self.trusted
        if trusted is None or trusted.size != self.frontier.size:
            return
        if trusted.root_hash != self.frontier.root():
            raise BundleVerificationError(
                number,
                trusted.size,
                f"the ledger's Merkle root at size {trusted.size} differs from the trusted "
                "checkpoint: history was rewritten",
            )

    # 2. entries, in chunks on the workers
    def _line_tasks(
        self, number: int, raw: bytes, lines: Iterator[tuple[int, bytes]]
    ) -> Iterator[ChunkTask]:
        start, batch = number, [raw]
        for number, raw in lines:
            self.lines_seen = number
            batch.append(raw)
            if len(batch) >= self.chunk:
                yield self._task(start, batch)
                start, batch = number + 1, []
        if batch:
            yield self._task(start, batch)

    def _file_tasks(
        self, handle: BinaryIO, path: str, offset: int, number: int
    ) -> Iterator[ChunkTask]:
        """Regions of about ``chunk`` KiB cut at line ends; the workers read,
        count and check their lines (this process reads only where it cuts)."""
        self.next_line = number
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        while offset < size:
            handle.seek(min(offset + self.chunk * 1024, size))
            handle.readline()  # to the end of the line
            end = handle.tell()
            yield self._task(1, [], (path, offset, end - offset))
            offset = end
            if self.progress is not None:
                self.progress(offset)

    def _entries(self, tasks: Iterator[ChunkTask]) -> None:
        """Check tasks in order; a pool only once there is more than one."""
        pending: collections.deque[tuple[Future[ChunkResult] | None, ChunkTask]] = (
            collections.deque()
        )
        held: ChunkTask | None = None
        for task in tasks:
            if held is not None:
                pending.append(self._submit(held, pool=True))
                while len(pending) > 2 * max(self.workers, 1):
                    self._collect(*pending.popleft())
            held = task
        if held is not None:
            pending.append(self._submit(held, pool=self.executor is not None))
        while pending:
            self._collect(*pending.popleft())

    def _task(
        self, start: int, batch: list[bytes], region: tuple[str, int, int] | None = None
    ) -> ChunkTask:
        assert self.header is not None
        assert self.keys is not None
        return ChunkTask(
            lines=batch,
            region=region,
            first_line=start,
            cloudevents=self.cloudevents,
            signatures=self.signatures,
            span=(self.header.from_, self.header.to),
            agent=self.header.agent,
            ledger=self.keys.ledger_segments(),
            keys=self._signer_keys(),
            envelope=self.envelope,
            proofs=self.version >= 2,
        )

    def _send_key_signatures(self) -> None:
        """Check the key entries added so far (their signatures and the keys they
        install, ``check_key_entries``) on the pool, as the entries' signatures are: a
        bundle of the newest events of a large ledger has a key entry per signer (39k
        of 50k events at 10M entries)."""
        assert self.keys is not None
        pending = self.keys.take_unchecked()
        if pending:
            jobs = [job for _, job in pending]
            self.key_checks.append((pending, self._pool().submit(check_key_entries, jobs)))

    def _key_signatures(self) -> None:
        """The results of the key entries' signatures sent to the pool; the first bad
        one named (key entries come before everything after them)."""
        checks, self.key_checks = self.key_checks, []
        for pending, future in checks:
            raise_first_bad(pending, future.result())

    def _pool(self) -> Executor:
        if self.executor is None:
            self.own_executor = self.executor = make_executor(self.workers)
        return self.executor

    def _signer_keys(self) -> SignerKeys:
        """The key tables every task carries: one object, pickled once (after the key
        section, they do not change)."""
        assert self.keys is not None
        if self.signer_keys is None:
            keys, with_keys = self.keys, self.signatures
            self.signer_keys = SignerKeys(
                keys.positions if with_keys else {}, keys.raws if with_keys else {}, keys.hashes
            )
        return self.signer_keys

    def _submit(
        self, task: ChunkTask, *, pool: bool
    ) -> tuple[Future[ChunkResult] | None, ChunkTask]:
        if not pool or self.workers == 0:
            return None, task  # checked in this process when collected
        return self._pool().submit(check_chunk, task), task

    def _collect(self, future: Future[ChunkResult] | None, task: ChunkTask) -> None:
        self._key_signatures()
        result = check_chunk(task) if future is None else future.result()
        if task.region is not None:  # region lines are numbered from 1: make them absolute
            result = result.shifted(self.next_line - 1)
            self.next_line += result.lines
            self.lines_seen = self.next_line - 1
        if result.first is not None:
            self._link(result.first)
        self._clock(result)
        if result.error is not None:
            raise BundleVerificationError(*result.error)
        if self.frontier is not None and result.first is not None:
            self._grow(result.first[0], result.leaves)
        for key, where in result.roots.items():
            self.proof_roots.setdefault(key, where)
        self.proofs += result.proofs
        self.events += result.events
        self.stubs += result.stubs
        self.signatures_done += result.signatures
        if result.last is not None:
            self.last = result.last
        for number, raw in result.rest:
            if raw.strip():
                self._tail(number, self._decode(number, raw))

    def _clock(self, result: ChunkResult) -> None:
        """The chunk's first event is not recorded before the previous chunk's last
        (each chunk checks its own events): its line comes before any error the chunk
        found after it, and the time is checked before that event's hash and signature."""
        first, before = result.first_time, self.last_time
        if first is not None and before is not None and first[2] < before:
            number, position, recorded_at = first
            if result.error is None or result.error[0] >= number:
                raise BundleVerificationError(number, position, clock_ran_back(recorded_at, before))
        if result.last_time is not None:
            self.last_time = result.last_time

    def _link(self, first: tuple[int, int, str]) -> None:
        number, position, prev_hash = first
        if self.manifest is not None:
            raise BundleVerificationError(number, 0, "a line after the manifest")
        if self.checkpoint is not None:
            raise BundleVerificationError(number, position, "an entry after the checkpoint")
        if self.last is None:
            self.first = first
            if self.frontier is not None and self.frontier.size != position - 1:
                raise BundleVerificationError(
                    number,
                    self.frontier.size + 1,
                    f"missing: the tree's edge covers {self.frontier.size} entries, "
                    f"the first entry is at {position}",
                )
            return
        _, last_position, last_hash = self.last
        if position != last_position + 1:
            raise BundleVerificationError(
                number,
                last_position + 1,
                f"missing or out of order: expected position {last_position + 1}, found {position}",
            )
        if prev_hash != last_hash:
            raise BundleVerificationError(
                number, position, "prev_hash does not match the previous entry"
            )

    # 3. checkpoint and manifest, in this process
    def _tail(self, number: int, item: Line) -> None:
        self._key_signatures()
        if self.manifest is not None:
            raise BundleVerificationError(number, 0, "a line after the manifest")
        match item:
            case CheckpointLine() if self.checkpoint is None:
                self._checkpoint(number, item)
            case Manifest():
                self._manifest(number, item)
            case KeyLine():
                raise BundleVerificationError(
                    number, item.position, "a key entry after the entries (keys come first)"
                )
            case EventLine() | StubLine():
                raise BundleVerificationError(
                    number, item.position, "an entry after the checkpoint"
                )
            case _:
                kind = item.__struct_config__.tag
                raise BundleVerificationError(number, 0, f"an unexpected {kind} line")

    def _checkpoint(self, number: int, item: CheckpointLine) -> None:
        assert self.keys is not None
        checkpoint = item.checkpoint()
        try:
            if item.origin != CHECKPOINT_ORIGIN:
                raise VerificationError(item.position, f"origin is not {CHECKPOINT_ORIGIN}")
            verify_checkpoint(checkpoint, self.keys.ledger_at(item.position))
        except VerificationError as exc:
            raise BundleVerificationError(number, item.position, exc.reason) from None
        if self.last is not None:
            _, position, digest = self.last
            if item.position > position:
                raise BundleVerificationError(
                    number,
                    position + 1,
                    f"missing: the checkpoint covers position {item.position}, "
                    f"the entries end at {position}",
                )
            if item.position < position:
                raise BundleVerificationError(
                    number,
                    item.position + 1,
                    f"the checkpoint covers position {item.position}, not the last entry "
                    f"{position}",
                )
            if item.head_hash != digest:
                raise BundleVerificationError(
                    number, position, "entry_hash differs from the signed checkpoint"
                )
        if item.note is not None:
            self._tree_head(number, item)
        elif self.proof_roots or (self.version >= 2 and self.last is not None):
            raise BundleVerificationError(
                number, item.position, "no signed tree head for the inclusion proofs"
            )
        self.checkpoint = checkpoint

    def _tree_head(self, number: int, item: CheckpointLine) -> None:
        """The signed tree head: the root of the edge and every entry's hash."""
        assert self.keys is not None
        try:
            at = self.keys.ledger_at(item.position)  # the key in force at its size
            head, _ = open_checkpoint(item.note or "", [tlog.verifier(at)])
        except LedgerError as exc:
            raise BundleVerificationError(
                number, item.position, f"signed tree head: {exc}"
            ) from None
        if self.frontier is None:
            raise BundleVerificationError(
                number, item.position, "a signed tree head without the tree's edge"
            )
        if head.size != item.position or head.size != self.frontier.size:
            raise BundleVerificationError(
                number, item.position, f"the signed tree head is of size {head.size}"
            )
        if head.root_hash != self.frontier.root():
            raise BundleVerificationError(
                number,
                item.position,
                "the Merkle root of the bundle's entries differs from the signed tree head",
            )
        self.tree_size = head.size
        self._inclusion_proofs(head.size, head.root_hash)

    def _inclusion_proofs(self, size: int, root: bytes) -> None:
        """Every event's audit path must lead to the signed tree head's root; the first
        event (by line) whose path does not is named."""
        wrong = sorted(where for key, where in self.proof_roots.items() if key != (size, root))
        if not wrong:
            return
        line, position = wrong[0]
        found = next(key for key, where in self.proof_roots.items() if where == wrong[0])
        if found[0] != size:
            reason = (
                f"the inclusion proof is for a tree of {found[0]} entries, the signed tree "
                f"head's has {size}"
            )
        else:
            reason = "the inclusion proof does not lead to the signed tree head's root"
        raise BundleVerificationError(line, position, reason)

    def _manifest(self, number: int, item: Manifest) -> None:
        assert self.header is not None
        assert self.keys is not None
        header, first, last = self.header, self.first, self.last
        if (item.from_, item.to, item.agent, item.format_version, item.generated_at) != (
            header.from_,
            header.to,
            header.agent,
            self.version,
            header.generated_at if self.version >= 3 else None,
        ):
            raise BundleVerificationError(number, 0, "the manifest's range differs from the header")
        if first is not None and item.first_position != first[1]:
            raise BundleVerificationError(
                first[0],
                item.first_position or first[1],
                f"missing: the manifest says the entries start at {item.first_position}, "
                f"they start at {first[1]}",
            )
        if last is not None and item.last_position != last[1]:
            raise BundleVerificationError(
                number,
                min(item.last_position or last[1], last[1]) + 1,
                f"missing: the manifest says the entries end at {item.last_position}, "
                f"they end at {last[1]}",
            )
        if last is not None and self.checkpoint is None:
            raise BundleVerificationError(number, last[1], "no checkpoint covers the last entry")
        expected = (
            (first[1] if first else None),
            (last[1] if last else None),
            self.events,
            self.stubs,
            self.keys.count,
            (last[2] if last else None),
            (first[2] if first else None),
            (self.checkpoint.position if self.checkpoint and last else None),
            self.keys.digest() if self.version >= 3 else None,
        )
        found = (
            item.first_position,
            item.last_position,
            item.count,
            item.stubs,
            item.keys,
            item.head_hash,
            item.start_hash,
            item.checkpoint_position,
            item.keys_digest,
        )
        if found != expected:
            names = (
                "first_position",
                "last_position",
                "count",
                "stubs",
                "keys",
                "head_hash",
                "start_hash",
                "checkpoint_position",
                "keys_digest",
            )
            differing = [
                (n, f, e) for n, f, e in zip(names, found, expected, strict=True) if f != e
            ]
            if [n for n, _, _ in differing] == ["keys_digest"]:
                raise BundleVerificationError(
                    number,
                    0,
                    "the key entries are not the ones the manifest signs (keys_digest "
                    "differs): a key line was edited",
                )
            wrong = ", ".join(f"{n} {f!r} (bundle: {e!r})" for n, f, e in differing)
            raise BundleVerificationError(
                number, 0, "the manifest does not match the bundle: " + wrong
            )
        key = self.keys.ledger_key
        if item.signer != key.did or not key.is_valid(
            signature_bytes(item.signature), item.signed_bytes()
        ):
            raise BundleVerificationError(number, 0, "manifest signature is invalid")
        self.manifest = item

    def _finish(self) -> BundleReport:
        self._key_signatures()
        if self.header is None:
            raise BundleVerificationError(1, 0, "empty: no header")
        if self.manifest is None:
            raise BundleVerificationError(
                self.lines_seen + 1, 0, "no manifest: the bundle is truncated"
            )
        if self.keys is not None and self.last is not None and self.keys.last > self.last[1]:
            raise BundleVerificationError(
                self.lines_seen, self.keys.last, "a key entry lies after the last entry"
            )
        if self.trusted is not None:
            covered = self.frontier is not None and self.tree_size is not None
            low = self.frontier.size if self.frontier is not None else None
            if not covered or self.trusted.size > (self.tree_size or 0):
                raise BundleVerificationError(
                    self.lines_seen,
                    0,
                    f"the trusted checkpoint (size {self.trusted.size}) is not within the "
                    f"bundle's signed tree (edge {low}, head {self.tree_size}): export a "
                    "bundle whose range reaches it",
                )
        return BundleReport(
            header=self.header,
            manifest=self.manifest,
            checkpoint=self.checkpoint,
            events=self.events,
            stubs=self.stubs,
            keys=self.keys.count if self.keys else 0,
            signatures=self.signatures_done,
            signatures_checked=self.signatures,
            tree_size=self.tree_size,
            trusted_size=None if self.trusted is None else self.trusted.size,
            proofs=self.proofs,
        )
