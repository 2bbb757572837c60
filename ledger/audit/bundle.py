"""The bundle's lines: types, the JSON Lines encoding, and the checks that the
exporter and the verifier share (entry hashes, key entries, signatures).


A bundle is UTF-8 JSON Lines, one object per line, in this order:

1. header::

     {"kind": "header", "format": "agentmesh-audit-bundle", "format_version": 3,
      "from": T1, "to": T2, "agent": DID | null,
      "ledger_public_key": PEM, "generated_at": RFC 3339}

2. key entries: the ``agent.registered`` / ``agent.key_rotated`` entries of every
   agent whose signature appears on an exported event, up to the last exported
   position (also those before ``from``), in position order::

     {"kind": "key", "position", "recorded_at", "stream_id", "stream_version",
      "type", "actor", "body", "signature", "prev_hash", "entry_hash"}

   ``body`` is the canonical JSON text of the event body as a string (exactly
   the signed bytes), ``signature`` base64, the hashes hex. Each key entry's
   ``entry_hash`` recomputes from its ``prev_hash`` and envelope
   (``ledger.chain``); a registration's DID hashes from its key and is signed
   by the ledger or by the key it registers; a rotation is signed by the
   agent's previous key.

3. the entries with ``from <= recorded_at < to``, in position order: ``{"kind":
   "event", …}`` with the fields of a key entry and ``"inclusion": {"tree_size",
   "hashes"}``, the event's RFC 9162 §2.1.3 audit path (base64, bottom-up) in
   the tree of ``tree_size`` entries, the size of the signed tree head on the
   checkpoint (below). With ``agent``, an entry that
   the agent neither signed nor is the subject of is a stub, which keeps the
   chain of links continuous without showing the event::

     {"kind": "stub", "position", "prev_hash", "entry_hash"}

4. ``{"kind": "checkpoint", "origin", "position", "head_hash", "time", "signer",
   "signature", "note"}``: a checkpoint signed by the ledger at exactly the last
   exported position (absent when the range is empty); ``note`` is the same
   head as a C2SP signed tree head (``ledger.tlog``): the Merkle root of the
   ledger's first ``position`` entries, signed by the ledger key.

5. the manifest, last::

     {"kind": "manifest", "format_version": 3, "from", "to", "agent",
      "first_position", "last_position", "count", "stubs", "keys",
      "head_hash", "start_hash", "checkpoint_position", "signer", "signature",
      "generated_at", "keys_digest"}

   ``count`` counts events, ``head_hash`` is the entry hash at
   ``last_position`` and ``start_hash`` the ``prev_hash`` of
   ``first_position`` (all null in an empty bundle). ``generated_at`` is the
   header's. ``keys_digest`` is the
   SHA-256 (hex) of ``agentmesh-audit-keys\n`` followed by the 32-byte entry
   hash of every key entry in the bundle's order: the key entries before the
   range lie outside the signed tree's entries, and an entry hash covers every
   field of its line, so this is what puts their times and positions under the
   ledger's signature. ``signature`` is the ledger's Ed25519 signature over the
   RFC 8785 form of the manifest object without ``signature``, so neither end
   of the range can be cut off unseen.

   Between the header and the key entries, a bundle of a ledger that retention
   cut holds ``{"kind": "anchor", "position", "entry_hash", "cut_time",
   "keys", "snapshot_digest", "signer", "signature"}``: the agent keys as of
   the cut, signed by the ledger (``ledger.signatures.anchor_signed_bytes``).

   Just before the first entry, ``{"kind": "tree", "size", "hashes"}``: the
   Merkle tree's right edge (RFC 9162 perfect-subtree roots, base64, largest
   first) over the ``size = first_position - 1`` entries before the range.
   With it, the verifier recomputes the root at the checkpoint from the edge
   and every entry's hash (events and stubs alike) and compares it with the
   signed tree head: one range proof that the whole range, stubs included, is
   in the log the ledger signed, contiguous; it is also what holds a bundle
   against a trusted checkpoint of a size inside the range. Each event's own
   ``inclusion`` proof must lead to the same signed root: an event taken out
   of the bundle, with the note, still proves itself to any RFC 9162 client.

   Version 1 bundles (before per-event proofs) still verify, by the range
   proof alone; in version 2 an event without a proof is an error; version 3
   adds ``generated_at`` and ``keys_digest``, which version 1 and 2 manifests
   lack (their key entries' times and positions are not signed: only each
   key's own signature and, for a registration, its DID, vouch for them).

The CloudEvents flavour of the same lines is ``ledger.audit.cloudevents``.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal, TypeAlias

import msgspec

from ledger import keyhistory
from ledger.canonical import canonical_bytes, canonical_envelope
from ledger.chain import Checkpoint, Entry, RecordedEvent, entry_hash
from ledger.errors import LedgerError, VerificationError
from ledger.events import (
    AgentKeyRotated,
    AgentRegistered,
    AnyEvent,
    decode_body,
    event_type,
)
from ledger.identity import VerifyKey, b64decode, b64encode
from ledger.signatures import KeyEntryJob, anchor_signed_bytes, check_key_entries
from ledger.timefmt import format_time, parse_time

FORMAT = "agentmesh-audit-bundle"
FORMAT_VERSION = 3
FORMAT_VERSIONS = (1, 2, 3)
"""Versions the verifier reads: 1 has no per-event inclusion proofs (the range proof
only); 2 requires one on every event; 3 also signs the key entries (the manifest's
``keys_digest``) and the header's ``generated_at``, so no line can be edited unseen."""
KEYS_DIGEST_DOMAIN = b"agentmesh-audit-keys\n"
"""Prefixed to the key entries' hashes in ``keys_digest`` (``KeyHistory.digest``)."""
MEDIA_TYPE = "application/x-ndjson"
Flavour = Literal["jsonl", "cloudevents"]
FLAVOURS: tuple[Flavour, ...] = ("jsonl", "cloudevents")
_THREADED_KEYS = 256  # key entries' signatures are checked on threads from this many on


def parse_flavour(text: str) -> Flavour:
    """``jsonl`` or ``cloudevents``; ValueError otherwise."""
    for flavour in FLAVOURS:
        if text == flavour:
            return flavour
    raise ValueError(f"format must be one of {', '.join(FLAVOURS)}, got {text!r}")


Hex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
Position = Annotated[int, msgspec.Meta(ge=1, le=2**53 - 1)]
Version = Annotated[int, msgspec.Meta(ge=1, le=2**53 - 1)]


class BundleVerificationError(VerificationError):
    """A bundle failed verification at ``line`` (1-based); ``position`` is the
    ledger position concerned, or 0 when the line is not about one entry."""

    def __init__(self, line: int, position: int, reason: str) -> None:
        super().__init__(position, reason)
        self.line = line
        where = f"line {line} (position {position})" if position else f"line {line}"
        self.args = (f"{where}: {reason}",)

    def __str__(self) -> str:
        return str(self.args[0])


class LineError(LedgerError):
    """A line that is not a bundle line; the caller reports it as a
    ``BundleVerificationError`` with its line number."""


# -- the lines ------------------------------------------------------------------------


class Header(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="header"):
    format: str
    format_version: int
    from_: str = msgspec.field(name="from")
    to: str
    agent: str | None
    ledger_public_key: str
    generated_at: str


class EntryLine(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """One ledger entry with every field the chain and the signature need.

    Hashes are not pattern-checked on decode (that costs as much as hashing):
    ``entry_hash`` must equal a recomputed digest and ``prev_hash`` must parse.
    """

    position: Position
    recorded_at: str
    stream_id: str
    stream_version: Version
    type: str
    actor: str
    body: str
    signature: str
    prev_hash: str
    entry_hash: str


class KeyLine(EntryLine, frozen=True, tag="key"):
    pass


class Inclusion(msgspec.Struct, frozen=True, kw_only=True):
    """An event's RFC 9162 §2.1.3 audit path (base64 hashes, bottom-up) in the tree of
    ``tree_size`` entries: the bundle's signed tree head."""

    tree_size: Annotated[int, msgspec.Meta(ge=1, le=2**53 - 1)]
    hashes: Annotated[list[str], msgspec.Meta(max_length=64)]


class EventLine(EntryLine, frozen=True, tag="event"):
    inclusion: Inclusion | None = None


class AnchorLine(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="anchor"):
    """A retention anchor: the agent keys as of a cut whose history is gone,
    signed by the ledger with the chain hash and snapshot digest there."""

    position: Position
    entry_hash: str
    cut_time: str
    keys: dict[str, str]
    snapshot_digest: str
    signer: str
    signature: str

    def signed_bytes(self) -> bytes:
        return anchor_signed_bytes(
            self.position,
            bytes.fromhex(self.entry_hash),
            parse_time(self.cut_time),
            canonical_bytes(self.keys),
            bytes.fromhex(self.snapshot_digest),
        )


class StubLine(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="stub"):
    position: Position
    prev_hash: Hex
    entry_hash: Hex


class TreeLine(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="tree"):
    """The Merkle tree's right edge over the ``size`` entries before the range."""

    size: Annotated[int, msgspec.Meta(ge=0, le=2**53 - 1)]
    hashes: Annotated[list[str], msgspec.Meta(max_length=64)]


class CheckpointLine(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="checkpoint"):
    origin: str
    position: Position
    head_hash: str
    time: str
    signer: str
    signature: str
    note: Annotated[str, msgspec.Meta(max_length=4096)] | None = None

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(
            origin=self.origin,
            position=self.position,
            head_hash=self.head_hash,
            time=self.time,
            signer=self.signer,
            signature=self.signature,
        )


class Manifest(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="manifest"):
    """What the bundle holds, signed by the ledger (see the module docstring)."""

    format_version: int
    from_: str = msgspec.field(name="from")
    to: str
    agent: str | None
    first_position: int | None
    last_position: int | None
    count: int
    stubs: int
    keys: int
    head_hash: str | None
    start_hash: str | None
    checkpoint_position: int | None
    signer: str
    signature: str = ""
    generated_at: str | None = None
    """Version 3 on: the header's ``generated_at`` (when the bundle was exported),
    signed with the rest."""
    keys_digest: str | None = None
    """Version 3 on: SHA-256 (hex) of ``KEYS_DIGEST_DOMAIN`` and the entry hashes of
    the key entries, in the bundle's order (``KeyHistory.digest``). An entry hash
    covers every field of its line, so the ledger's signature covers the key
    section too: without it a key entry before the range (outside the signed
    tree's entries) could have its time or position edited and its hash
    recomputed unseen."""

    def signed_bytes(self) -> bytes:
        """RFC 8785 form of the manifest without ``signature`` (and without
        ``generated_at`` and ``keys_digest`` when they are absent: the signed bytes
        of a version 1 or 2 manifest are what they were).

        ``"kind": "manifest"`` is part of it, so these bytes can never be taken
        for an event body (which needs ``type``) or a checkpoint.
        """
        content = msgspec.to_builtins(self)
        assert isinstance(content, dict)
        del content["signature"]
        for added in ("generated_at", "keys_digest"):  # in version 3
            if content.get(added) is None:
                content.pop(added, None)
        return canonical_bytes(content)


Line: TypeAlias = (
    Header | AnchorLine | TreeLine | KeyLine | EventLine | StubLine | CheckpointLine | Manifest
)
LINE_TYPES: dict[str, type[Any]] = {
    "header": Header,
    "anchor": AnchorLine,
    "tree": TreeLine,
    "key": KeyLine,
    "event": EventLine,
    "stub": StubLine,
    "checkpoint": CheckpointLine,
    "manifest": Manifest,
}


jsonl_decoder = msgspec.json.Decoder(
    Header | AnchorLine | TreeLine | KeyLine | EventLine | StubLine | CheckpointLine | Manifest
)
json_encoder = msgspec.json.Encoder()

ENTRY_LINES = (EventLine, StubLine)


def entry_line(kind: type[KeyLine] | type[EventLine], record: RecordedEvent) -> Any:
    return kind(
        position=record.position,
        recorded_at=format_time(record.recorded_at),
        stream_id=record.stream_id,
        stream_version=record.stream_version,
        type=record.event_type,
        actor=record.actor,
        body=record.body.decode(),
        signature=b64encode(record.signature),
        prev_hash=record.prev_hash.hex(),
        entry_hash=record.entry_hash.hex(),
    )


# -- checks shared by the exporter and the verifier ----------------------------------------


def recomputed_hash(item: EntryLine) -> str:
    """The entry hash of a line's content: what ``ledger.chain`` hashes.

    The line's texts are the envelope's texts (the recorded_at and base64
    signature exactly as the ledger formats them), so a line that is not
    byte-for-byte the stored entry cannot reproduce its hash.
    """
    prev = bytes.fromhex(item.prev_hash)
    if len(prev) != 32:
        raise ValueError("prev_hash is not 32 bytes")
    fields: dict[str, str | int] = {
        "position": item.position,
        "recorded_at": item.recorded_at,
        "signature": item.signature,
        "stream_id": item.stream_id,
        "stream_version": item.stream_version,
    }
    return entry_hash(prev, canonical_envelope(fields, item.body.encode())).hex()


def check_hash(item: EntryLine) -> str | None:
    """None if the line's entry_hash recomputes, else the reason it does not."""
    try:
        if recomputed_hash(item) == item.entry_hash:
            return None
    except (ValueError, LedgerError):
        return "prev_hash, recorded_at or signature is malformed"
    return "entry_hash does not match the entry's content"


def decode_event(item: EntryLine) -> AnyEvent:
    """The body as an event; its type and actor must be the line's."""
    event = decode_body(item.body.encode())
    if event_type(event) != item.type:
        raise LineError(f"type {item.type!r} differs from the body's {event_type(event)!r}")
    if event.actor != item.actor:
        raise LineError(f"actor {item.actor} differs from the body's {event.actor}")
    return event


def entry_signature(item: EntryLine) -> bytes:
    raw = b64decode(item.signature, "signature")
    if len(raw) != 64:
        raise LineError("an Ed25519 signature is 64 bytes")
    return raw


def raw_key(pem: str, *, group_checked_later: bool = False) -> VerifyKey:
    """The key of a registration or rotation line. Its group is checked here unless
    the caller checks it later, off its thread (``check_key_entries``)."""
    try:
        if group_checked_later:
            return VerifyKey.from_recorded_pem(pem)
        return VerifyKey.from_pem(pem)
    except LedgerError as exc:
        raise LineError(f"invalid public key: {exc}") from exc


class KeyHistory:
    """Every agent's keys by position, folded from the bundle's key entries."""

    def __init__(self, ledger_key: VerifyKey, signatures: bool = True) -> None:
        self.ledger_key = ledger_key  # the header's: the exporter's, the ledger's latest
        self.signatures = signatures
        self.positions: dict[str, list[int]] = {}
        self.raws: dict[str, list[bytes]] = {}
        self.hashes: dict[int, str] = {}
        self.last = 0
        self.count = 0
        self.last_time = ""  # the previous agent key entry's recorded_at
        # The ledger's own key history: its ledger.key_rotated entries come first among
        # the key entries (every one, also after the range: they link the header's key
        # to the key in force at each position), then the agents' keys.
        self.rotations: list[Entry] = []
        self.ledger = keyhistory.LedgerKeys(ledger_key)
        # Key entries' signatures and the keys they install, (line, job), checked
        # together (check_signatures): a bundle of tens of thousands of signers has as
        # many key entries, and a key's group check costs about a signature's.
        self.unchecked: list[tuple[int, KeyEntryJob]] = []
        self._digest = hashlib.sha256(KEYS_DIGEST_DOMAIN)

    def digest(self) -> str:
        """The manifest's ``keys_digest`` of the key entries added so far (hex)."""
        return self._digest.hexdigest()

    def ledger_at(self, position: int) -> VerifyKey:
        """The ledger key in force at ``position`` (checkpoints and tree heads of that
        size; an event at ``position`` is signed by the key at ``position - 1``)."""
        return self.ledger.at(position)

    def ledger_segments(self) -> tuple[tuple[int, str, bytes], ...]:
        """(from position, DID, raw key) of each ledger key, for the chunk workers."""
        keys = self.ledger
        later = [(position, key.did, key.raw) for position, key in keys.rotations]
        return ((0, keys.genesis.did, keys.genesis.raw), *later)

    def add(self, line: int, item: KeyLine) -> None:
        """Fold a key entry in; its signature is checked by ``check_signatures``."""
        try:
            self._add(line, item)
        except LedgerError as exc:
            self.check_signatures()  # a bad signature on an earlier line is named first
            raise BundleVerificationError(line, item.position, reason_of(exc)) from exc

    def check_signatures(self) -> None:
        """Check the key entries added so far — their signatures and the keys they
        install — on one thread per core (libsodium releases the GIL);
        BundleVerificationError names the first line that fails."""
        pending = self.take_unchecked()
        jobs = [job for _, job in pending]
        if len(jobs) < _THREADED_KEYS:
            bad = check_key_entries(jobs)
        else:
            workers = os.cpu_count() or 1
            with ThreadPoolExecutor(max_workers=workers) as threads:
                parts = threads.map(check_key_entries, [jobs[i::workers] for i in range(workers)])
                bad = {position: why for part in parts for position, why in part.items()}
        raise_first_bad(pending, bad)

    def take_unchecked(self) -> list[tuple[int, KeyEntryJob]]:
        """The (line, job) of the key entries added since the last call; the caller
        checks them (``check_key_entries``, then ``raise_first_bad``)."""
        pending, self.unchecked = self.unchecked, []
        return pending

    def add_anchor(self, line: int, item: AnchorLine) -> None:
        """Keys as of a retention cut, trusted only under the ledger's signature."""
        try:
            if self.count or self.last:
                raise LineError("an anchor comes before every key entry")
            if item.signer != self.ledger_key.did or not self.ledger_key.is_valid(
                signature_bytes(item.signature), item.signed_bytes()
            ):
                raise LineError("the retention anchor is not signed by the ledger key")
            for did, raw in item.keys.items():
                self.positions[did] = [item.position]
                self.raws[did] = [base64.b64decode(raw, validate=True)]
        except (LineError, ValueError, binascii.Error) as exc:
            raise BundleVerificationError(line, item.position, reason_of(exc)) from exc
        self.last = item.position

    def _add(self, line: int, item: KeyLine) -> None:
        if item.type == "ledger.key_rotated":
            self._ledger_rotation(item)
            return
        # 1. in position order, each entry's own hash recomputes
        if item.position <= self.last:
            raise LineError("key entries are not in position order")
        self.last_time = _in_time_order(item, self.last_time, "key entry's")
        problem = check_hash(item)
        if problem is not None:
            raise LineError(problem)
        self._digest.update(bytes.fromhex(item.entry_hash))
        event = decode_event(item)
        if not isinstance(event, AgentRegistered | AgentKeyRotated):
            raise LineError(f"a key entry must be a registration or rotation, not {item.type}")
        self.hashes[item.position] = item.entry_hash
        self.last = item.position
        self.count += 1
        if not self.signatures:
            return  # which key is whose matters only to signatures
        # 2. a registration or a rotation, signed by the right key
        if isinstance(event, AgentRegistered):
            key = self._registration(event, item.position)
            ledger = self.ledger_at(item.position - 1)
            signer = ledger if event.actor == ledger.did else key
        else:
            key = raw_key(event.public_key, group_checked_later=True)
            signer = self._rotation(event, item.position)
        signature = entry_signature(item)
        job = (item.position, signer.raw, signature, item.body.encode())
        self.unchecked.append((line, (job, key.raw)))
        # 3. fold (a bad signature fails the bundle in check_signatures, before any entry)
        self.positions.setdefault(event.did, []).append(item.position)
        self.raws.setdefault(event.did, []).append(key.raw)

    def _ledger_rotation(self, item: KeyLine) -> None:
        """A rotation of the ledger's key: before every agent key entry, in position
        order, its hash recomputed; linked to the ones before it and, with the last,
        to the header's key (``ledger.keyhistory.history``)."""
        if self.positions or self.last or (self.rotations and item.position <= self.last_rotation):
            raise LineError("the ledger's key rotations come first, in position order")
        before = format_time(self.rotations[-1].recorded_at) if self.rotations else ""
        _in_time_order(item, before, "key rotation's")
        problem = check_hash(item)
        if problem is not None:
            raise LineError(problem)
        self._digest.update(bytes.fromhex(item.entry_hash))
        self.hashes[item.position] = item.entry_hash
        self.count += 1
        self.rotations.append(
            Entry(
                position=item.position,
                recorded_at=parse_time(item.recorded_at),
                stream_id=item.stream_id,
                stream_version=item.stream_version,
                body=item.body.encode(),
                signature=entry_signature(item),
                prev_hash=bytes.fromhex(item.prev_hash),
                entry_hash=bytes.fromhex(item.entry_hash),
            )
        )
        # Checked with or without signatures: which key is in force decides every
        # checkpoint. The header's key must be the last one installed.
        self.ledger = keyhistory.history(self.rotations)
        self.ledger.require(self.ledger_key)

    @property
    def last_rotation(self) -> int:
        return self.rotations[-1].position if self.rotations else 0

    def sealed(self) -> None:
        """After the key entries: the header's key is the ledger's latest."""
        if self.ledger.current.raw != self.ledger_key.raw:
            raise VerificationError(
                self.last_rotation,
                f"ledger key mismatch: the bundle is signed by {self.ledger_key.did}, the "
                f"ledger's last key rotation installed {self.ledger.current.did}",
            )

    def _registration(self, event: AgentRegistered, position: int) -> VerifyKey:
        key = raw_key(event.public_key, group_checked_later=True)
        if key.did != event.did:
            raise LineError(f"the public key belongs to {key.did}, not {event.did}")
        if event.did in self.positions:
            raise LineError(f"{event.did} is registered twice")
        if event.actor not in (event.did, self.ledger_at(position - 1).did):
            raise LineError("an agent is registered by the ledger or by itself")
        return key

    def _rotation(self, event: AgentKeyRotated, position: int) -> VerifyKey:
        if event.actor != event.did:
            raise LineError("a key rotation is signed by the agent itself")
        raw = self.key_at(event.did, position)
        if raw is None:
            raise LineError(f"{event.did} rotates a key but has no registration in the bundle")
        return VerifyKey.from_raw(raw)

    def key_at(self, did: str, position: int) -> bytes | None:
        """The agent's key just before ``position``."""
        return key_before(self.positions, self.raws, did, position)


def raise_first_bad(pending: list[tuple[int, KeyEntryJob]], bad: dict[int, str]) -> None:
    """BundleVerificationError at the first of ``pending`` (line, job) whose position is
    in ``bad`` (why it failed: ``check_key_entries``), if any."""
    for line, (job, _) in pending:
        if job[0] in bad:
            raise BundleVerificationError(line, job[0], bad[job[0]])


def key_before(
    positions: dict[str, list[int]], raws: dict[str, list[bytes]], did: str, position: int
) -> bytes | None:
    known = positions.get(did)
    if not known:
        return None
    index = bisect.bisect_left(known, position)
    return raws[did][index - 1] if index else None


def reason_of(exc: BaseException) -> str:
    if isinstance(exc, VerificationError):
        return exc.reason
    return str(exc)


def signature_bytes(text: str) -> bytes:
    try:
        return b64decode(text, "signature")
    except LedgerError:
        return b""


def _in_time_order(item: EntryLine, before: str, what: str) -> str:
    """``item``'s recorded_at, if it is a ledger time not before ``before`` (the one of
    the entry ahead of it in the same sequence, "" for none); else LineError."""
    recorded_at = item.recorded_at
    if not is_ledger_time(recorded_at):
        raise LineError(f"recorded_at {recorded_at!r} is not a ledger time")
    if recorded_at < before:
        raise LineError(clock_ran_back(recorded_at, before, what))
    return recorded_at


def clock_ran_back(recorded_at: str, before: str, what: str = "event's") -> str:
    """The reason for an entry recorded before the one ahead of it (``what``: whose)."""
    return (
        f"recorded_at {recorded_at} is before the previous {what} {before}: the "
        "ledger's clock never runs back"
    )


def is_ledger_time(text: str) -> bool:
    """Whether ``text`` is exactly how the ledger writes a time."""
    try:
        return format_time(parse_time(text)) == text
    except (ValueError, OverflowError):
        return False
