"""Audit bundles: a time range of the ledger that anyone can verify offline.

A bundle is UTF-8 JSON Lines, one object per line, in this order:

1. header::

     {"kind": "header", "format": "agentmesh-audit-bundle", "format_version": 1,
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
   "event", …}`` with the fields of a key entry. With ``agent``, an entry that
   the agent neither signed nor is the subject of is a stub, which keeps the
   chain of links continuous without showing the event::

     {"kind": "stub", "position", "prev_hash", "entry_hash"}

4. ``{"kind": "checkpoint", "origin", "position", "head_hash", "time", "signer",
   "signature"}``: a checkpoint signed by the ledger at exactly the last
   exported position (absent when the range is empty).

5. the manifest, last::

     {"kind": "manifest", "format_version": 1, "from", "to", "agent",
      "first_position", "last_position", "count", "stubs", "keys",
      "head_hash", "start_hash", "checkpoint_position", "signer", "signature"}

   ``count`` counts events, ``head_hash`` is the entry hash at
   ``last_position`` and ``start_hash`` the ``prev_hash`` of
   ``first_position`` (all null in an empty bundle). ``signature`` is the
   ledger's Ed25519 signature over the RFC 8785 form of the manifest object
   without ``signature``, so neither end of the range can be cut off unseen.

The CloudEvents flavour carries the same content with every line a
CloudEvents 1.0 JSON event: ``specversion`` "1.0", ``id``, ``source``,
``type``, ``time``, ``datacontenttype`` "application/json", and the extension
``amkind`` (header, key, event, stub, checkpoint, manifest). An event has
``type`` ``ai.agentmesh.<event type>``, ``source`` its actor's DID, ``id``
``<ledger DID>/<position>``, ``data_base64`` the exact canonical body bytes
and the proof fields as extensions: ``amposition``, ``amrecordedat``,
``amstreamid``, ``amstreamversion``, ``amprevhash``, ``amentryhash``,
``amsignature``. Every other line has ``type`` ``ai.agentmesh.bundle.<kind>``,
``source`` the ledger's DID and the JSON Lines object in ``data``. One
verifier checks both.

Stub lines carry no ``time``: they stand for an entry without showing it.

Export (``export_bundle``) streams the range in batches and recomputes every
link of it (and checks every stored checkpoint inside it) before the ledger
key signs anything: the covering checkpoint, when none is stored at the last
position (it is then stored, ``ON CONFLICT DO NOTHING``), and the manifest.

Verification (``verify_bundle``) is offline and names the first bad line:
the chain from the first entry (each event's hash recomputed, every
``prev_hash`` equal to the previous entry's hash, stubs included, positions
consecutive, times inside the range), every event signature against its
signer's key at that position (on a process pool), the checkpoint and
manifest signatures by the header's ledger key, and header, manifest and
content against each other. Blank lines are ignored. The header names the
ledger key; pin the one you expect with ``ledger_key``, or compare the DID
the report prints.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import collections
import contextlib
import os
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal, Protocol, TypeAlias

import asyncpg
import msgspec

from ledger import authority
from ledger.canonical import canonical_bytes, canonical_envelope
from ledger.chain import (
    CHECKPOINT_ORIGIN,
    GENESIS_HASH,
    Checkpoint,
    entry_hash,
    sign_checkpoint,
    verify_checkpoint,
)
from ledger.errors import LedgerError, StoreUnavailableError, VerificationError
from ledger.events import (
    AgentKeyRotated,
    AgentRegistered,
    AnyEvent,
    decode_body,
    event_type,
    subject_agents,
)
from ledger.identity import SigningKey, VerifyKey, b64decode, b64encode, is_did
from ledger.retention import anchor_signed_bytes
from ledger.store import PostgresLedgerReader, RecordedEvent
from ledger.timefmt import format_time, parse_time, utc_now
from ledger.verify import make_executor, verify_signature_chunk

FORMAT = "agentmesh-audit-bundle"
FORMAT_VERSION = 1
MEDIA_TYPE = "application/x-ndjson"
CE_PREFIX = "ai.agentmesh."
Flavour = Literal["jsonl", "cloudevents"]
FLAVOURS: tuple[Flavour, ...] = ("jsonl", "cloudevents")


def parse_flavour(text: str) -> Flavour:
    """``jsonl`` or ``cloudevents``; ValueError otherwise."""
    for flavour in FLAVOURS:
        if text == flavour:
            return flavour
    raise ValueError(f"format must be one of {', '.join(FLAVOURS)}, got {text!r}")


_KEY_TYPES = ("agent.registered", "agent.key_rotated")
_READ_BATCH = 2000
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)

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


# -- the lines ------------------------------------------------------------------------


class Header(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="header"):
    format: str
    format_version: int
    from_: str = msgspec.field(name="from")
    to: str
    agent: str | None
    ledger_public_key: str
    generated_at: str


class _EntryLine(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
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


class KeyLine(_EntryLine, frozen=True, tag="key"):
    pass


class EventLine(_EntryLine, frozen=True, tag="event"):
    pass


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


class CheckpointLine(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="checkpoint"):
    origin: str
    position: Position
    head_hash: str
    time: str
    signer: str
    signature: str

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

    def signed_bytes(self) -> bytes:
        """RFC 8785 form of the manifest without ``signature``.

        ``"kind": "manifest"`` is part of it, so these bytes can never be taken
        for an event body (which needs ``type``) or a checkpoint.
        """
        content = msgspec.to_builtins(self)
        assert isinstance(content, dict)
        del content["signature"]
        return canonical_bytes(content)


Line: TypeAlias = Header | AnchorLine | KeyLine | EventLine | StubLine | CheckpointLine | Manifest
_LINE_TYPES: dict[str, type[Any]] = {
    "header": Header,
    "anchor": AnchorLine,
    "key": KeyLine,
    "event": EventLine,
    "stub": StubLine,
    "checkpoint": CheckpointLine,
    "manifest": Manifest,
}


class _CloudEvent(msgspec.Struct, kw_only=True):
    """A CloudEvents 1.0 line (JSON format) with our extension attributes."""

    specversion: str
    id: str
    source: str
    type: str
    amkind: str
    time: str | None = None
    datacontenttype: str | None = None
    data: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    data_base64: str | None = None
    amposition: Position | None = None
    amrecordedat: str | None = None
    amstreamid: str | None = None
    amstreamversion: Version | None = None
    amprevhash: str | None = None
    amentryhash: str | None = None
    amsignature: str | None = None


_jsonl_decoder = msgspec.json.Decoder(
    Header | AnchorLine | KeyLine | EventLine | StubLine | CheckpointLine | Manifest
)
_ce_decoder = msgspec.json.Decoder(_CloudEvent)
_encoder = msgspec.json.Encoder()


class _LineError(Exception):
    """A line that is not a bundle line (reported by the caller with its number)."""


_ENTRY_LINES = (EventLine, StubLine)


def _decode_line(raw: bytes, cloudevents: bool) -> Line:
    try:
        if not cloudevents:
            line: Line = _jsonl_decoder.decode(raw)
            return line
        return _from_cloudevent(_ce_decoder.decode(raw))
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise _LineError(f"not a bundle line: {exc}") from exc


def _from_cloudevent(ce: _CloudEvent) -> Line:
    if ce.specversion != "1.0":
        raise _LineError(f"specversion {ce.specversion!r} is not CloudEvents 1.0")
    if ce.datacontenttype != "application/json" or not ce.id or not ce.source:
        raise _LineError("a CloudEvent needs id, source and datacontenttype application/json")
    if ce.amkind != "event":
        kind = _LINE_TYPES.get(ce.amkind)
        if kind is None or ce.type != f"{CE_PREFIX}bundle.{ce.amkind}" or not len(ce.data):
            raise _LineError(f"amkind {ce.amkind!r} with type {ce.type!r} is not a bundle line")
        line: Line = msgspec.json.decode(ce.data, type=kind)
        return line
    if not ce.type.startswith(CE_PREFIX) or ce.data_base64 is None:
        raise _LineError("an event needs type ai.agentmesh.<event type> and data_base64")
    try:
        body = base64.b64decode(ce.data_base64, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise _LineError("data_base64 is not base64 of UTF-8 JSON") from exc
    if (
        ce.amposition is None
        or ce.amrecordedat is None
        or ce.amstreamid is None
        or ce.amstreamversion is None
        or ce.amprevhash is None
        or ce.amentryhash is None
        or ce.amsignature is None
    ):
        raise _LineError("an event needs every am* proof attribute")
    # The decoder checked every attribute's type and range; no second validation pass.
    return EventLine(
        position=ce.amposition,
        recorded_at=ce.amrecordedat,
        stream_id=ce.amstreamid,
        stream_version=ce.amstreamversion,
        type=ce.type[len(CE_PREFIX) :],
        actor=ce.source,
        body=body,
        signature=ce.amsignature,
        prev_hash=ce.amprevhash,
        entry_hash=ce.amentryhash,
    )


def _ce_entry_decoder(raw: bytes) -> Line:
    return _from_cloudevent(_ce_decoder.decode(raw))


def _is_cloudevents(raw: bytes) -> bool:
    """Which flavour a bundle is, from its first line."""
    try:
        first = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return False
    return isinstance(first, dict) and "specversion" in first


class _Encoder:
    """Writes lines in one flavour."""

    def __init__(self, flavour: Flavour, ledger_did: str, generated_at: str) -> None:
        self.cloudevents = flavour == "cloudevents"
        self.ledger_did = ledger_did
        self.generated_at = generated_at

    def line(self, item: Line) -> bytes:
        if not self.cloudevents:
            return _encoder.encode(item) + b"\n"
        if isinstance(item, EventLine):
            return self._event(item)
        kind = item.__struct_config__.tag
        assert isinstance(kind, str)
        ident, time = self._id_and_time(item, kind)
        ce: dict[str, Any] = {
            "specversion": "1.0",
            "id": ident,
            "source": self.ledger_did,
            "type": f"{CE_PREFIX}bundle.{kind}",
        }
        if time is not None:
            ce["time"] = time
        ce["datacontenttype"] = "application/json"
        ce["data"] = msgspec.Raw(_encoder.encode(item))
        ce["amkind"] = kind
        return _encoder.encode(ce) + b"\n"

    def _id_and_time(self, item: Line, kind: str) -> tuple[str, str | None]:
        match item:
            case KeyLine():
                return f"{self.ledger_did}/key/{item.position}", item.recorded_at
            case StubLine():
                return f"{self.ledger_did}/{item.position}", None
            case CheckpointLine():
                return f"{self.ledger_did}/checkpoint/{item.position}", item.time
        return f"{self.ledger_did}/bundle/{self.generated_at}/{kind}", self.generated_at

    def _event(self, item: EventLine) -> bytes:
        ce = {
            "specversion": "1.0",
            "id": f"{self.ledger_did}/{item.position}",
            "source": item.actor,
            "type": CE_PREFIX + item.type,
            "time": item.recorded_at,
            "datacontenttype": "application/json",
            "data_base64": b64encode(item.body.encode()),
            "amkind": "event",
            "amposition": item.position,
            "amrecordedat": item.recorded_at,
            "amstreamid": item.stream_id,
            "amstreamversion": item.stream_version,
            "amprevhash": item.prev_hash,
            "amentryhash": item.entry_hash,
            "amsignature": item.signature,
        }
        return _encoder.encode(ce) + b"\n"


def _entry_line(kind: type[KeyLine] | type[EventLine], record: RecordedEvent) -> Any:
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


def _recomputed_hash(item: _EntryLine) -> str:
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


def _check_hash(item: _EntryLine) -> str | None:
    """None if the line's entry_hash recomputes, else the reason it does not."""
    try:
        if _recomputed_hash(item) == item.entry_hash:
            return None
    except (ValueError, LedgerError):
        return "prev_hash, recorded_at or signature is malformed"
    return "entry_hash does not match the entry's content"


def _decode_event(item: _EntryLine) -> AnyEvent:
    """The body as an event; its type and actor must be the line's."""
    event = decode_body(item.body.encode())
    if event_type(event) != item.type:
        raise _LineError(f"type {item.type!r} differs from the body's {event_type(event)!r}")
    if event.actor != item.actor:
        raise _LineError(f"actor {item.actor} differs from the body's {event.actor}")
    return event


def _signature(item: _EntryLine) -> bytes:
    raw = b64decode(item.signature, "signature")
    if len(raw) != 64:
        raise _LineError("an Ed25519 signature is 64 bytes")
    return raw


def _raw_key(pem: str) -> VerifyKey:
    try:
        return VerifyKey.from_pem(pem)
    except LedgerError as exc:
        raise _LineError(f"invalid public key: {exc}") from exc


class _KeyHistory:
    """Every agent's keys by position, folded from the bundle's key entries."""

    def __init__(self, ledger_key: VerifyKey, signatures: bool = True) -> None:
        self.ledger_key = ledger_key
        self.signatures = signatures
        self.positions: dict[str, list[int]] = {}
        self.raws: dict[str, list[bytes]] = {}
        self.hashes: dict[int, str] = {}
        self.last = 0
        self.count = 0

    def add(self, line: int, item: KeyLine) -> None:
        try:
            self._add(item)
        except (_LineError, LedgerError) as exc:
            raise BundleVerificationError(line, item.position, _reason(exc)) from exc

    def add_anchor(self, line: int, item: AnchorLine) -> None:
        """Keys as of a retention cut, trusted only under the ledger's signature."""
        try:
            if self.count or self.last:
                raise _LineError("an anchor comes before every key entry")
            if item.signer != self.ledger_key.did or not self.ledger_key.is_valid(
                _signature_text(item.signature), item.signed_bytes()
            ):
                raise _LineError("the retention anchor is not signed by the ledger key")
            for did, raw in item.keys.items():
                self.positions[did] = [item.position]
                self.raws[did] = [base64.b64decode(raw, validate=True)]
        except (_LineError, ValueError, binascii.Error) as exc:
            raise BundleVerificationError(line, item.position, _reason(exc)) from exc
        self.last = item.position

    def _add(self, item: KeyLine) -> None:
        # 1. in position order, each entry's own hash recomputes
        if item.position <= self.last:
            raise _LineError("key entries are not in position order")
        problem = _check_hash(item)
        if problem is not None:
            raise _LineError(problem)
        event = _decode_event(item)
        if not isinstance(event, AgentRegistered | AgentKeyRotated):
            raise _LineError(f"a key entry must be a registration or rotation, not {item.type}")
        self.hashes[item.position] = item.entry_hash
        self.last = item.position
        self.count += 1
        if not self.signatures:
            return  # which key is whose matters only to signatures
        # 2. a registration or a rotation, signed by the right key
        if isinstance(event, AgentRegistered):
            key = self._registration(event)
            signer = self.ledger_key if event.actor == self.ledger_key.did else key
        else:
            key = _raw_key(event.public_key)
            signer = self._rotation(event, item.position)
        if not signer.is_valid(_signature(item), item.body.encode()):
            raise _LineError("signature does not verify")
        # 3. fold
        self.positions.setdefault(event.did, []).append(item.position)
        self.raws.setdefault(event.did, []).append(key.raw)

    def _registration(self, event: AgentRegistered) -> VerifyKey:
        key = _raw_key(event.public_key)
        if key.did != event.did:
            raise _LineError(f"the public key belongs to {key.did}, not {event.did}")
        if event.did in self.positions:
            raise _LineError(f"{event.did} is registered twice")
        if event.actor not in (event.did, self.ledger_key.did):
            raise _LineError("an agent is registered by the ledger or by itself")
        return key

    def _rotation(self, event: AgentKeyRotated, position: int) -> VerifyKey:
        if event.actor != event.did:
            raise _LineError("a key rotation is signed by the agent itself")
        raw = self.key_at(event.did, position)
        if raw is None:
            raise _LineError(f"{event.did} rotates a key but has no registration in the bundle")
        return VerifyKey.from_raw(raw)

    def key_at(self, did: str, position: int) -> bytes | None:
        """The agent's key just before ``position``."""
        return _key_at(self.positions, self.raws, did, position)


def _key_at(
    positions: dict[str, list[int]], raws: dict[str, list[bytes]], did: str, position: int
) -> bytes | None:
    known = positions.get(did)
    if not known:
        return None
    index = bisect.bisect_left(known, position)
    return raws[did][index - 1] if index else None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, VerificationError):
        return exc.reason
    return str(exc)


# -- verification of entries in chunks (runs on worker processes) ----------------------


@dataclass(frozen=True, slots=True)
class _Task:
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
    ledger: tuple[str, bytes]
    positions: dict[str, list[int]]
    raws: dict[str, list[bytes]]
    key_hashes: dict[int, str]


@dataclass(frozen=True, slots=True)
class _Result:
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

    def shifted(self, delta: int) -> _Result:
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
            rest=[(number + delta, raw) for number, raw in self.rest],
        )


def check_chunk(task: _Task) -> _Result:
    """Check a run of entry lines; report the first problem (line, position, reason)."""
    return _ChunkCheck(task).run()


def _task_lines(task: _Task) -> list[bytes]:
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
    def __init__(self, task: _Task) -> None:
        self.task = task
        self.jobs: list[tuple[int, bytes, bytes, bytes]] = []
        self.job_lines: list[int] = []
        self.events = 0
        self.stubs = 0
        self.first: tuple[int, int, str] | None = None
        self.last: tuple[int, int, str] | None = None

    def run(self) -> _Result:
        rest: list[tuple[int, bytes]] = []
        error: tuple[int, int, str] | None = None
        lines = _task_lines(self.task)
        decode = _ce_entry_decoder if self.task.cloudevents else _jsonl_decoder.decode
        for offset, raw in enumerate(lines):
            if not raw or raw.isspace():
                continue
            try:
                item = decode(raw)
            except (msgspec.DecodeError, _LineError):
                item = None  # the caller reports it, in order, with the lines after it
            if not isinstance(item, _ENTRY_LINES):
                rest = [
                    (self.task.first_line + i, line)
                    for i, line in enumerate(lines[offset:], start=offset)
                ]
                break
            error = self._entry(self.task.first_line + offset, item)
            if error is not None:
                break
        error = self._signatures(error)
        return _Result(
            events=self.events,
            stubs=self.stubs,
            first=self.first,
            last=self.last,
            rest=[] if error else rest,
            error=error,
            signatures=len(self.jobs),
            lines=len(lines),
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
        known = self.task.key_hashes.get(item.position)
        if problem is None and known is not None and known != item.entry_hash:
            problem = "differs from the key entry at this position"
        if problem is not None:
            return number, item.position, problem
        self.last = (number, item.position, item.entry_hash)
        if isinstance(item, EventLine):
            self.events += 1
        else:
            self.stubs += 1
        return None

    def _event(self, number: int, item: EventLine) -> str | None:
        low, high = self.task.span
        if not low <= item.recorded_at < high:
            return f"recorded_at {item.recorded_at} is outside the bundle's range"
        problem = _check_hash(item)
        if problem is not None or not self.task.signatures:
            return problem
        try:
            job = self._job(item)
        except (_LineError, LedgerError) as exc:
            return _reason(exc)
        self.jobs.append(job)
        self.job_lines.append(number)
        return None

    def _job(self, item: EventLine) -> tuple[int, bytes, bytes, bytes]:
        event = _decode_event(item)
        agent = self.task.agent
        if agent is not None and agent != event.actor and agent not in subject_agents(event):
            raise _LineError(f"neither signed by nor about {agent}")
        ledger_did, ledger_raw = self.task.ledger
        if event.actor == ledger_did:
            key = ledger_raw
        elif isinstance(event, AgentRegistered) and event.actor == event.did:
            key = _raw_key(event.public_key).raw
        else:
            found = _key_at(self.task.positions, self.task.raws, event.actor, item.position)
            if found is None:
                raise _LineError(f"signed by {event.actor}, which has no key entry before it")
            key = found
        if isinstance(event, AgentRegistered) and _raw_key(event.public_key).did != event.did:
            raise _LineError(f"the public key does not belong to {event.did}")
        body = item.body.encode()
        # The append rules one event shows by itself (who may sign it, its id, real and
        # fresh times, a rotation's proof); `ledger verify` replays the stateful ones.
        authority.check_static(event, body, parse_time(item.recorded_at), ledger_did)
        return item.position, key, _signature(item), body

    def _signatures(self, error: tuple[int, int, str] | None) -> tuple[int, int, str] | None:
        """The first bad signature, if it precedes ``error``; else ``error``."""
        if not self.jobs:
            return error
        bad = verify_signature_chunk(self.jobs)
        if not bad:
            return error
        index = next(i for i, job in enumerate(self.jobs) if job[0] == min(bad))
        return self.job_lines[index], min(bad), "signature does not verify"


# -- the verifier ---------------------------------------------------------------------


Source: TypeAlias = str | os.PathLike[str] | Iterable[str | bytes]
Progress = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class BundleReport:
    """A verified bundle: what it holds and what was checked."""

    header: Header
    manifest: Manifest
    checkpoint: Checkpoint | None
    events: int
    stubs: int
    keys: int
    signatures: int
    signatures_checked: bool

    @property
    def ledger_did(self) -> str:
        return self.manifest.signer

    def summary(self) -> str:
        m = self.manifest
        if m.first_position is None:
            return (
                f"bundle OK: no events from {m.from_} to {m.to}, "
                f"manifest signed by {self.ledger_did}"
            )
        what = f"{self.events} events"
        if m.agent is not None:
            what += f" and {self.stubs} stubs for {m.agent}"
        unchecked = "" if self.signatures_checked else " (event signatures not checked)"
        return (
            f"bundle OK{unchecked}: {what} (positions {m.first_position}..{m.last_position}), "
            f"{self.keys} keys, checkpoint {m.checkpoint_position} signed by {self.ledger_did}"
        )


def verify_bundle(
    source: Source,
    *,
    workers: int | None = None,
    signatures: bool = True,
    ledger_key: VerifyKey | None = None,
    executor: Executor | None = None,
    progress: Progress | None = None,
    chunk: int | None = None,
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
    read so far. OSError propagates when the path cannot be read.
    """
    verifier = _BundleVerifier(
        signatures=signatures,
        ledger_key=ledger_key,
        workers=(os.cpu_count() or 1) if workers is None else workers,
        executor=executor,
        chunk=chunk or 2000,
        progress=progress,
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
    ) -> None:
        self.progress = progress
        self.signatures = signatures
        self.pinned = ledger_key
        self.workers = workers
        self.executor = executor
        self.own_executor: Executor | None = None
        self.chunk = chunk
        self.cloudevents = False
        self.header: Header | None = None
        self.keys: _KeyHistory | None = None
        self.events = 0
        self.stubs = 0
        self.signatures_done = 0
        self.first: tuple[int, int, str] | None = None
        self.last: tuple[int, int, str] | None = None
        self.checkpoint: Checkpoint | None = None
        self.manifest: Manifest | None = None
        self.lines_seen = 0
        self.next_line = 0  # the number of the next region's first line

    # 1. header and key entries, in this process
    def run(self, source: Source) -> BundleReport:
        try:
            if isinstance(source, str | os.PathLike):
                with open(source, "rb") as handle:
                    self._read_file(handle, os.fspath(source))
            else:
                self._read_lines(_counted(source, self.progress))
            return self._finish()
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
        elif isinstance(item, EventLine | StubLine):
            return True
        else:
            self._tail(number, item)
        return False

    def _decode(self, number: int, raw: bytes) -> Line:
        try:
            return _decode_line(raw, self.cloudevents)
        except _LineError as exc:
            raise BundleVerificationError(number, 0, str(exc)) from None

    def _header(self, number: int, raw: bytes) -> None:
        self.cloudevents = _is_cloudevents(raw)
        item = self._decode(number, raw)
        if not isinstance(item, Header):
            raise BundleVerificationError(number, 0, "the first line is not a bundle header")
        if item.format != FORMAT or item.format_version != FORMAT_VERSION:
            raise BundleVerificationError(
                number, 0, f"not a {FORMAT} version {FORMAT_VERSION} header"
            )
        for name, text in (("from", item.from_), ("to", item.to)):
            if not _is_ledger_time(text):
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
        self.keys = _KeyHistory(key, self.signatures)

    # 2. entries, in chunks on the workers
    def _line_tasks(
        self, number: int, raw: bytes, lines: Iterator[tuple[int, bytes]]
    ) -> Iterator[_Task]:
        start, batch = number, [raw]
        for number, raw in lines:
            self.lines_seen = number
            batch.append(raw)
            if len(batch) >= self.chunk:
                yield self._task(start, batch)
                start, batch = number + 1, []
        if batch:
            yield self._task(start, batch)

    def _file_tasks(self, handle: BinaryIO, path: str, offset: int, number: int) -> Iterator[_Task]:
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

    def _entries(self, tasks: Iterator[_Task]) -> None:
        """Check tasks in order; a pool only once there is more than one."""
        pending: collections.deque[tuple[Future[_Result] | None, _Task]] = collections.deque()
        held: _Task | None = None
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
    ) -> _Task:
        assert self.header is not None
        assert self.keys is not None
        ledger = self.keys.ledger_key
        with_keys = self.signatures
        return _Task(
            lines=batch,
            region=region,
            first_line=start,
            cloudevents=self.cloudevents,
            signatures=self.signatures,
            span=(self.header.from_, self.header.to),
            agent=self.header.agent,
            ledger=(ledger.did, ledger.raw),
            positions=self.keys.positions if with_keys else {},
            raws=self.keys.raws if with_keys else {},
            key_hashes=self.keys.hashes,
        )

    def _submit(self, task: _Task, *, pool: bool) -> tuple[Future[_Result] | None, _Task]:
        if not pool or self.workers == 0:
            return None, task  # checked in this process when collected
        if self.executor is None:
            self.own_executor = self.executor = make_executor(self.workers)
        return self.executor.submit(check_chunk, task), task

    def _collect(self, future: Future[_Result] | None, task: _Task) -> None:
        result = check_chunk(task) if future is None else future.result()
        if task.region is not None:  # region lines are numbered from 1: make them absolute
            result = result.shifted(self.next_line - 1)
            self.next_line += result.lines
            self.lines_seen = self.next_line - 1
        if result.first is not None:
            self._link(result.first)
        if result.error is not None:
            raise BundleVerificationError(*result.error)
        self.events += result.events
        self.stubs += result.stubs
        self.signatures_done += result.signatures
        if result.last is not None:
            self.last = result.last
        for number, raw in result.rest:
            if raw.strip():
                self._tail(number, self._decode(number, raw))

    def _link(self, first: tuple[int, int, str]) -> None:
        number, position, prev_hash = first
        if self.manifest is not None:
            raise BundleVerificationError(number, 0, "a line after the manifest")
        if self.checkpoint is not None:
            raise BundleVerificationError(number, position, "an entry after the checkpoint")
        if self.last is None:
            self.first = first
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
            verify_checkpoint(checkpoint, self.keys.ledger_key)
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
        self.checkpoint = checkpoint

    def _manifest(self, number: int, item: Manifest) -> None:
        assert self.header is not None
        assert self.keys is not None
        header, first, last = self.header, self.first, self.last
        if (item.from_, item.to, item.agent, item.format_version) != (
            header.from_,
            header.to,
            header.agent,
            FORMAT_VERSION,
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
            )
            wrong = [
                f"{n} {f!r} (bundle: {e!r})"
                for n, f, e in zip(names, found, expected, strict=True)
                if f != e
            ]
            raise BundleVerificationError(
                number, 0, "the manifest does not match the bundle: " + ", ".join(wrong)
            )
        key = self.keys.ledger_key
        if item.signer != key.did or not key.is_valid(
            _signature_text(item.signature), item.signed_bytes()
        ):
            raise BundleVerificationError(number, 0, "manifest signature is invalid")
        self.manifest = item

    def _finish(self) -> BundleReport:
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
        return BundleReport(
            header=self.header,
            manifest=self.manifest,
            checkpoint=self.checkpoint,
            events=self.events,
            stubs=self.stubs,
            keys=self.keys.count if self.keys else 0,
            signatures=self.signatures_done,
            signatures_checked=self.signatures,
        )


def _signature_text(text: str) -> bytes:
    try:
        return b64decode(text, "signature")
    except LedgerError:
        return b""


def _is_ledger_time(text: str) -> bool:
    """Whether ``text`` is exactly how the ledger writes a time."""
    try:
        return format_time(parse_time(text)) == text
    except (ValueError, OverflowError):
        return False


# -- reading a bundle (for replay) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bundle:
    """A bundle's content; entries as the store returns them. Not verified:
    run ``verify_bundle`` on the same file first."""

    header: Header
    keys: list[RecordedEvent]
    events: list[RecordedEvent]
    checkpoint: Checkpoint | None
    manifest: Manifest | None


def read_bundle(path: Path | str) -> Bundle:
    """Parse a bundle of either flavour (events only; stubs are skipped).

    ``subjects`` of each entry are derived from its body as the store derives
    them (the agents it is about, plus its actor unless that is the ledger).
    Raises ``BundleVerificationError`` for a line that does not parse.
    """
    reading = _Reading()
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                reading.add(number, raw)
    if reading.header is None:
        raise BundleVerificationError(1, 0, "empty: no header")
    return Bundle(
        header=reading.header,
        keys=reading.keys,
        events=reading.events,
        checkpoint=reading.checkpoint,
        manifest=reading.manifest,
    )


@dataclass
class _Reading:
    header: Header | None = None
    ledger_did: str = ""
    cloudevents: bool = False
    keys: list[RecordedEvent] = field(default_factory=list)
    events: list[RecordedEvent] = field(default_factory=list)
    checkpoint: Checkpoint | None = None
    manifest: Manifest | None = None

    def add(self, number: int, raw: bytes) -> None:
        if self.header is None:
            self.cloudevents = _is_cloudevents(raw)
        position = 0
        try:
            item = _decode_line(raw, self.cloudevents)
            position = getattr(item, "position", 0)
            if self.header is None:
                if not isinstance(item, Header):
                    raise _LineError("the first line is not a bundle header")
                self.header = item
                self.ledger_did = VerifyKey.from_pem(item.ledger_public_key).did
                return
            match item:
                case KeyLine():
                    self.keys.append(_recorded(item, self.ledger_did))
                case EventLine():
                    self.events.append(_recorded(item, self.ledger_did))
                case CheckpointLine():
                    self.checkpoint = item.checkpoint()
                case Manifest():
                    self.manifest = item
                case Header():
                    raise _LineError("a second header")
        except (_LineError, LedgerError, ValueError) as exc:
            raise BundleVerificationError(number, position, _reason(exc)) from None


def _recorded(item: _EntryLine, ledger_did: str) -> RecordedEvent:
    body = item.body.encode()
    event = decode_body(body)
    subjects = set(subject_agents(event))
    if event.actor != ledger_did:
        subjects.add(event.actor)
    return RecordedEvent(
        position=item.position,
        recorded_at=parse_time(item.recorded_at),
        stream_id=item.stream_id,
        stream_version=item.stream_version,
        body=body,
        signature=b64decode(item.signature, "signature"),
        prev_hash=bytes.fromhex(item.prev_hash),
        entry_hash=bytes.fromhex(item.entry_hash),
        event_type=item.type,
        actor=item.actor,
        subjects=tuple(sorted(subjects)),
    )


# -- export -------------------------------------------------------------------------------


class Writer(Protocol):
    def write(self, text: str, /) -> object: ...


ExportProgress = Callable[[int, int], None]  # (entries written, entries in the range)
Clock = Callable[[], datetime]


async def retention_anchor_line(reader: PostgresLedgerReader) -> AnchorLine | None:
    """The latest retention anchor as a bundle line, when retention cut the ledger's
    start: the keys of agents registered before the cut live only there."""
    row = await reader.pool.fetchrow(
        "SELECT position, entry_hash, cut_time, keys, snapshot_digest, signer, "
        "encode(signature, 'base64') AS signature FROM retention_anchors "
        "ORDER BY position DESC LIMIT 1"
    )
    if row is None:
        return None
    return AnchorLine(
        position=row["position"],
        entry_hash=bytes(row["entry_hash"]).hex(),
        cut_time=format_time(row["cut_time"]),
        keys=msgspec.json.decode(bytes(row["keys"])),
        snapshot_digest=bytes(row["snapshot_digest"]).hex(),
        signer=row["signer"],
        signature=row["signature"].replace("\n", ""),
    )


async def export_bundle(
    reader: PostgresLedgerReader,
    ledger_key: SigningKey,
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
    (and every stored checkpoint in it) before the ledger key signs anything;
    a covering checkpoint is signed and stored when none exists at the last
    position. Raises ValueError for bad arguments, VerificationError when the
    stored ledger does not verify, StoreUnavailableError when the database fails.
    """
    export = await prepare_export(
        reader, ledger_key, start=start, end=end, agent=agent, fmt=fmt, clock=clock
    )
    async for text in export.chunks(progress):
        out.write(text)
    assert export.manifest is not None
    return export.manifest


async def prepare_export(
    reader: PostgresLedgerReader,
    ledger_key: SigningKey,
    *,
    start: datetime,
    end: datetime,
    agent: str | None = None,
    fmt: Flavour = "jsonl",
    clock: Clock = utc_now,
) -> BundleExport:
    """Check the arguments and find the range; ``chunks()`` then streams the bundle."""
    parse_flavour(fmt)
    if agent is not None and not is_did(agent):
        raise ValueError(f"{agent!r} is not a DID like did:mesh:<32 hex>")
    for name, moment in (("from", start), ("to", end)):
        if moment.tzinfo is None or not _is_ledger_time(format_time(moment)):
            raise ValueError(f"{name} is not a timezone-aware time the ledger can write")
    if not start < end:
        raise ValueError("from must be earlier than to")
    export = BundleExport(reader, ledger_key, start, end, agent, fmt, clock)
    await export.load()
    return export


class BundleExport:
    """One export: the range, the key entries, then ``chunks()`` of bundle text."""

    def __init__(
        self,
        reader: PostgresLedgerReader,
        key: SigningKey,
        start: datetime,
        end: datetime,
        agent: str | None,
        fmt: Flavour,
        clock: Clock,
    ) -> None:
        self.reader = reader
        self.key = key
        self.agent = agent
        self.clock = clock
        self.span = (format_time(start), format_time(end))
        self.bounds = (start, end)
        self.encoder = _Encoder(fmt, key.did, format_time(clock()))
        self.first: int | None = None
        self.last: int | None = None
        self.key_records: list[RecordedEvent] = []
        self.stored: dict[int, str] = {}
        self.manifest: Manifest | None = None

    @property
    def filename(self) -> str:
        stamp = self.span[0].replace(":", "").replace("-", "")[:15]
        suffix = ".cloudevents.jsonl" if self.encoder.cloudevents else ".jsonl"
        return f"agentmesh-audit-{stamp}{suffix}"

    async def load(self) -> None:
        """Find the positions in the range and the key entries they need."""
        row = await _fetchrow(
            self.reader,
            "SELECT min(position) AS first, max(position) AS last FROM events "
            "WHERE recorded_at >= $1 AND recorded_at < $2",
            *self.bounds,
        )
        if row is None or row["first"] is None:
            return
        self.first, self.last = int(row["first"]), int(row["last"])
        actors = await self._signers()
        if actors:
            self.key_records = await self._key_records(actors)
        self.stored = await self._stored_checkpoints()

    async def _signers(self) -> list[str]:
        """Every agent (not the ledger) who signed an event that will be exported."""
        query = (
            "SELECT DISTINCT actor FROM events WHERE position BETWEEN $1 AND $2 "
            "AND recorded_at >= $3 AND recorded_at < $4 AND actor <> $5"
        )
        args: list[object] = [self.first, self.last, *self.bounds, self.key.did]
        if self.agent is not None:
            query += " AND subjects @> ARRAY[$6]::text[]"
            args.append(self.agent)
        return [r["actor"] for r in await _fetch(self.reader, query, *args)]

    async def _key_records(self, actors: list[str]) -> list[RecordedEvent]:
        rows = await _fetch(
            self.reader,
            "SELECT position, recorded_at, stream_id, stream_version, event_type, actor, "
            "subjects, body, signature, prev_hash, entry_hash FROM events "
            "WHERE event_type = ANY($1::text[]) AND position <= $2 AND subjects && $3::text[] "
            "ORDER BY position",
            list(_KEY_TYPES),
            self.last,
            actors,
        )
        wanted = set(actors)
        records = [_record(row) for row in rows]
        return [r for r in records if _did_of(r) in wanted]

    async def _stored_checkpoints(self) -> dict[int, str]:
        """Stored checkpoints by our key in the range (and just before it), verified."""
        assert self.first is not None
        assert self.last is not None
        found: dict[int, str] = {}
        after = self.first - 2
        while True:
            page = await self.reader.checkpoints(after=after, limit=10_000)
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
        keys = _KeyHistory(self.key.public)
        lines = [self.encoder.line(header)]
        anchor = await retention_anchor_line(self.reader)
        if anchor is not None:
            keys.add_anchor(2, anchor)  # verify before writing, like the key entries
            lines.append(self.encoder.line(anchor))
        for number, record in enumerate(self.key_records, start=3 if anchor else 2):
            item = _entry_line(KeyLine, record)
            keys.add(number, item)  # the key section must verify before it is written
            lines.append(self.encoder.line(item))
        yield b"".join(lines).decode()
        state = _ExportState()
        if self.first is not None:
            # aclosing: a client that goes away mid-stream closes the inner generators
            # now (and cancels the prefetched read), not whenever they are collected.
            async with contextlib.aclosing(self._entries(state, progress)) as entries:
                async for text in entries:
                    yield text
        yield (await self._tail(state, keys.count)).decode()

    async def _entries(
        self, state: _ExportState, progress: ExportProgress | None
    ) -> AsyncGenerator[str, None]:
        assert self.first is not None
        assert self.last is not None
        total = self.last - self.first + 1
        state.prev = await self._anchor()
        async with contextlib.aclosing(self._batches()) as batches:
            async for batch in batches:
                lines = [self._entry(state, record) for record in batch]
                if progress is not None:
                    progress(state.events + state.stubs, total)
                yield b"".join(lines).decode()
        if state.last_position != self.last:
            raise VerificationError(state.last_position + 1, "missing: the range ends early")

    async def _batches(self) -> AsyncGenerator[list[RecordedEvent], None]:
        """Entries first..last, the next batch read while this one is written."""
        assert self.first is not None
        assert self.last is not None
        last = self.last

        def read(after: int) -> asyncio.Task[list[RecordedEvent]]:
            limit = min(_READ_BATCH, last - after)
            return asyncio.create_task(self.reader.read(after, limit))

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
        before = await self.reader.entry_at(self.first - 1)
        if before is None:  # removed by retention: a checkpoint there, if any, is the anchor
            stored = self.stored.get(self.first - 1)
            return None if stored is None else bytes.fromhex(stored)
        if entry_hash(before.prev_hash, before.envelope()) != before.entry_hash:
            raise VerificationError(
                before.position, "entry_hash does not match the entry's content"
            )
        return before.entry_hash

    def _entry(self, state: _ExportState, record: RecordedEvent) -> bytes:
        # 1. the link, recomputed from the very texts written (never sign what was not
        #    checked); the same checks, in the same order, as ledger.chain.check_link
        assert self.first is not None
        line: EventLine = _entry_line(EventLine, record)
        expected = state.last_position + 1 if state.last_position else self.first
        if record.position != expected:
            raise VerificationError(
                expected,
                f"missing or out of order: expected position {expected}, found {record.position}",
            )
        if state.prev is not None and record.prev_hash != state.prev:
            raise VerificationError(record.position, "prev_hash does not match the previous entry")
        problem = _check_hash(line)
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
        # 2. the line
        if self.agent is None or self.agent in record.subjects:
            state.events += 1
            return self.encoder.line(line)
        state.stubs += 1
        stub = StubLine(
            position=line.position, prev_hash=line.prev_hash, entry_hash=line.entry_hash
        )
        return self.encoder.line(stub)

    async def _tail(self, state: _ExportState, keys: int) -> bytes:
        lines = []
        checkpoint: Checkpoint | None = None
        if self.first is not None:
            assert state.prev is not None
            checkpoint = await self._covering_checkpoint(state.last_position, state.prev)
            lines.append(
                self.encoder.line(
                    CheckpointLine(
                        origin=checkpoint.origin,
                        position=checkpoint.position,
                        head_hash=checkpoint.head_hash,
                        time=checkpoint.time,
                        signer=checkpoint.signer,
                        signature=checkpoint.signature,
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
            keys=keys,
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
        page = await self.reader.checkpoints(after=position - 1, limit=1)
        existing = page[0] if page and page[0].position == position else None
        if existing is None:
            existing = await sign_checkpoint_at(
                self.reader.pool, self.key, position, head_hash, self.clock()
            )
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


async def sign_checkpoint_at(
    pool: asyncpg.Pool, key: SigningKey, position: int, head_hash: bytes, moment: datetime
) -> Checkpoint:
    """Sign that the chain had ``head_hash`` at ``position`` and store it; return
    the checkpoint stored at ``position`` (an earlier one wins: ON CONFLICT DO NOTHING).

    The INSERT only happens if the stored entry at ``position`` has exactly
    ``head_hash``, so this never signs a chain the database does not hold.
    Callers recompute the links up to ``position`` first.
    """
    checkpoint = sign_checkpoint(key, position, head_hash, moment)
    try:
        async with pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO checkpoints (position, head_hash, time, signer, signature) "
                "SELECT $1, $2, $3, $4, decode($5, 'base64') WHERE EXISTS "
                "(SELECT 1 FROM events WHERE position = $1 AND entry_hash = $2) "
                "ON CONFLICT (position) DO NOTHING",
                position,
                head_hash,
                moment,
                checkpoint.signer,
                checkpoint.signature,
            )
            row = await conn.fetchrow(
                "SELECT position, head_hash, time, signer, encode(signature, 'base64') AS sig "
                "FROM checkpoints WHERE position = $1",
                position,
            )
    except _DRIVER_ERRORS as exc:
        raise StoreUnavailableError(f"cannot write a checkpoint: {exc}") from exc
    if row is None:
        raise VerificationError(position, "the stored entry differs from the one checked")
    return Checkpoint(
        origin=CHECKPOINT_ORIGIN,
        position=row["position"],
        head_hash=bytes(row["head_hash"]).hex(),
        time=format_time(row["time"]),
        signer=row["signer"],
        signature=row["sig"].replace("\n", ""),
    )


def _did_of(record: RecordedEvent) -> str | None:
    event = decode_body(record.body)
    return event.did if isinstance(event, AgentRegistered | AgentKeyRotated) else None


def _record(row: Any) -> RecordedEvent:
    return RecordedEvent(
        position=row["position"],
        recorded_at=row["recorded_at"],
        stream_id=row["stream_id"],
        stream_version=row["stream_version"],
        body=bytes(row["body"]),
        signature=bytes(row["signature"]),
        prev_hash=bytes(row["prev_hash"]),
        entry_hash=bytes(row["entry_hash"]),
        event_type=row["event_type"],
        actor=row["actor"],
        subjects=tuple(row["subjects"]),
    )


async def _fetch(reader: PostgresLedgerReader, query: str, *args: object) -> list[Any]:
    try:
        return list(await reader.pool.fetch(query, *args))
    except _DRIVER_ERRORS as exc:
        raise StoreUnavailableError(f"cannot read the ledger: {exc}") from exc


async def _fetchrow(reader: PostgresLedgerReader, query: str, *args: object) -> Any:
    try:
        return await reader.pool.fetchrow(query, *args)
    except _DRIVER_ERRORS as exc:
        raise StoreUnavailableError(f"cannot read the ledger: {exc}") from exc
