"""Write the golden audit bundles in this directory (run once; the output is committed).

    .venv/bin/python -m tests.assets.audit.make_assets

Deterministic: the keys come from fixed seeds, the times and event ids are
fixed and Ed25519 signatures are deterministic, so a rerun writes the same
bytes (unless the bundle format changed, which is what the assets guard).

The good bundle is a real export (``ledger.audit.export``) of a small
in-memory ledger: two agents registered by the ledger (key entries, before the
range) and three trust signals between them. Each tampered one is the good one
with one thing changed:

``good.jsonl`` / ``good.cloudevents.jsonl``
    both flavours of the same export
``edited-body.jsonl``
    an event's body says ``bad`` where it was signed saying ``good``
``dropped-line.jsonl``
    one event line left out of the middle of the range
``resigned-manifest.jsonl``
    the manifest signed by another key (its ``signer`` and ``signature``)
``altered-edge.jsonl``
    one hash of the tree's edge before the range changed (the range proof broken)
``tampered-proof.jsonl``
    one hash of the first event's inclusion proof changed
``dropped-proof.jsonl``
    the middle event's inclusion proof left out
``swapped-proof.jsonl``
    the first event carries the inclusion proof of the second (a proof that the
    event is in the log at another position)
``edited-key-time.jsonl``
    the first key entry's ``recorded_at`` moved a year back and its entry hash
    recomputed (it lies before the range, outside the signed tree's entries: the
    manifest's signed ``keys_digest`` is what catches it)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger.audit.bundle import AnchorLine, Flavour, KeyLine, Manifest, recomputed_hash
from ledger.audit.export import export_bundle
from ledger.chain import Checkpoint, RecordedEvent
from ledger.events import AgentRegistered, Event, TrustSignal
from ledger.identity import SigningKey, b64encode
from ledger.memory import MemoryLedger
from ledger.merkle import Frontier
from ledger.signed import SignedEvent
from ledger.timefmt import format_time

HERE = Path(__file__).parent
T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
END = T0 + timedelta(days=1)


def seeded_key(name: str) -> SigningKey:
    """An Ed25519 key whose 32-byte seed is SHA-256 of ``name``."""
    seed = hashlib.sha256(f"agentmesh-audit-assets/{name}".encode()).digest()
    pem = Ed25519PrivateKey.from_private_bytes(seed).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return SigningKey.from_pem(pem)


LEDGER_KEY = seeded_key("ledger")
OTHER_KEY = seeded_key("another ledger")
ALICE, BOB = seeded_key("alice"), seeded_key("bob")


def event_id(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()[:32]


class Clock:
    """Fixed time that moves a minute per reading, from half an hour after ``T0`` (so
    every event happened before the ledger recorded it)."""

    def __init__(self) -> None:
        self.now = T0 + timedelta(minutes=30)

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


class MemorySource:
    """``ledger.audit.export.AuditSource`` over a ``MemoryLedger`` (a scan: tiny ledgers)."""

    def __init__(self, ledger: MemoryLedger) -> None:
        self.ledger = ledger

    async def _all(self) -> list[RecordedEvent]:
        return await self.ledger.read(0, 1_000_000)

    async def entry_range(self, start: datetime, end: datetime) -> tuple[int, int] | None:
        inside = [e.position for e in await self._all() if start <= e.recorded_at < end]
        return (inside[0], inside[-1]) if inside else None

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
        return sorted(
            {
                e.actor
                for e in await self._all()
                if first <= e.position <= last
                and start <= e.recorded_at < end
                and e.actor != exclude
                and (agent is None or agent in e.subjects)
            }
        )

    async def ledger_rotations(self) -> list[RecordedEvent]:
        return [e for e in await self._all() if e.event_type == "ledger.key_rotated"]

    async def key_entries(self, dids: Sequence[str], last: int) -> list[RecordedEvent]:
        kinds = ("agent.registered", "agent.key_rotated")
        return [
            e
            for e in await self._all()
            if e.event_type in kinds and e.position <= last and set(e.subjects) & set(dids)
        ]

    async def retention_anchor(self) -> AnchorLine | None:
        return None

    async def read(self, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        return await self.ledger.read(after, limit)

    async def entry_at(self, position: int) -> RecordedEvent | None:
        return await self.ledger.entry_at(position)

    async def checkpoints(self, after: int = 0, limit: int = 10_000) -> list[Checkpoint]:
        return await self.ledger.checkpoints(after, limit)

    async def tree_edge(self, size: int) -> Frontier:
        return await self.ledger.frontier_at(size)

    async def tree_nodes(self, wanted: set[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        return await self.ledger.tree_nodes(wanted)

    async def store_checkpoint(self, checkpoint: Checkpoint) -> Checkpoint | None:
        entry = await self.ledger.entry_at(checkpoint.position)
        if entry is None or entry.entry_hash.hex() != checkpoint.head_hash:
            return None
        return checkpoint  # not kept: every run signs the same one


async def small_ledger() -> MemoryLedger:
    """Two agents registered by the ledger, then trust signals between them."""
    ledger = MemoryLedger(LEDGER_KEY, clock=Clock())

    def at(minutes: int) -> str:
        return format_time(T0 + timedelta(minutes=minutes))

    for number, agent in enumerate((ALICE, BOB)):
        registration: Event = AgentRegistered(
            actor=LEDGER_KEY.did,
            occurred_at=at(number),
            event_id=event_id(f"register {number}"),
            did=agent.did,
            public_key=agent.public.pem(),
        )
        await ledger.append_own(registration)
    signals = [(ALICE, BOB, "good"), (BOB, ALICE, "good"), (ALICE, BOB, "good")]
    for number, (signer, subject, signal) in enumerate(signals):
        event = TrustSignal(
            actor=signer.did,
            occurred_at=at(10 + number),
            event_id=event_id(f"signal {number}"),
            agent=subject.did,
            signal=signal,
        )
        await ledger.append([SignedEvent.create(event, signer)])
    return ledger


async def export(ledger: MemoryLedger, fmt: Flavour) -> str:
    """The range from the first signal on: the registrations are key entries only."""
    first_signal = await ledger.entry_at(3)
    assert first_signal is not None
    out = io.StringIO()
    start = first_signal.recorded_at
    await export_bundle(
        MemorySource(ledger), LEDGER_KEY, out, start=start, end=END, fmt=fmt, clock=lambda: T0
    )
    return out.getvalue()


def edited_body(lines: list[str]) -> list[str]:
    """The last event's body changed from ``good`` to ``bad`` (hashes left as they were)."""
    index = max(i for i, line in enumerate(lines) if json.loads(line)["kind"] == "event")
    item = json.loads(lines[index])
    assert '"signal":"good"' in item["body"]
    item["body"] = item["body"].replace('"signal":"good"', '"signal":"bad"')
    return [*lines[:index], _dump(item), *lines[index + 1 :]]


def dropped_line(lines: list[str]) -> list[str]:
    """The middle event line left out."""
    events = [i for i, line in enumerate(lines) if json.loads(line)["kind"] == "event"]
    index = events[len(events) // 2]
    return [*lines[:index], *lines[index + 1 :]]


def altered_edge(lines: list[str]) -> list[str]:
    """One hash of the tree's edge before the range changed (the range proof broken)."""
    index = next(i for i, line in enumerate(lines) if json.loads(line)["kind"] == "tree")
    tree = json.loads(lines[index])
    first = bytearray(base64.b64decode(tree["hashes"][0]))
    first[0] ^= 1
    tree["hashes"][0] = base64.b64encode(bytes(first)).decode()
    return [*lines[:index], _dump(tree), *lines[index + 1 :]]


def _event_lines(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if json.loads(line)["kind"] == "event"]


def tampered_proof(lines: list[str]) -> list[str]:
    """One bit of the first event's inclusion proof flipped."""
    index = _event_lines(lines)[0]
    item = json.loads(lines[index])
    first = bytearray(base64.b64decode(item["inclusion"]["hashes"][0]))
    first[0] ^= 1
    item["inclusion"]["hashes"][0] = base64.b64encode(bytes(first)).decode()
    return [*lines[:index], _dump(item), *lines[index + 1 :]]


def dropped_proof(lines: list[str]) -> list[str]:
    """The middle event's inclusion proof left out."""
    events = _event_lines(lines)
    index = events[len(events) // 2]
    item = json.loads(lines[index])
    del item["inclusion"]
    return [*lines[:index], _dump(item), *lines[index + 1 :]]


def swapped_proof(lines: list[str]) -> list[str]:
    """The first event with the second's inclusion proof."""
    first, second = _event_lines(lines)[:2]
    item = json.loads(lines[first])
    item["inclusion"] = json.loads(lines[second])["inclusion"]
    return [*lines[:first], _dump(item), *lines[first + 1 :]]


def edited_key_time(lines: list[str]) -> list[str]:
    """The first key entry recorded a year earlier, its entry hash recomputed."""
    index = next(i for i, line in enumerate(lines) if json.loads(line)["kind"] == "key")
    item = json.loads(lines[index])
    item["recorded_at"] = format_time(T0 - timedelta(days=365))
    item["entry_hash"] = recomputed_hash(msgspec.convert(item, KeyLine))
    return [*lines[:index], _dump(item), *lines[index + 1 :]]


def resigned_manifest(lines: list[str]) -> list[str]:
    """The manifest signed by ``OTHER_KEY`` (content unchanged, signer replaced)."""
    manifest = msgspec.json.decode(lines[-1], type=Manifest)
    unsigned = msgspec.structs.replace(manifest, signer=OTHER_KEY.did, signature="")
    signed = msgspec.structs.replace(
        unsigned, signature=b64encode(OTHER_KEY.sign(unsigned.signed_bytes()))
    )
    return [*lines[:-1], msgspec.json.encode(signed).decode()]


def _dump(item: dict[str, object]) -> str:
    return json.dumps(item, separators=(",", ":"), ensure_ascii=False)


def _check_sample(lines: list[str]) -> None:
    """The sample is what the docstring says: two key entries (registered before the
    range), the tree's edge before the range, three signed events."""
    kinds = [json.loads(line)["kind"] for line in lines]
    expected = ["header", "key", "key", "tree", "event", "event", "event", "checkpoint", "manifest"]
    assert kinds == expected


def build() -> dict[str, str]:
    """Every asset's name and text."""
    ledger = asyncio.run(small_ledger())
    lines = asyncio.run(export(ledger, "jsonl")).splitlines()
    _check_sample(lines)
    files = {
        "good.jsonl": lines,
        "good.cloudevents.jsonl": asyncio.run(export(ledger, "cloudevents")).splitlines(),
        "edited-body.jsonl": edited_body(lines),
        "dropped-line.jsonl": dropped_line(lines),
        "resigned-manifest.jsonl": resigned_manifest(lines),
        "altered-edge.jsonl": altered_edge(lines),
        "tampered-proof.jsonl": tampered_proof(lines),
        "dropped-proof.jsonl": dropped_proof(lines),
        "swapped-proof.jsonl": swapped_proof(lines),
        "edited-key-time.jsonl": edited_key_time(lines),
    }
    return {name: "\n".join(content) + "\n" for name, content in files.items()}


def main() -> None:
    for name, text in build().items():
        (HERE / name).write_text(text, encoding="utf-8")
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
