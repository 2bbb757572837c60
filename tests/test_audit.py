"""Audit bundles: export → offline verify round trips in both flavours; every kind of
tampering is named at its first bad line; agent filters; the CLI and the API."""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from agentmesh.embedded import EmbeddedPostgres, EmbeddedRedis
from ledger.audit import (
    CE_PREFIX,
    BundleReport,
    BundleVerificationError,
    Manifest,
    export_bundle,
    read_bundle,
    verify_bundle,
)
from ledger.canonical import canonical_bytes
from ledger.chain import Entry, RecordedEvent, entry_hash, sign_checkpoint
from ledger.errors import VerificationError
from ledger.events import AgentKeyRotated, AgentRegistered, decode_body, subject_agents
from ledger.identity import SigningKey, b64decode, b64encode
from ledger.postgres import PostgresEventStore, PostgresLedgerReader
from ledger.signed import SignedEvent
from ledger.timefmt import format_time, parse_time
from tests.api_support import ADMIN, api_settings, running_api, signed
from tests.support import T0, Agent, ManualClock, random_history

Records = list[dict[str, Any]]


@pytest.fixture(scope="module")
def executor() -> Iterator[ProcessPoolExecutor]:
    pool = ProcessPoolExecutor(max_workers=2)
    yield pool
    pool.shutdown()


# -- a ledger with every kind of key history ---------------------------------------------


async def fresh_database(postgres: EmbeddedPostgres) -> str:
    name = "audit_" + uuid.uuid4().hex[:12]
    conn = await asyncpg.connect(postgres.url)
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE ledger_template")
    finally:
        await conn.close()
    return postgres.url.rsplit("/", 1)[0] + "/" + name


async def open_store(url: str, key: SigningKey, clock: ManualClock) -> PostgresEventStore:
    # No automatic checkpoints: the exporter must sign the covering one itself.
    return await PostgresEventStore.open(
        url, key, clock=clock, checkpoint_every=10**9, checkpoint_interval=10**9
    )


@dataclass
class RotatedAgent(Agent):
    """An agent after a key rotation: its DID stays the one of its first key."""

    first_did: str = ""

    @property
    def did(self) -> str:
        return self.first_did


async def rotate(
    store: PostgresEventStore, agents: list[Agent], index: int, clock: ManualClock
) -> Agent:
    agent = agents[index]
    new = SigningKey.generate()
    event = AgentKeyRotated(
        actor=agent.did,
        occurred_at=format_time(clock.now),
        did=agent.did,
        public_key=new.public.pem(),
    )
    await store.append([SignedEvent.rotation(event, agent.key, new)])
    agents[index] = RotatedAgent(key=new, capabilities=agent.capabilities, first_did=agent.did)
    return agents[index]


async def self_register(store: PostgresEventStore, clock: ManualClock) -> Agent:
    agent = Agent(capabilities=("tools:search",))
    event = AgentRegistered(
        actor=agent.did,
        occurred_at=format_time(clock.now),
        did=agent.did,
        public_key=agent.key.public.pem(),
        capabilities=agent.capabilities,
    )
    await store.append([SignedEvent.create(event, agent.key)])
    return agent


@dataclass
class History:
    """Registrations (by the ledger and one by itself), rotations before and inside
    the range [start, end), events before, inside and after it."""

    url: str
    key: SigningKey
    clock: ManualClock
    agents: list[Agent]
    rotated: Agent
    start: datetime
    end: datetime
    in_range: list[RecordedEvent]


async def build_history(
    store: PostgresEventStore, clock: ManualClock, url: str, key: SigningKey
) -> History:
    # The first agent of an empty ledger registers itself (a self-signed key entry).
    pioneer = await self_register(store, clock)
    clock.advance(minutes=1)
    agents = await random_history(store, clock, seed=1, steps=25)
    clock.advance(minutes=1)
    rotated = await rotate(store, agents, 0, clock)
    clock.advance(minutes=1)
    agents.append(pioneer)
    start = clock.advance(minutes=1)
    clock.advance(seconds=30)
    await random_history(store, clock, seed=2, steps=30, agents=agents)
    clock.advance(minutes=1)
    await rotate(store, agents, 1, clock)  # a key entry that is also an exported event
    await store.append([agents[-1].violation(subject=rotated.did, at=clock.now)])
    await store.append([rotated.signal(subject=agents[-1].did, at=clock.now)])
    await random_history(store, clock, seed=3, steps=10, agents=agents)
    end = clock.advance(minutes=1)
    clock.advance(seconds=30)
    await random_history(store, clock, seed=4, steps=10, agents=agents)
    records = await store.read(0, 100_000)
    in_range = [r for r in records if start <= r.recorded_at < end]
    return History(url, key, clock, agents, rotated, start, end, in_range)


@dataclass
class Built:
    history: History
    paths: dict[tuple[str, bool], Path]  # (flavour, filtered) -> bundle
    manifests: dict[tuple[str, bool], Manifest]


@pytest.fixture(scope="module")
async def built(postgres: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory) -> Built:
    url = await fresh_database(postgres)
    key = SigningKey.generate()
    clock = ManualClock()
    store = await open_store(url, key, clock)
    directory = tmp_path_factory.mktemp("bundles")
    paths: dict[tuple[str, bool], Path] = {}
    manifests: dict[tuple[str, bool], Manifest] = {}
    try:
        history = await build_history(store, clock, url, key)
        for flavour in ("jsonl", "cloudevents"):
            for filtered in (False, True):
                out = io.StringIO()
                manifests[flavour, filtered] = await export_bundle(
                    store,
                    key,
                    out,
                    start=history.start,
                    end=history.end,
                    agent=history.rotated.did if filtered else None,
                    fmt=flavour,
                    clock=history.clock,
                )
                path = directory / f"{flavour}-{filtered}.jsonl"
                path.write_text(out.getvalue())
                paths[flavour, filtered] = path
    finally:
        await store.close()
    return Built(history, paths, manifests)


# -- reading and writing bundle lines in one (JSON Lines) shape ----------------------------


def load(path: Path) -> tuple[Records, list[dict[str, Any]] | None]:
    """The lines as JSON Lines objects, plus the CloudEvents originals if any."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    if "specversion" not in lines[0]:
        return lines, None
    return [_from_ce(ce) for ce in lines], lines


def _from_ce(ce: dict[str, Any]) -> dict[str, Any]:
    if ce["amkind"] != "event":
        data: dict[str, Any] = ce["data"]
        return data
    record = {
        "kind": "event",
        "position": ce["amposition"],
        "recorded_at": ce["amrecordedat"],
        "stream_id": ce["amstreamid"],
        "stream_version": ce["amstreamversion"],
        "type": ce["type"][len(CE_PREFIX) :],
        "actor": ce["source"],
        "body": base64.b64decode(ce["data_base64"]).decode(),
        "signature": ce["amsignature"],
        "prev_hash": ce["amprevhash"],
        "entry_hash": ce["amentryhash"],
    }
    if "amtreesize" in ce:
        hashes = ce["amproof"].split(" ") if ce["amproof"] else []
        record["inclusion"] = {"tree_size": ce["amtreesize"], "hashes": hashes}
    return record


def _to_ce(record: dict[str, Any], ledger_did: str, generated_at: str) -> dict[str, Any]:
    """The record as the exporter writes it in CloudEvents (``id``, ``source`` and
    ``time`` as ``cloudevents.Envelope`` says, which the verifier holds them to)."""
    kind = record["kind"]
    if kind != "event":
        ident, time = {
            "key": (f"{ledger_did}/key/{record.get('position')}", record.get("recorded_at")),
            "stub": (f"{ledger_did}/{record.get('position')}", None),
            "checkpoint": (f"{ledger_did}/checkpoint/{record.get('position')}", record.get("time")),
        }.get(kind, (f"{ledger_did}/bundle/{generated_at}/{kind}", generated_at))
        ce = {
            "specversion": "1.0",
            "id": ident,
            "source": ledger_did,
            "type": f"{CE_PREFIX}bundle.{kind}",
            "datacontenttype": "application/json",
            "data": record,
            "amkind": kind,
        }
        if time is not None:
            ce["time"] = time
        return ce
    ce = {
        "specversion": "1.0",
        "id": f"{ledger_did}/{record['position']}",
        "source": record["actor"],
        "type": CE_PREFIX + record["type"],
        "time": record["recorded_at"],
        "datacontenttype": "application/json",
        "data_base64": base64.b64encode(record["body"].encode()).decode(),
        "amkind": "event",
        "amposition": record["position"],
        "amrecordedat": record["recorded_at"],
        "amstreamid": record["stream_id"],
        "amstreamversion": record["stream_version"],
        "amprevhash": record["prev_hash"],
        "amentryhash": record["entry_hash"],
        "amsignature": record["signature"],
    }
    if "inclusion" in record:
        ce["amtreesize"] = record["inclusion"]["tree_size"]
        ce["amproof"] = " ".join(record["inclusion"]["hashes"])
    return ce


def save(path: Path, records: Records, cloudevents: bool, ledger_did: str) -> None:
    generated_at = next((r["generated_at"] for r in records if r["kind"] == "header"), "")
    objects = [_to_ce(r, ledger_did, generated_at) for r in records] if cloudevents else records
    path.write_text("".join(json.dumps(o, separators=(",", ":")) + "\n" for o in objects))


def rehash(record: dict[str, Any]) -> None:
    """Recompute an entry's hash from its content, as ``ledger.chain`` defines it."""
    entry = Entry(
        position=record["position"],
        recorded_at=parse_time(record["recorded_at"]),
        stream_id=record["stream_id"],
        stream_version=record["stream_version"],
        body=record["body"].encode(),
        signature=b64decode(record["signature"]),
        prev_hash=bytes.fromhex(record["prev_hash"]),
        entry_hash=b"",
    )
    record["entry_hash"] = entry_hash(entry.prev_hash, entry.envelope()).hex()


def indexes(records: Records, kind: str, event_type: str | None = None) -> list[int]:
    return [
        i
        for i, r in enumerate(records)
        if r["kind"] == kind and (event_type is None or r.get("type") == event_type)
    ]


def verify_both_ways(path: Path, executor: ProcessPoolExecutor, **options: Any) -> Any:
    """Verify in this process and on the pool in tiny chunks: the outcome (a report
    or the error, with its line and position) must be the same."""
    outcomes: list[BundleReport | BundleVerificationError] = []
    for pool in (False, True):
        extra: dict[str, Any] = {"executor": executor, "chunk": 5} if pool else {"workers": 0}
        try:
            outcomes.append(verify_bundle(path, **options, **extra))
        except BundleVerificationError as exc:
            outcomes.append(exc)
    first, second = outcomes
    if isinstance(first, BundleVerificationError):
        assert isinstance(second, BundleVerificationError), second
        assert (first.line, first.position, first.reason) == (
            second.line,
            second.position,
            second.reason,
        )
    else:
        assert first == second
    return first


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["jsonl", "cloudevents"])
def test_round_trip_verifies(built: Built, flavour: str, executor: ProcessPoolExecutor) -> None:
    history = built.history
    path = built.paths[flavour, False]
    report = verify_both_ways(path, executor)
    expected = history.in_range
    manifest = built.manifests[flavour, False]
    assert report.events == manifest.count == len(expected)
    assert (manifest.first_position, manifest.last_position) == (
        expected[0].position,
        expected[-1].position,
    )
    assert manifest.checkpoint_position == expected[-1].position
    assert report.signatures == len(expected)
    assert report.summary() == (
        f"bundle OK: {len(expected)} events (positions {expected[0].position}.."
        f"{expected[-1].position}), {manifest.keys} keys, checkpoint "
        f"{expected[-1].position} signed by {history.key.did}, every entry proven in the "
        f"signed Merkle tree of {expected[-1].position} ({len(expected)} events by their own "
        "inclusion proofs)"
    )
    assert report.proofs == len(expected)
    bundle = read_bundle(path)
    assert bundle.events == expected  # byte for byte what the store holds, subjects too
    assert bundle.manifest == manifest
    kinds = [(decode_body(k.body), k.actor) for k in bundle.keys]
    assert all(isinstance(e, AgentRegistered | AgentKeyRotated) for e, _ in kinds)
    assert any(isinstance(e, AgentKeyRotated) for e, _ in kinds)
    assert any(isinstance(e, AgentRegistered) and a == e.did for e, a in kinds), "self-reg"
    assert any(k.position < expected[0].position for k in bundle.keys), "keys before the range"
    assert any(k.position >= expected[0].position for k in bundle.keys), "keys inside it"
    signers = {r.actor for r in expected} - {history.key.did}
    assert {e.did for e, _ in kinds} == signers  # type: ignore[union-attr]


def test_both_flavours_hold_the_same_entries_and_lines_are_cloudevents(built: Built) -> None:
    jsonl, cloudevents = (read_bundle(built.paths[f, False]) for f in ("jsonl", "cloudevents"))
    assert jsonl.events == cloudevents.events
    assert jsonl.keys == cloudevents.keys
    assert jsonl.checkpoint == cloudevents.checkpoint
    lines = [
        json.loads(line) for line in built.paths["cloudevents", False].read_text().split("\n")[:-1]
    ]
    ids = set()
    for ce in lines:
        assert ce["specversion"] == "1.0"
        assert ce["datacontenttype"] == "application/json"
        assert ce["type"].startswith("ai.agentmesh.")
        assert ce["source"].startswith("did:mesh:")
        for name in set(ce) - {"specversion", "id", "source", "type", "time",
                               "datacontenttype", "data", "data_base64"}:  # fmt: skip
            assert re.fullmatch(r"[a-z0-9]{1,20}", name), name
        ids.add((ce["source"], ce["id"]))
        if ce["amkind"] == "event":
            assert ce["id"] == f"{built.history.key.did}/{ce['amposition']}"
            body = base64.b64decode(ce["data_base64"])
            assert canonical_bytes(json.loads(body)) == body
            assert ce["type"] == CE_PREFIX + json.loads(body)["type"]
            assert ce["source"] == json.loads(body)["actor"]
    assert len(ids) == len(lines)
    assert lines[0]["type"] == "ai.agentmesh.bundle.header"
    assert lines[-1]["type"] == "ai.agentmesh.bundle.manifest"


def test_signatures_off_checks_the_chain_only(built: Built) -> None:
    report = verify_bundle(built.paths["jsonl", False], workers=0, signatures=False)
    assert report.signatures == 0
    assert report.summary().startswith("bundle OK (event signatures not checked)")


def test_lines_from_memory_verify(built: Built) -> None:
    text = built.paths["cloudevents", False].read_text()
    assert verify_bundle(text.splitlines(), workers=0).events == len(built.history.in_range)


def test_pinned_ledger_key(built: Built) -> None:
    path = built.paths["jsonl", False]
    assert verify_bundle(path, workers=0, ledger_key=built.history.key.public).events
    with pytest.raises(BundleVerificationError) as info:
        verify_bundle(path, workers=0, ledger_key=SigningKey.generate().public)
    assert (info.value.line, info.value.position) == (1, 0)
    assert "ledger key mismatch" in str(info.value)


# -- tampering: each named at its first bad line ---------------------------------------------

Expected = tuple[int, int, str]  # line, position, part of the reason
Tamper = Callable[[Records, SigningKey], Expected]


def _violation(records: Records, nth: int = 0) -> int:
    return indexes(records, "event", "policy.violation")[nth]


def edit_body(records: Records, _: SigningKey) -> Expected:
    i = _violation(records, 1)
    body = json.loads(records[i]["body"])
    body["severity"] = "low" if body["severity"] == "critical" else "critical"
    records[i]["body"] = canonical_bytes(body).decode()
    return i + 1, records[i]["position"], "entry_hash does not match"


def edit_and_rechain(records: Records, _: SigningKey) -> Expected:
    """The insider rewrites an event and recomputes every later hash."""
    i = _violation(records, 2)
    body = json.loads(records[i]["body"])
    body["detail"] = "nothing happened"
    records[i]["body"] = canonical_bytes(body).decode()
    _rechain_from(records, i)
    return i + 1, records[i]["position"], "signature does not verify"


def _rechain_from(records: Records, i: int) -> None:
    """Recompute the hashes of entry ``i`` and of every entry after it (an insider who
    rewrote entry ``i`` and kept the chain whole)."""
    for j in range(i, len(records)):
        if records[j]["kind"] not in ("event", "stub"):
            break
        if j > i:
            records[j]["prev_hash"] = records[j - 1]["entry_hash"]
        if records[j]["kind"] == "event":
            rehash(records[j])


def clock_runs_back(records: Records, _: SigningKey) -> Expected:
    """An event recorded a microsecond before the event ahead of it, chain kept whole:
    the ledger's clock never runs back (retention, freshness and the single-use days
    rely on it), so the bundle must not either."""
    events = indexes(records, "event")
    i = events[3]
    before = parse_time(records[events[2]]["recorded_at"])
    records[i]["recorded_at"] = format_time(before - timedelta(microseconds=1))
    _rechain_from(records, i)
    return i + 1, records[i]["position"], "the ledger's clock never runs back"


def time_not_in_the_ledgers_form(records: Records, _: SigningKey) -> Expected:
    """The same moment written another way (which orders differently as text)."""
    i = indexes(records, "event")[2]
    moment = parse_time(records[i]["recorded_at"])
    records[i]["recorded_at"] = moment.isoformat()  # ...+00:00
    _rechain_from(records, i)
    return i + 1, records[i]["position"], "is not a ledger time"


def lie_about_the_actor(records: Records, _: SigningKey) -> Expected:
    i = _violation(records, 3)
    others = [r["actor"] for r in records if r["kind"] == "event"]
    records[i]["actor"] = next(a for a in others if a != records[i]["actor"])
    return i + 1, records[i]["position"], "differs from the body"


def drop_event(records: Records, _: SigningKey) -> Expected:
    i = indexes(records, "event")[7]
    position = records[i]["position"]
    del records[i]
    return i + 1, position, "missing or out of order"


def drop_first_event(records: Records, _: SigningKey) -> Expected:
    i = indexes(records, "event")[0]
    position = records[i]["position"]
    del records[i]
    # The tree's edge before the range says where the entries start: the first
    # entry missing is caught there, before the manifest says so too.
    return i + 1, position, "missing: the tree's edge covers"


def drop_last_event(records: Records, _: SigningKey) -> Expected:
    i = indexes(records, "event")[-1]
    position = records[i]["position"]
    del records[i]
    return i + 1, position, "missing: the checkpoint covers"


def insert_copy(records: Records, _: SigningKey) -> Expected:
    i = indexes(records, "event")[5]
    records.insert(i + 1, copy.deepcopy(records[i]))
    return i + 2, records[i]["position"] + 1, "missing or out of order"


def reorder(records: Records, _: SigningKey) -> Expected:
    i, j = indexes(records, "event")[4], indexes(records, "event")[9]
    position = records[i]["position"]
    records[i], records[j] = records[j], records[i]
    return i + 1, position, "missing or out of order"


def _other_pem() -> str:
    return SigningKey.generate().public.pem()


def swap_key(records: Records, _: SigningKey) -> Expected:
    i = indexes(records, "key", "agent.registered")[0]
    body = json.loads(records[i]["body"])
    body["public_key"] = _other_pem()
    records[i]["body"] = canonical_bytes(body).decode()
    return i + 1, records[i]["position"], "entry_hash does not match"


def swap_key_and_rehash(records: Records, _: SigningKey) -> Expected:
    i = indexes(records, "key", "agent.registered")[0]
    body = json.loads(records[i]["body"])
    body["public_key"] = _other_pem()
    records[i]["body"] = canonical_bytes(body).decode()
    rehash(records[i])
    return i + 1, records[i]["position"], "public key belongs to"


def swap_rotated_key_and_rehash(records: Records, _: SigningKey) -> Expected:
    i = indexes(records, "key", "agent.key_rotated")[0]
    body = json.loads(records[i]["body"])
    body["public_key"] = _other_pem()
    records[i]["body"] = canonical_bytes(body).decode()
    rehash(records[i])
    return i + 1, records[i]["position"], "signature does not verify"


def key_time_edited_and_rehashed(records: Records, _: SigningKey) -> Expected:
    """A key entry before the range recorded years earlier, at another position, its
    hash recomputed: no signature covers those fields, the manifest's keys_digest does."""
    i = indexes(records, "key", "agent.registered")[0]
    records[i]["recorded_at"] = "2001-01-01T00:00:00.000000Z"
    rehash(records[i])
    return len(records), 0, "keys_digest differs"


def key_time_runs_back(records: Records, _: SigningKey) -> Expected:
    """An agent key entry recorded before the key entry ahead of it, hash recomputed:
    named at its own line (key entries are in position order, so in time order)."""
    keys = [i for i in indexes(records, "key") if records[i]["type"] != "ledger.key_rotated"]
    before = parse_time(records[keys[0]]["recorded_at"])
    i = keys[1]
    records[i]["recorded_at"] = format_time(before - timedelta(microseconds=1))
    rehash(records[i])
    return i + 1, records[i]["position"], "the ledger's clock never runs back"


def drop_key(records: Records, _: SigningKey) -> Expected:
    """Without the rotation, the events signed with the new key fail."""
    i = indexes(records, "key", "agent.key_rotated")[0]
    rotated = json.loads(records[i]["body"])["did"]
    del records[i]
    j = next(j for j, r in enumerate(records) if r["kind"] == "event" and r["actor"] == rotated)
    return j + 1, records[j]["position"], "signature does not verify"


def key_after_events(records: Records, _: SigningKey) -> Expected:
    i = indexes(records, "key")[-1]
    moved = records.pop(i)
    j = indexes(records, "event")[2] + 1
    records.insert(j, moved)
    return j + 1, moved["position"], "a key entry after the entries"


def _checkpoint(records: Records) -> int:
    return indexes(records, "checkpoint")[0]


def forge_checkpoint_signature(records: Records, _: SigningKey) -> Expected:
    i = _checkpoint(records)
    records[i]["signature"] = b64encode(bytes(64))
    return i + 1, records[i]["position"], "checkpoint signature is invalid"


def checkpoint_of_another_hash(records: Records, key: SigningKey) -> Expected:
    i = _checkpoint(records)
    position = records[i]["position"]
    forged = sign_checkpoint(key, position, os.urandom(32), T0)
    records[i] = {"kind": "checkpoint", **_checkpoint_fields(forged)}
    return i + 1, position, "differs from the signed checkpoint"


def checkpoint_of_an_earlier_entry(records: Records, key: SigningKey) -> Expected:
    i = _checkpoint(records)
    before = records[i - 2]
    earlier = sign_checkpoint(key, before["position"], bytes.fromhex(before["entry_hash"]), T0)
    records[i] = {"kind": "checkpoint", **_checkpoint_fields(earlier)}
    return i + 1, before["position"] + 1, "not the last entry"


def _checkpoint_fields(checkpoint: Any) -> dict[str, Any]:
    fields = ("origin", "position", "head_hash", "time", "signer", "signature")
    return {name: getattr(checkpoint, name) for name in fields}


def drop_checkpoint(records: Records, _: SigningKey) -> Expected:
    i = _checkpoint(records)
    position = records[i]["position"]
    del records[i]
    return i + 1, position, "no checkpoint covers the last entry"


def drop_manifest(records: Records, _: SigningKey) -> Expected:
    records.pop()
    return len(records) + 1, 0, "no manifest"


def edit_manifest(records: Records, _: SigningKey) -> Expected:
    records[-1]["keys"] += 1
    return len(records), 0, "keys"


def resign_manifest(records: Records, _: SigningKey) -> Expected:
    impostor = SigningKey.generate()
    manifest = msgspec.convert(records[-1], Manifest)
    unsigned = msgspec.structs.replace(manifest, signer=impostor.did, signature="")
    records[-1]["signer"] = impostor.did
    records[-1]["signature"] = b64encode(impostor.sign(unsigned.signed_bytes()))
    return len(records), 0, "manifest signature is invalid"


def line_after_manifest(records: Records, _: SigningKey) -> Expected:
    records.append(copy.deepcopy(records[-2]))
    return len(records), 0, "after the manifest"


def header_not_first(records: Records, _: SigningKey) -> Expected:
    records[0], records[1] = records[1], records[0]
    return 1, 0, "not a bundle header"


TAMPERS: list[Tamper] = [
    edit_body,
    edit_and_rechain,
    clock_runs_back,
    time_not_in_the_ledgers_form,
    lie_about_the_actor,
    drop_event,
    drop_first_event,
    drop_last_event,
    insert_copy,
    reorder,
    swap_key,
    swap_key_and_rehash,
    swap_rotated_key_and_rehash,
    key_time_edited_and_rehashed,
    key_time_runs_back,
    drop_key,
    key_after_events,
    forge_checkpoint_signature,
    checkpoint_of_another_hash,
    checkpoint_of_an_earlier_entry,
    drop_checkpoint,
    drop_manifest,
    edit_manifest,
    resign_manifest,
    line_after_manifest,
    header_not_first,
]


@pytest.mark.parametrize("flavour", ["jsonl", "cloudevents"])
@pytest.mark.parametrize("tamper", TAMPERS, ids=[t.__name__ for t in TAMPERS])
def test_tampering_is_named_at_its_first_bad_line(
    built: Built, tmp_path: Path, executor: ProcessPoolExecutor, flavour: str, tamper: Tamper
) -> None:
    records, originals = load(built.paths[flavour, False])
    line, position, reason = tamper(records, built.history.key)
    path = tmp_path / "tampered.jsonl"
    save(path, records, originals is not None, built.history.key.did)
    error = verify_both_ways(path, executor)
    assert isinstance(error, BundleVerificationError), f"{tamper.__name__} went unnoticed"
    assert (error.line, error.position) == (line, position), str(error)
    assert reason in error.reason, str(error)
    assert isinstance(error, VerificationError)
    assert str(error).startswith(f"line {line}")


@pytest.mark.parametrize(
    ("which", "attribute", "value"),
    [
        ("event", "time", "2001-01-01T00:00:00.000000Z"),
        ("event", "id", "did:key:z6MkSomeoneElse/1"),
        ("key", "time", "2001-01-01T00:00:00.000000Z"),
        ("checkpoint", "id", "elsewhere"),
        ("manifest", "time", "2001-01-01T00:00:00.000000Z"),
        ("header", "time", "2001-01-01T00:00:00.000000Z"),
        ("header", "source", "did:key:z6MkSomeoneElse"),
    ],
)
def test_cloudevents_attributes_must_say_what_the_line_says(
    built: Built,
    tmp_path: Path,
    executor: ProcessPoolExecutor,
    which: str,
    attribute: str,
    value: str,
) -> None:
    """What a SIEM indexes a CloudEvent by (``id``, ``source``, ``time``) is held to the
    line's own content, which the ledger signed: edited, the line is named."""
    lines = built.paths["cloudevents", False].read_text().splitlines()
    objects = [json.loads(line) for line in lines]
    i = next(n for n, ce in enumerate(objects) if ce["amkind"] == which)
    objects[i][attribute] = value
    path = tmp_path / "edited.jsonl"
    path.write_text("".join(json.dumps(ce, separators=(",", ":")) + "\n" for ce in objects))
    error = verify_both_ways(path, executor)
    assert isinstance(error, BundleVerificationError), f"{which} {attribute} went unnoticed"
    assert error.line == i + 1, str(error)
    assert "id, source or time differs" in error.reason, str(error)


def test_a_clock_running_back_is_caught_across_chunks(
    built: Built, tmp_path: Path, executor: ProcessPoolExecutor
) -> None:
    """Each chunk checks its own events' times; where one chunk ends and the next
    begins, the verifier does: with one line a chunk, every pair of events is a chunk
    boundary. An event recorded before the one ahead of it is named wherever it is,
    even when its signature no longer verifies either (the time is checked first)."""
    records, _ = load(built.paths["jsonl", False])
    events = indexes(records, "event")
    for nth in (1, len(events) // 2, len(events) - 1):
        tampered = copy.deepcopy(records)
        i = events[nth]
        before = parse_time(tampered[events[nth - 1]]["recorded_at"])
        tampered[i]["recorded_at"] = format_time(before - timedelta(microseconds=1))
        tampered[i]["signature"] = tampered[events[0]]["signature"]  # and a bad signature
        _rechain_from(tampered, i)
        lines = [json.dumps(r, separators=(",", ":")) for r in tampered]
        outcomes = []
        for options in ({"workers": 0}, {"executor": executor, "chunk": 1}):
            with pytest.raises(BundleVerificationError) as caught:
                verify_bundle(lines, **options)
            outcomes.append((caught.value.line, caught.value.position, caught.value.reason))
        assert outcomes[0] == outcomes[1]
        assert outcomes[0][:2] == (i + 1, tampered[i]["position"])
        assert "the ledger's clock never runs back" in outcomes[0][2]
    # Equal times (one batch shares its recorded_at) are not a clock running back.
    times = [records[i]["recorded_at"] for i in events]
    assert len(set(times)) < len(times), "the history should hold events of one batch"
    assert verify_bundle([json.dumps(r) for r in records], executor=executor, chunk=1).events


def test_every_single_line_removal_fails(built: Built, tmp_path: Path) -> None:
    lines = built.paths["jsonl", False].read_text().splitlines(keepends=True)
    path = tmp_path / "short.jsonl"
    for index in range(len(lines)):
        path.write_text("".join(lines[:index] + lines[index + 1 :]))
        with pytest.raises(BundleVerificationError):
            verify_bundle(path, workers=0, signatures=False)


# -- agent filters ----------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["jsonl", "cloudevents"])
def test_agent_bundle_holds_only_its_events_and_stubs(
    built: Built, flavour: str, executor: ProcessPoolExecutor
) -> None:
    history, did = built.history, built.history.rotated.did
    path = built.paths[flavour, True]
    report = verify_both_ways(path, executor)
    mine = [r for r in history.in_range if did in r.subjects]
    assert report.events == len(mine)
    assert report.stubs == len(history.in_range) - len(mine) > 0
    assert f"{len(mine)} events and {report.stubs} stubs for {did}" in report.summary()
    bundle = read_bundle(path)
    assert bundle.events == mine
    for record in bundle.events:
        event = decode_body(record.body)
        assert did == event.actor or did in subject_agents(event)
    assert {decode_body(k.body).did for k in bundle.keys} == {  # type: ignore[union-attr]
        r.actor for r in mine
    } - {history.key.did}
    records, _ = load(path)
    entries = [r["position"] for r in records if r["kind"] in ("event", "stub")]
    assert entries == [r.position for r in history.in_range]


def test_agent_bundle_tampering(built: Built, tmp_path: Path) -> None:
    path = tmp_path / "tampered.jsonl"
    did = built.history.key.did
    # an event hidden as a stub of itself: the chain holds, the signed manifest does not
    records, _ = load(built.paths["jsonl", True])
    i = indexes(records, "event")[1]
    fields = ("position", "prev_hash", "entry_hash")
    records[i] = {"kind": "stub", **{k: records[i][k] for k in fields}}
    save(path, records, False, did)
    with pytest.raises(BundleVerificationError, match="count") as info:
        verify_bundle(path, workers=0)
    assert info.value.line == len(records)
    # a stub with another hash breaks the link after it
    records, _ = load(built.paths["jsonl", True])
    i = indexes(records, "stub")[3]
    records[i]["entry_hash"] = "ab" * 32
    save(path, records, False, did)
    with pytest.raises(BundleVerificationError, match="prev_hash") as info:
        verify_bundle(path, workers=0)
    assert (info.value.line, info.value.position) == (i + 2, records[i]["position"] + 1)
    # someone else's event passed off as the agent's
    records, _ = load(built.paths["jsonl", False])
    header = {**records[0], "agent": built.history.rotated.did}
    manifest = {**records[-1], "agent": built.history.rotated.did}
    save(path, [header, *records[1:-1], manifest], False, did)
    with pytest.raises(BundleVerificationError, match="neither signed by nor about"):
        verify_bundle(path, workers=0)


# -- edge cases of the exporter ----------------------------------------------------------------


async def test_empty_range(built: Built, tmp_path: Path) -> None:
    history = built.history
    reader = await PostgresLedgerReader.connect(history.url)
    try:
        out = io.StringIO()
        manifest = await export_bundle(
            reader, history.key, out, start=T0 - timedelta(days=9), end=T0 - timedelta(days=8)
        )
    finally:
        await reader.close()
    assert (manifest.count, manifest.first_position, manifest.checkpoint_position) == (
        0,
        None,
        None,
    )
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["header", "manifest"]
    path = tmp_path / "empty.jsonl"
    path.write_text(out.getvalue())
    since = format_time(T0 - timedelta(days=9))
    assert verify_bundle(path).summary().startswith(f"bundle OK: no events from {since}")


async def test_agent_with_nothing_in_range_gets_only_stubs(built: Built, tmp_path: Path) -> None:
    history = built.history
    store = await PostgresEventStore.open(history.url, history.key, clock=history.clock)
    try:
        out = io.StringIO()
        manifest = await export_bundle(
            store, history.key, out, start=history.start, end=history.end, agent=Agent().did
        )
    finally:
        await store.close()
    assert (manifest.count, manifest.keys, manifest.stubs) == (0, 0, len(history.in_range))
    path = tmp_path / "stubs.jsonl"
    path.write_text(out.getvalue())
    assert verify_bundle(path, workers=0).stubs == len(history.in_range)


async def test_exporter_signs_and_stores_the_covering_checkpoint_once(
    database_url: str, ledger_key: SigningKey
) -> None:
    clock = ManualClock()
    store = await open_store(database_url, ledger_key, clock)
    try:
        await random_history(store, clock, seed=5, steps=20)
        end = clock.advance(minutes=1)
        clock.advance(minutes=1)
        await random_history(store, clock, seed=6, steps=5)
        assert await store.checkpoints() == []
        first = await export_bundle(store, ledger_key, io.StringIO(), start=T0, end=end)
        stored = await store.checkpoints()
        assert [c.position for c in stored] == [first.last_position]
        assert stored[0].head_hash == first.head_hash
        clock.advance(hours=1)
        again = io.StringIO()
        second = await export_bundle(store, ledger_key, again, start=T0, end=end, clock=clock)
        assert await store.checkpoints() == stored  # reused, not signed twice
        assert json.loads(again.getvalue().splitlines()[-2])["signature"] == stored[0].signature
        assert second.head_hash == first.head_hash
    finally:
        await store.close()


async def test_exporter_refuses_a_tampered_ledger_and_signs_nothing(
    database_url: str, ledger_key: SigningKey
) -> None:
    clock = ManualClock()
    store = await open_store(database_url, ledger_key, clock)
    try:
        await random_history(store, clock, seed=7, steps=30)
        end = clock.advance(minutes=1)
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                "UPDATE events SET body = convert_to(replace(convert_from(body, 'UTF8'), "
                "'\"occurred_at\":\"2026', '\"occurred_at\":\"2027'), 'UTF8') "
                "WHERE position = 17"
            )
            tampered = 17
        finally:
            await conn.close()
        with pytest.raises(VerificationError) as info:
            await export_bundle(store, ledger_key, io.StringIO(), start=T0, end=end)
        assert info.value.position == tampered
        assert await store.checkpoints() == []
    finally:
        await store.close()


async def test_export_arguments_are_checked(
    store: PostgresEventStore, ledger_key: SigningKey
) -> None:
    out = io.StringIO()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"start": T0, "end": T0}, "earlier"),
        ({"start": T0, "end": T0 + timedelta(1), "agent": "bob"}, "DID"),
        ({"start": T0, "end": T0 + timedelta(1), "fmt": "xml"}, "format"),
        ({"start": T0.replace(tzinfo=None), "end": T0 + timedelta(1)}, "timezone"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            await export_bundle(store, ledger_key, out, **kwargs)
    assert out.getvalue() == ""


# -- the CLI ---------------------------------------------------------------------------------------


def _cli(args: list[str], url: str, key: SigningKey) -> subprocess.CompletedProcess[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")},
        "AGENTMESH_DATABASE_URL": url,
        "AGENTMESH_AGENT_PRIVATE_KEY": key.private_key_pem(),
    }
    return subprocess.run(
        [sys.executable, "-m", "agentmesh", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
async def cli_ledger(database_url: str, ledger_key: SigningKey) -> AsyncIterator[History]:
    clock = ManualClock()
    store = await open_store(database_url, ledger_key, clock)
    try:
        yield await build_history(store, clock, database_url, ledger_key)
    finally:
        await store.close()


async def test_cli_export_and_verify(cli_ledger: History, tmp_path: Path) -> None:
    history, url, key = cli_ledger, cli_ledger.url, cli_ledger.key
    first, last = history.in_range[0].position, history.in_range[-1].position
    span = ["--from", format_time(history.start), "--to", format_time(history.end)]
    for flavour in ("jsonl", "cloudevents"):
        out = tmp_path / f"{flavour}.jsonl"
        result = _cli(["audit", "export", *span, "--format", flavour, "-o", str(out)], url, key)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(
            f"exported {len(history.in_range)} events (positions {first}..{last}), "
        )
        assert result.stderr == ""  # no progress bar without a terminal
        verified = _cli(["audit", "verify", str(out)], url, key)
        assert verified.returncode == 0, verified.stderr
        assert verified.stdout == (
            f"bundle OK: {len(history.in_range)} events (positions {first}..{last}), "
            f"{read_bundle(out).manifest.keys} keys, checkpoint {last} "  # type: ignore[union-attr]
            f"signed by {key.did}, every entry proven in the signed Merkle tree of {last} "
            f"({len(history.in_range)} events by their own inclusion proofs)\n"
        )
    pub = tmp_path / "ledger.pub.pem"
    pub.write_text(key.public.pem())
    pinned = _cli(["audit", "verify", str(out), "--ledger-public-key", str(pub)], url, key)
    assert pinned.returncode == 0, pinned.stderr
    agent = history.rotated.did
    mine = tmp_path / "mine.jsonl"
    result = _cli(["audit", "export", *span, "--agent", agent, "-o", str(mine)], url, key)
    assert result.returncode == 0, result.stderr
    assert " stubs (positions" in result.stdout
    assert f"stubs for {agent}" in _cli(["audit", "verify", str(mine)], url, key).stdout


async def test_cli_verify_names_the_bad_line(cli_ledger: History, tmp_path: Path) -> None:
    url, key = cli_ledger.url, cli_ledger.key
    out = tmp_path / "bundle.jsonl"
    span = ["--from", format_time(cli_ledger.start), "--to", format_time(cli_ledger.end)]
    assert _cli(["audit", "export", *span, "-o", str(out)], url, key).returncode == 0
    records, _ = load(out)
    line, position, _ = edit_and_rechain(records, key)
    save(out, records, False, key.did)
    bad = _cli(["audit", "verify", str(out)], url, key)
    assert bad.returncode == 1
    assert bad.stdout == ""
    assert bad.stderr.splitlines() == [
        f"agentmesh: error: line {line} (position {position}): signature does not verify"
    ]


async def test_cli_bad_input(cli_ledger: History, tmp_path: Path) -> None:
    url, key = cli_ledger.url, cli_ledger.key
    out = tmp_path / "bundle.jsonl"
    span = ["--from", format_time(cli_ledger.start), "--to", format_time(cli_ledger.end)]
    for args in (
        ["--from", "yesterday", "--to", format_time(cli_ledger.end)],
        [*span, "--format", "xml"],
        [*span, "--agent", "bob"],
        ["--to", format_time(cli_ledger.end)],
    ):
        result = _cli(["audit", "export", *args, "-o", str(out)], url, key)
        assert result.returncode == 2, args
        assert result.stderr.splitlines()[-1].startswith("agentmesh audit export: error: ")
    backwards = ["--from", format_time(cli_ledger.end), "--to", format_time(cli_ledger.start)]
    result = _cli(["audit", "export", *backwards, "-o", str(out)], url, key)
    assert (result.returncode, result.stderr) == (
        1,
        "agentmesh: error: --from must be earlier than --to\n",
    )
    missing = _cli(["audit", "verify", str(tmp_path / "nope.jsonl")], url, key)
    assert missing.returncode == 1
    assert missing.stderr.splitlines() == [
        f"agentmesh: error: cannot read {tmp_path / 'nope.jsonl'}: No such file or directory"
    ]
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("hello\n")
    result = _cli(["audit", "verify", str(garbage)], url, key)
    assert result.returncode == 1
    assert result.stderr.startswith("agentmesh: error: line 1: not a bundle line")
    assert not out.exists()


async def test_cli_failed_export_leaves_no_partial_bundle(
    cli_ledger: History, tmp_path: Path
) -> None:
    url, key = cli_ledger.url, cli_ledger.key
    out = tmp_path / "bundle.jsonl"
    out.write_text("the previous bundle\n")
    tampered = cli_ledger.in_range[len(cli_ledger.in_range) // 2].position
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "UPDATE events SET stream_version = stream_version + 1 WHERE position = $1", tampered
        )
    finally:
        await conn.close()
    span = ["--from", format_time(cli_ledger.start), "--to", format_time(cli_ledger.end)]
    result = _cli(["audit", "export", *span, "-o", str(out)], url, key)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"agentmesh: error: position {tampered}: entry_hash does not match the entry's content"
    ]
    assert out.read_text() == "the previous bundle\n"
    assert sorted(os.listdir(tmp_path)) == ["bundle.jsonl"]


# -- the API ---------------------------------------------------------------------------------------


async def test_api_streams_a_bundle_that_verifies(
    database_url: str, redis_server: EmbeddedRedis, ledger_key: SigningKey
) -> None:
    settings = api_settings(database_url, redis_server, ledger_key)
    async with running_api(settings) as api:
        alice, bob = await api.register(), await api.register()
        start = api.clock.advance(seconds=1)  # after the registrations
        for index in range(3):
            api.clock.advance(seconds=1)
            body = signed(alice.violation(subject=bob.did, rule=f"r{index}").event, alice.key)
            created = await api.client.post("/v1/violations", json=body)
            assert created.status_code == 201, created.text
        end = api.clock.advance(seconds=1)
        params = {"from": format_time(start), "to": format_time(end)}
        for flavour in ("jsonl", "cloudevents"):
            response = await api.client.get(
                "/v1/audit/export", params={**params, "format": flavour}, headers=ADMIN
            )
            assert response.status_code == 200, response.text
            assert response.headers["content-type"].startswith("application/x-ndjson")
            assert "attachment" in response.headers["content-disposition"]
            report = verify_bundle(response.text.splitlines(), workers=0)
            assert report.events == 3
            assert report.manifest.signer == ledger_key.did
        filtered = await api.client.get(
            "/v1/audit/export", params={**params, "agent": bob.did}, headers=ADMIN
        )
        assert verify_bundle(filtered.text.splitlines(), workers=0).events == 3
        no_token = await api.client.get("/v1/audit/export", params=params)
        assert no_token.status_code == 401
        assert no_token.headers["content-type"].startswith("application/problem+json")
        wrong = await api.client.get(
            "/v1/audit/export", params=params, headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 403
        for bad in (
            {"to": params["to"]},
            {**params, "from": "yesterday"},
            {**params, "from": "9999-12-31T23:59:59-05:00"},
            {**params, "from": params["to"]},
            {**params, "agent": "bob"},
            {**params, "format": "xml"},
        ):
            response = await api.client.get("/v1/audit/export", params=bad, headers=ADMIN)
            assert response.status_code == 400, (bad, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.json()["status"] == 400


# -- keep the helpers honest -----------------------------------------------------------------------


def test_rehash_matches_the_bundle(built: Built) -> None:
    records, _ = load(built.paths["cloudevents", False])
    for record in records:
        if record["kind"] in ("key", "event"):
            before = record["entry_hash"]
            rehash(record)
            assert record["entry_hash"] == before
