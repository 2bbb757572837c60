"""The CloudEvents codec, and reading and writing lines in either flavour.

The CloudEvents flavour carries the same content with every line a
CloudEvents 1.0 JSON event: ``specversion`` "1.0", ``id``, ``source``,
``type``, ``time``, ``datacontenttype`` "application/json", and the extension
``amkind`` (header, key, event, stub, checkpoint, manifest). An event has
``type`` ``ai.agentmesh.<event type>``, ``source`` its actor's DID, ``id``
``<ledger DID>/<position>``, ``data_base64`` the exact canonical body bytes
and the proof fields as extensions: ``amposition``, ``amrecordedat``,
``amstreamid``, ``amstreamversion``, ``amprevhash``, ``amentryhash``,
``amsignature``, and its inclusion proof as ``amtreesize`` (integer) and
``amproof`` (the base64 hashes, bottom-up, separated by single spaces; empty
in a tree of one entry). Every other line has ``type`` ``ai.agentmesh.bundle.<kind>``,
``source`` the ledger's DID and the JSON Lines object in ``data``. One
verifier checks both.

Stub lines carry no ``time``: they stand for an entry without showing it.

The CloudEvents attributes a consumer shows (``id``, ``source``, ``time``) repeat
what the line's content says, and the verifier holds them to it (``Envelope``):
an event's ``time`` is its ``amrecordedat``, its ``id`` the header's ledger DID
and its position, its ``source`` its actor; a key entry's ``time`` its
``recorded_at``; a checkpoint's its ``time``; the other lines' the header's
``generated_at``, which the version 3 manifest signs. So a SIEM that indexes
the events by ``time`` and ``id`` sees what the ledger signed, or the bundle
fails verification.

``decode_line`` reads a line of either flavour into a bundle line
(``ledger.audit.bundle``); ``LineEncoder`` writes lines in one flavour.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, NamedTuple

import msgspec

from ledger.audit.bundle import (
    LINE_TYPES,
    CheckpointLine,
    EventLine,
    Flavour,
    Inclusion,
    KeyLine,
    Line,
    LineError,
    Position,
    StubLine,
    Version,
    json_encoder,
    jsonl_decoder,
)
from ledger.identity import b64encode

CE_PREFIX = "ai.agentmesh."


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
    amtreesize: Annotated[int, msgspec.Meta(ge=1, le=2**53 - 1)] | None = None
    amproof: str | None = None


_ce_decoder = msgspec.json.Decoder(_CloudEvent)


class Envelope(NamedTuple):
    """What the CloudEvents attributes of a bundle's lines must say: the header's
    ledger DID and ``generated_at``."""

    ledger_did: str
    generated_at: str

    def attributes(self, item: Line) -> tuple[str, str, str | None]:
        """The ``id``, ``source`` and ``time`` the line ``item`` is written with."""
        time: str | None
        match item:
            case EventLine():
                return f"{self.ledger_did}/{item.position}", item.actor, item.recorded_at
            case KeyLine():
                ident, time = f"{self.ledger_did}/key/{item.position}", item.recorded_at
            case StubLine():
                ident, time = f"{self.ledger_did}/{item.position}", None
            case CheckpointLine():
                ident, time = f"{self.ledger_did}/checkpoint/{item.position}", item.time
            case _:
                kind = item.__struct_config__.tag
                ident = f"{self.ledger_did}/bundle/{self.generated_at}/{kind}"
                time = self.generated_at
        return ident, self.ledger_did, time


def decode_line(raw: bytes, cloudevents: bool, envelope: Envelope | None = None) -> Line:
    """A line of either flavour; with ``envelope``, a CloudEvent's ``id``, ``source``
    and ``time`` must be the ones its content gives (LineError otherwise)."""
    try:
        if not cloudevents:
            line: Line = jsonl_decoder.decode(raw)
            return line
        return from_cloudevent(_ce_decoder.decode(raw), envelope)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise LineError(f"not a bundle line: {exc}") from exc


def from_cloudevent(ce: _CloudEvent, envelope: Envelope | None = None) -> Line:
    line = _from_cloudevent(ce)
    if envelope is not None and (ce.id, ce.source, ce.time) != envelope.attributes(line):
        raise LineError(
            "the CloudEvent's id, source or time differs from what the line itself says"
        )
    return line


def _from_cloudevent(ce: _CloudEvent) -> Line:
    if ce.specversion != "1.0":
        raise LineError(f"specversion {ce.specversion!r} is not CloudEvents 1.0")
    if ce.datacontenttype != "application/json" or not ce.id or not ce.source:
        raise LineError("a CloudEvent needs id, source and datacontenttype application/json")
    if ce.amkind != "event":
        kind = LINE_TYPES.get(ce.amkind)
        if kind is None or ce.type != f"{CE_PREFIX}bundle.{ce.amkind}" or not len(ce.data):
            raise LineError(f"amkind {ce.amkind!r} with type {ce.type!r} is not a bundle line")
        line: Line = msgspec.json.decode(ce.data, type=kind)
        return line
    if not ce.type.startswith(CE_PREFIX) or ce.data_base64 is None:
        raise LineError("an event needs type ai.agentmesh.<event type> and data_base64")
    try:
        body = base64.b64decode(ce.data_base64, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise LineError("data_base64 is not base64 of UTF-8 JSON") from exc
    if (
        ce.amposition is None
        or ce.amrecordedat is None
        or ce.amstreamid is None
        or ce.amstreamversion is None
        or ce.amprevhash is None
        or ce.amentryhash is None
        or ce.amsignature is None
    ):
        raise LineError("an event needs every am* proof attribute")
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
        inclusion=_inclusion(ce),
    )


def _inclusion(ce: _CloudEvent) -> Inclusion | None:
    if ce.amtreesize is None and ce.amproof is None:
        return None
    if ce.amtreesize is None or ce.amproof is None:
        raise LineError("an inclusion proof needs both amtreesize and amproof")
    hashes = ce.amproof.split(" ") if ce.amproof else []
    if len(hashes) > 64:
        raise LineError("an inclusion proof has at most 64 hashes")
    return Inclusion(tree_size=ce.amtreesize, hashes=hashes)


def decode_ce_entry(raw: bytes, envelope: Envelope | None = None) -> Line:
    return from_cloudevent(_ce_decoder.decode(raw), envelope)


def is_cloudevents(raw: bytes) -> bool:
    """Which flavour a bundle is, from its first line."""
    try:
        first = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return False
    return isinstance(first, dict) and "specversion" in first


class LineEncoder:
    """Writes lines in one flavour."""

    def __init__(self, flavour: Flavour, ledger_did: str, generated_at: str) -> None:
        self.cloudevents = flavour == "cloudevents"
        self.generated_at = generated_at
        self.envelope = Envelope(ledger_did, generated_at)

    def line(self, item: Line) -> bytes:
        if not self.cloudevents:
            return json_encoder.encode(item) + b"\n"
        if isinstance(item, EventLine):
            return self._event(item)
        kind = item.__struct_config__.tag
        assert isinstance(kind, str)
        ident, source, time = self.envelope.attributes(item)
        ce: dict[str, Any] = {
            "specversion": "1.0",
            "id": ident,
            "source": source,
            "type": f"{CE_PREFIX}bundle.{kind}",
        }
        if time is not None:
            ce["time"] = time
        ce["datacontenttype"] = "application/json"
        ce["data"] = msgspec.Raw(json_encoder.encode(item))
        ce["amkind"] = kind
        return json_encoder.encode(ce) + b"\n"

    def _event(self, item: EventLine) -> bytes:
        ident, source, time = self.envelope.attributes(item)
        ce: dict[str, Any] = {
            "specversion": "1.0",
            "id": ident,
            "source": source,
            "type": CE_PREFIX + item.type,
            "time": time,
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
        if item.inclusion is not None:
            ce["amtreesize"] = item.inclusion.tree_size
            ce["amproof"] = " ".join(item.inclusion.hashes)
        return json_encoder.encode(ce) + b"\n"
