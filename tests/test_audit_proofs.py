"""Per-event inclusion proofs in audit bundles: made batch by batch on export
(``ledger.audit.proofs.BatchProver``), followed with shared states on verification
(``RootMemo``), and a filtered bundle of a ledger of thousands of entries (several
export batches, stored subtrees) that proves every event it shows, and fails, naming
the event, when a proof is tampered with, dropped, or belongs to another position."""

from __future__ import annotations

import base64
import io
import json
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from bench.ledger_gen import GeneratedLedger, generate_ledger
from ledger import merkle, tlog
from ledger.audit import BundleVerificationError, export_bundle, verify_bundle
from ledger.audit.bundle import Manifest
from ledger.audit.proofs import RootMemo, batch_proofs
from ledger.errors import ProofError, VerificationError
from ledger.identity import b64encode
from ledger.note import open_checkpoint
from ledger.postgres import PostgresEventStore
from ledger.timefmt import parse_time

# -- pure: the prover and the memo against ledger.merkle ----------------------------------


def tree(size: int) -> dict[tuple[int, int], bytes]:
    """Every complete subtree of a tree of ``size`` made-up leaves."""
    nodes = {(0, i): merkle.leaf_hash(i.to_bytes(8, "big")) for i in range(size)}
    level = 0
    while (2 << level) <= size:
        for index in range(size >> (level + 1)):
            nodes[(level + 1, index)] = merkle.node_hash(
                nodes[(level, 2 * index)], nodes[(level, 2 * index + 1)]
            )
        level += 1
    return nodes


@pytest.mark.parametrize("size", [1, 2, 3, 16, 17, 100, 257, 1000])
async def test_batch_proofs_are_the_rfc_paths_and_fetch_only_past_the_batch(size: int) -> None:
    nodes = tree(size)
    rng = random.Random(size)
    first = rng.randint(0, size - 1)  # leaf index of the range's first entry
    fetched: dict[tuple[int, int], bytes] = {}
    asked: list[tuple[int, set[tuple[int, int]]]] = []
    start = first
    while start < size:
        end = min(size, start + rng.randint(1, 40))
        leaves = [nodes[(0, i)] for i in range(start, end)]
        before = merkle.frontier_at(start, lambda lv, ix: nodes[(lv, ix)])
        shown = sorted(rng.sample(range(start, end), rng.randint(0, end - start)))

        async def fetch(
            wanted: set[tuple[int, int]], end: int = end
        ) -> dict[tuple[int, int], bytes]:
            asked.append((end, wanted))
            return {key: nodes[key] for key in wanted if key in nodes}

        paths = await batch_proofs(size, before, leaves, shown, fetched, fetch)
        for index, path in zip(shown, paths, strict=True):
            assert path == merkle.inclusion_proof(index, size, lambda lv, ix: nodes[(lv, ix)])
        start = end
    for end, wanted in asked:  # the store is asked only for subtrees past the batch
        assert all(((ix + 1) << lv) > end for lv, ix in wanted)


def test_the_memo_gives_every_root_and_misses_no_tampered_hash() -> None:
    size = 300
    nodes = tree(size)
    root = merkle.root_at(size, lambda lv, ix: nodes[(lv, ix)])
    memo = RootMemo()
    order = list(range(size))
    random.Random(1).shuffle(order)
    for index in sorted(order[:200]) + order:  # runs in order, then at random
        path = merkle.inclusion_proof(index, size, lambda lv, ix: nodes[(lv, ix)])
        texts = [base64.b64encode(h).decode() for h in path]
        assert memo.root(nodes[(0, index)], index, size, texts) == root
        for level in range(len(texts)):  # any one hash changed: another root
            bad = bytearray(path[level])
            bad[5] ^= 0x10
            changed = [*texts[:level], base64.b64encode(bytes(bad)).decode(), *texts[level + 1 :]]
            assert memo.root(nodes[(0, index)], index, size, changed) != root
        with pytest.raises(ProofError, match="shorter"):
            memo.root(nodes[(0, index)], index, size, texts[:-1])
        with pytest.raises(ProofError, match="longer"):
            memo.root(nodes[(0, index)], index, size, [*texts, texts[0]])


# -- a filtered bundle of a bigger ledger, through PostgreSQL -----------------------------

ENTRIES = 4500  # three export batches of 2,000


@pytest.fixture(scope="module")
def executor() -> Any:
    pool = ProcessPoolExecutor(max_workers=2)
    yield pool
    pool.shutdown()


@pytest.fixture
async def generated(database_url: str) -> tuple[str, GeneratedLedger]:
    ledger = await generate_ledger(database_url, events=ENTRIES, agents=20, workers=2)
    store = await PostgresEventStore.open(database_url, ledger.ledger_key)  # builds the tree
    await store.close()
    return database_url, ledger


async def export(url: str, ledger: GeneratedLedger, agent: str | None, fmt: str = "jsonl") -> str:
    store = await PostgresEventStore.open(url, ledger.ledger_key)
    try:
        out = io.StringIO()
        await export_bundle(
            store,
            ledger.ledger_key,
            out,
            start=parse_time("2000-01-01T00:00:00.000000Z"),
            end=parse_time("2100-01-01T00:00:00.000000Z"),
            agent=agent,
            fmt=fmt,  # type: ignore[arg-type]
        )
    finally:
        await store.close()
    return out.getvalue()


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def save(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines))


def events_of(lines: list[dict[str, Any]]) -> list[int]:
    return [i for i, x in enumerate(lines) if x["kind"] == "event"]


async def test_a_filtered_bundle_proves_each_event_and_names_a_bad_proof(
    generated: tuple[str, GeneratedLedger], tmp_path: Path, executor: ProcessPoolExecutor
) -> None:
    url, ledger = generated
    agent = ledger.agents[3].did
    path = tmp_path / "agent.jsonl"
    path.write_text(await export(url, ledger, agent))
    good = lines_of(path)
    shown = events_of(good)
    assert 100 < len(shown) < ENTRIES // 5  # a filtered bundle: stubs in between
    for options in ({"workers": 0}, {"executor": executor, "chunk": 300}):
        report = verify_bundle(path, ledger_key=ledger.ledger_key.public, **options)
        assert report.proofs == report.events == len(shown)
        assert report.tree_size == ENTRIES
    note = next(x for x in good if x["kind"] == "checkpoint")["note"]
    head, _ = open_checkpoint(note, [tlog.verifier(ledger.ledger_key.public)])
    for i in shown:  # each event alone, with the signed note, is an RFC 9162 proof
        item = good[i]
        assert item["inclusion"]["tree_size"] == head.size == ENTRIES
        merkle.verify_inclusion(
            tlog.entry_leaf(bytes.fromhex(item["entry_hash"])),
            item["position"] - 1,
            head.size,
            [base64.b64decode(h) for h in item["inclusion"]["hashes"]],
            head.root_hash,
        )

    middle = shown[len(shown) // 2]

    def fails(lines: list[dict[str, Any]], reason: str, at: int = middle) -> None:
        bad = tmp_path / "bad.jsonl"
        save(bad, lines)
        for options in ({"workers": 0}, {"executor": executor, "chunk": 300}):
            with pytest.raises(BundleVerificationError) as caught:
                verify_bundle(bad, **options)
            assert (caught.value.line, caught.value.position) == (at + 1, lines[at]["position"])
            assert caught.value.reason == reason
            assert str(caught.value).count("\n") == 0

    # a hash high up the path changed (the neighbours' paths share it)
    tampered = json.loads(json.dumps(good))
    hashes = tampered[middle]["inclusion"]["hashes"]
    raw = bytearray(base64.b64decode(hashes[-2]))
    raw[0] ^= 1
    hashes[-2] = base64.b64encode(bytes(raw)).decode()
    fails(tampered, "the inclusion proof does not lead to the signed tree head's root")
    # the proof dropped
    dropped = json.loads(json.dumps(good))
    del dropped[middle]["inclusion"]
    fails(dropped, "no inclusion proof")
    # the proof of another position: the event is not in the log where it says
    other = json.loads(json.dumps(good))
    other[middle]["inclusion"] = good[shown[0]]["inclusion"]
    fails(other, "the inclusion proof does not lead to the signed tree head's root")
    # a proof against another tree
    smaller = json.loads(json.dumps(good))
    smaller[middle]["inclusion"]["tree_size"] = ENTRIES - 1
    fails(
        smaller,
        f"the inclusion proof is for a tree of {ENTRIES - 1} entries, the signed tree "
        f"head's has {ENTRIES}",
    )
    # a proof one hash short
    short = json.loads(json.dumps(good))
    short[middle]["inclusion"]["hashes"].pop()
    fails(short, "inclusion proof is shorter than the path to the root")
    # the event edited: its own hash no longer recomputes
    edited = json.loads(json.dumps(good))
    edited[middle]["body"] = edited[middle]["body"].replace('"actor"', '"actor" ', 1)
    fails(edited, "entry_hash does not match the entry's content")


async def test_an_unfiltered_bundle_carries_a_proof_per_event_in_both_flavours(
    generated: tuple[str, GeneratedLedger], tmp_path: Path
) -> None:
    url, ledger = generated
    for fmt in ("jsonl", "cloudevents"):
        path = tmp_path / f"all.{fmt}"
        path.write_text(await export(url, ledger, None, fmt))
        report = verify_bundle(path, workers=0, ledger_key=ledger.ledger_key.public)
        assert report.proofs == report.events == ENTRIES
        assert "(4500 events by their own inclusion proofs)" in report.summary()


def test_a_version_1_bundle_still_verifies_by_its_range_proof(tmp_path: Path) -> None:
    """Bundles exported before per-event proofs: no ``inclusion``, version 1 in the
    header and the signed manifest."""
    from tests.assets.audit.make_assets import LEDGER_KEY

    lines = lines_of(Path(__file__).parent / "assets" / "audit" / "good.jsonl")
    for item in lines:
        item.pop("inclusion", None)
    lines[0]["format_version"] = 1
    manifest = msgspec.convert(
        {
            **lines[-1],
            "format_version": 1,
            "signature": "",
            "keys_digest": None,
            "generated_at": None,
        },
        Manifest,
    )
    signed = msgspec.structs.replace(
        manifest, signature=b64encode(LEDGER_KEY.sign(manifest.signed_bytes()))
    )
    lines[-1] = json.loads(msgspec.json.encode(signed))
    path = tmp_path / "v1.jsonl"
    save(path, lines)
    report = verify_bundle(path, workers=0, ledger_key=LEDGER_KEY.public)
    assert (report.events, report.proofs, report.tree_size) == (3, 0, 5)
    lines[0]["format_version"] = 2  # the same lines called version 2: proofs missing
    save(path, lines)
    with pytest.raises(BundleVerificationError, match="no inclusion proof"):
        verify_bundle(path, workers=0)


async def test_export_refuses_a_stored_tree_that_disagrees_with_the_entries(
    generated: tuple[str, GeneratedLedger],
) -> None:
    """A subtree row changed in the database (leaves 2048..4095, a right sibling the
    first export batch reads from the store): the proofs made from it would not lead to
    the root of the entries; the export stops before the ledger key signs anything."""
    url, ledger = generated
    conn = await asyncpg.connect(url)
    try:
        changed = await conn.execute(
            "UPDATE merkle_nodes SET hash = sha256(hash) WHERE level = 11 AND idx = 1"
        )
        assert changed == "UPDATE 1"
        checkpoints = await conn.fetchval("SELECT count(*) FROM checkpoints")
    finally:
        await conn.close()
    with pytest.raises(VerificationError, match="stored Merkle tree"):
        await export(url, ledger, ledger.agents[3].did)
    conn = await asyncpg.connect(url)
    try:  # no covering checkpoint was signed and stored either
        assert await conn.fetchval("SELECT count(*) FROM checkpoints") == checkpoints
    finally:
        await conn.close()
