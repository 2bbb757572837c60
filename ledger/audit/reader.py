"""Reading a bundle's content for replay (``read_bundle``); it does not verify:
run ``verify_bundle`` on the same file first."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ledger.audit.bundle import (
    BundleVerificationError,
    CheckpointLine,
    EntryLine,
    EventLine,
    Header,
    KeyLine,
    LineError,
    Manifest,
    reason_of,
)
from ledger.audit.cloudevents import decode_line, is_cloudevents
from ledger.chain import Checkpoint, RecordedEvent
from ledger.errors import LedgerError
from ledger.events import decode_body, subject_agents
from ledger.identity import VerifyKey, b64decode
from ledger.timefmt import parse_time


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
            self.cloudevents = is_cloudevents(raw)
        position = 0
        try:
            item = decode_line(raw, self.cloudevents)
            position = getattr(item, "position", 0)
            if self.header is None:
                if not isinstance(item, Header):
                    raise LineError("the first line is not a bundle header")
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
                    raise LineError("a second header")
        except (LedgerError, ValueError) as exc:
            raise BundleVerificationError(number, position, reason_of(exc)) from None


def _recorded(item: EntryLine, ledger_did: str) -> RecordedEvent:
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
