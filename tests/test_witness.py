"""The witness: its pure core over real signed notes and real Merkle trees, and the CLI."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import httpx
import pytest

from agentmesh.cli import main
from agentmesh.embedded import EmbeddedRedis, free_port
from agentmesh.witness import (
    EXIT_ALARM,
    STATE_FORMAT,
    Accepted,
    Alarm,
    AlarmKind,
    SignedCheckpoint,
    StateError,
    WitnessConfig,
    WitnessMetrics,
    WitnessState,
    check_consistency,
    cosign,
    decide,
    load_state,
    needs_proof,
    open_ledger_checkpoint,
    run_witness,
    serve_metrics,
    write_state,
)
from ledger import tlog
from ledger.canonical import canonical_bytes
from ledger.chain import GENESIS_HASH, entry_hash, envelope_bytes
from ledger.errors import ProofError
from ledger.identity import SigningKey
from ledger.merkle import (
    EMPTY_ROOT,
    Frontier,
    consistency_proof,
    leaf_hash,
    root_at,
    verify_consistency,
)
from ledger.note import (
    Checkpoint,
    CosignatureSigner,
    CosignatureVerifier,
    Ed25519Signer,
    Ed25519Verifier,
    cosignature_timestamp,
    open_note,
    parse_note,
    sign_checkpoint,
)
from tests.api_support import ADMIN, Api, api_settings, running_api
from tests.support import Agent

NOW = 1_764_489_600


class Tree:
    """A real RFC 9162 tree over entry hashes, leaf i = SHA-256(0x00 ‖ entry_hash of i+1)."""

    def __init__(self, entries: list[bytes]) -> None:
        self.entries = entries
        _, subtrees = Frontier().extend_with_subtrees(leaf_hash(e) for e in entries)
        self.stored = {(s.level, s.index): s.hash for s in subtrees}

    def hash_at(self, level: int, index: int) -> bytes:
        return self.stored[(level, index)]

    def root(self, size: int) -> bytes:
        return root_at(size, self.hash_at)

    def proof(self, first: int, second: int) -> list[bytes]:
        return consistency_proof(first, second, self.hash_at)


def entries(count: int, salt: bytes = b"") -> list[bytes]:
    return [hashlib.sha256(salt + b"entry %d" % i).digest() for i in range(count)]


class Ledger:
    """A ledger's signing side: its key, named as the API names it."""

    def __init__(self, key: SigningKey | None = None, name: str | None = None) -> None:
        self.key = key or SigningKey.generate()
        self.name = name or f"agentmesh.ledger/{self.key.did}"
        self.signer = Ed25519Signer(self.name, self.key)
        self.verifier: Ed25519Verifier = self.signer.verifier()

    def checkpoint(self, tree: Tree, size: int, origin: str | None = None) -> str:
        return sign_checkpoint(Checkpoint(origin or self.name, size, tree.root(size)), self.signer)


WITNESS_KEY = SigningKey.generate()
WITNESS = CosignatureSigner("agentmesh.witness/test", WITNESS_KEY, NOW)
WITNESS_VERIFIER: CosignatureVerifier = WITNESS.verifier()


def accepted_state(ledger: Ledger, note: str) -> WitnessState:
    """The state after accepting ``note`` with nothing before it (first use)."""
    decision = decide(None, note, ledger.verifier, None)
    assert isinstance(decision, Accepted)
    return cosign(decision.signed, WITNESS)


def is_alarm(decision: Accepted | Alarm, kind: AlarmKind) -> Alarm:
    assert isinstance(decision, Alarm), decision
    assert decision.kind is kind, decision.line()
    return decision


# --- accept -------------------------------------------------------------------------------


def test_first_checkpoint_is_accepted_on_first_use_and_cosigned() -> None:
    ledger, tree = Ledger(), Tree(entries(5))
    decision = decide(None, ledger.checkpoint(tree, 5), ledger.verifier, None)
    assert isinstance(decision, Accepted)
    assert decision.first_use
    state = cosign(decision.signed, WITNESS)
    assert (state.size, state.root_hash) == (5, tree.root(5))
    # The cosigned note verifies under the ledger's key and under the witness's.
    text = state.note_text()
    assert (
        open_note(text, [ledger.verifier]).text == Checkpoint(ledger.name, 5, tree.root(5)).body()
    )
    by_witness = open_note(text, [WITNESS_VERIFIER])
    assert cosignature_timestamp(by_witness.verified[0]) == NOW == state.cosigned_at
    assert text.endswith(state.cosignature.line())


def test_growth_with_a_verifying_consistency_proof_is_accepted() -> None:
    ledger, tree = Ledger(), Tree(entries(23))
    state = accepted_state(ledger, ledger.checkpoint(tree, 7))
    for size in (8, 13, 16, 23):
        note = ledger.checkpoint(tree, size)
        opened = open_ledger_checkpoint(note, ledger.verifier)
        assert isinstance(opened, SignedCheckpoint)
        assert needs_proof(state, opened.checkpoint)
        decision = decide(state, note, ledger.verifier, tree.proof(state.size, size))
        assert isinstance(decision, Accepted)
        assert not decision.first_use
        state = cosign(decision.signed, WITNESS)
    assert (state.size, state.root_hash) == (23, tree.root(23))


def test_same_size_same_root_is_accepted_again() -> None:
    ledger, tree = Ledger(), Tree(entries(9))
    state = accepted_state(ledger, ledger.checkpoint(tree, 9))
    decision = decide(state, ledger.checkpoint(tree, 9), ledger.verifier, None)
    assert isinstance(decision, Accepted)
    assert not decision.first_use


def test_growth_from_the_empty_tree_needs_no_proof() -> None:
    ledger, tree = Ledger(), Tree(entries(4))
    empty = accepted_state(ledger, ledger.checkpoint(tree, 0))
    assert empty.root_hash == EMPTY_ROOT
    grown = open_ledger_checkpoint(ledger.checkpoint(tree, 4), ledger.verifier)
    assert isinstance(grown, SignedCheckpoint)
    assert not needs_proof(empty, grown.checkpoint)
    assert isinstance(check_consistency(empty, grown, None), Accepted)


def test_a_needed_proof_must_be_given() -> None:
    ledger, tree = Ledger(), Tree(entries(4))
    state = accepted_state(ledger, ledger.checkpoint(tree, 2))
    with pytest.raises(ValueError, match="consistency proof from 2 to 4"):
        decide(state, ledger.checkpoint(tree, 4), ledger.verifier, None)


# --- alarms -------------------------------------------------------------------------------


def test_a_smaller_tree_is_a_rollback() -> None:
    ledger, tree = Ledger(), Tree(entries(10))
    state = accepted_state(ledger, ledger.checkpoint(tree, 10))
    alarm = is_alarm(
        decide(state, ledger.checkpoint(tree, 7), ledger.verifier, None), AlarmKind.ROLLBACK
    )
    assert alarm.old is not None
    assert alarm.new is not None
    assert (alarm.old.size, alarm.new.size) == (10, 7)
    line = alarm.line()
    assert "rollback" in line
    assert "\n" not in line
    root10 = base64.b64encode(tree.root(10)).decode()
    root7 = base64.b64encode(tree.root(7)).decode()
    assert f"size 10 root {root10}" in line
    assert f"size 7 root {root7}" in line


def test_same_size_with_another_root_is_a_fork() -> None:
    ledger = Ledger()
    honest = Tree(entries(10))
    rewritten = entries(10)
    rewritten[3] = hashlib.sha256(b"rewritten").digest()
    forged = Tree(rewritten)
    state = accepted_state(ledger, ledger.checkpoint(honest, 10))
    alarm = is_alarm(
        decide(state, ledger.checkpoint(forged, 10), ledger.verifier, None), AlarmKind.FORK
    )
    assert "different root" in alarm.reason


def test_a_rewritten_history_that_grew_fails_its_consistency_proof() -> None:
    # Entry 4 rewritten and re-chained, then the ledger grew: the forged tree can
    # only offer proofs from its own history, which do not lead to the old root.
    ledger = Ledger()
    honest = entries(6)
    forged_entries = entries(12, salt=b"forged")
    forged_entries[:3] = honest[:3]
    forged = Tree(forged_entries)
    state = accepted_state(ledger, ledger.checkpoint(Tree(honest), 6))
    note = ledger.checkpoint(forged, 12)
    alarm = is_alarm(decide(state, note, ledger.verifier, forged.proof(6, 12)), AlarmKind.FORK)
    assert alarm.reason.startswith("consistency proof:")


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: p[:-1], id="truncated"),
        pytest.param(lambda p: [*p, p[0]], id="padded"),
        pytest.param(lambda p: [hashlib.sha256(p[0]).digest(), *p[1:]], id="altered"),
        pytest.param(lambda p: [], id="empty"),
        pytest.param(lambda p: [p[0][:31], *p[1:]], id="short-hash"),
    ],
)
def test_a_consistency_proof_that_does_not_verify_is_a_fork(
    damage: Callable[[list[bytes]], list[bytes]],
) -> None:
    ledger, tree = Ledger(), Tree(entries(21))
    state = accepted_state(ledger, ledger.checkpoint(tree, 11))
    proof = damage(tree.proof(11, 21))
    is_alarm(decide(state, ledger.checkpoint(tree, 21), ledger.verifier, proof), AlarmKind.FORK)


def test_a_checkpoint_by_another_key_is_refused_even_under_the_ledger_name() -> None:
    ledger, tree = Ledger(), Tree(entries(5))
    state = accepted_state(ledger, ledger.checkpoint(tree, 3))
    impostor = Ledger(name=ledger.name)  # a fresh key calling itself the ledger
    for note in (impostor.checkpoint(tree, 5), Ledger().checkpoint(tree, 5, origin=ledger.name)):
        decision = decide(state, note, ledger.verifier, tree.proof(3, 5))
        alarm = is_alarm(decision, AlarmKind.BAD_SIGNATURE)
        assert alarm.old == state.checkpoint
        assert alarm.new == Checkpoint(ledger.name, 5, tree.root(5))
    # Nothing is accepted unsigned by the pinned key, not even on first use.
    is_alarm(
        decide(None, impostor.checkpoint(tree, 5), ledger.verifier, None), AlarmKind.BAD_SIGNATURE
    )


def test_a_checkpoint_whose_ledger_signature_fails_is_refused() -> None:
    ledger, tree = Ledger(), Tree(entries(5))
    note = ledger.checkpoint(tree, 5)
    # Same signature line, body claiming a bigger tree.
    forged = note.replace("\n5\n", "\n6\n", 1)
    is_alarm(decide(None, forged, ledger.verifier, None), AlarmKind.BAD_SIGNATURE)


@pytest.mark.parametrize(
    "note",
    [
        pytest.param("not a note", id="text"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param("origin\n5\nAAAA\n", id="no-signatures"),
        pytest.param("", id="empty"),
    ],
)
def test_garbage_is_malformed(note: str | bytes) -> None:
    ledger = Ledger()
    is_alarm(decide(None, note, ledger.verifier, None), AlarmKind.MALFORMED)


def test_a_signed_note_that_is_not_this_ledgers_checkpoint_is_malformed() -> None:
    ledger, tree = Ledger(), Tree(entries(5))
    state = accepted_state(ledger, ledger.checkpoint(tree, 5))
    from ledger.note import sign_note

    not_a_checkpoint = sign_note("hello\n", ledger.signer)
    is_alarm(decide(state, not_a_checkpoint, ledger.verifier, None), AlarmKind.MALFORMED)
    other_origin = ledger.checkpoint(tree, 5, origin="example.com/other-log")
    alarm = is_alarm(decide(state, other_origin, ledger.verifier, None), AlarmKind.MALFORMED)
    assert "origin" in alarm.reason
    empty_with_root = sign_checkpoint(Checkpoint(ledger.name, 0, tree.root(5)), ledger.signer)
    is_alarm(decide(None, empty_with_root, ledger.verifier, None), AlarmKind.MALFORMED)


# --- state file -------------------------------------------------------------------------


def test_state_round_trips_through_its_json_and_is_reverified(tmp_path: Path) -> None:
    ledger, tree = Ledger(), Tree(entries(6))
    state = accepted_state(ledger, ledger.checkpoint(tree, 6))
    text = state.to_json(ledger.verifier, WITNESS_VERIFIER)
    document = json.loads(text)
    assert document["format"] == STATE_FORMAT
    assert (document["size"], document["root_hash"]) == (6, base64.b64encode(tree.root(6)).decode())
    assert document["ledger_vkey"] == ledger.verifier.vkey()
    assert document["witness_vkey"] == WITNESS_VERIFIER.vkey()
    assert document["cosigned_at"] == NOW
    assert document["checkpoint"] == state.note_text()
    assert WitnessState.from_json(text, ledger.verifier, WITNESS_VERIFIER) == state
    path = tmp_path / "state.json"
    write_state(path, text)
    write_state(path, text)  # replacing is fine too
    assert path.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left


def test_state_of_another_ledger_or_witness_or_edited_is_refused() -> None:
    ledger, tree = Ledger(), Tree(entries(6))
    state = accepted_state(ledger, ledger.checkpoint(tree, 6))
    text = state.to_json(ledger.verifier, WITNESS_VERIFIER)
    with pytest.raises(StateError, match="ledger key"):
        WitnessState.from_json(text, Ledger().verifier, WITNESS_VERIFIER)
    other_witness = CosignatureVerifier("agentmesh.witness/test", SigningKey.generate().public)
    with pytest.raises(StateError, match="witness key"):
        WitnessState.from_json(text, ledger.verifier, other_witness)
    document = json.loads(text)
    document["size"] = 5
    with pytest.raises(StateError, match="disagree"):
        WitnessState.from_json(json.dumps(document), ledger.verifier, WITNESS_VERIFIER)
    document = json.loads(text)
    document["checkpoint"] = document["checkpoint"].replace("\n6\n", "\n5\n", 1)
    with pytest.raises(StateError, match="does not verify"):
        WitnessState.from_json(json.dumps(document), ledger.verifier, WITNESS_VERIFIER)
    with pytest.raises(StateError, match="not JSON"):
        WitnessState.from_json("{", ledger.verifier, WITNESS_VERIFIER)


# --- the command line, without an API ----------------------------------------------------


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the CLI in this process; its logging setup is undone afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quieted = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    try:
        with pytest.raises(SystemExit) as exited:
            main(argv)
    finally:
        # configure_logging points the root logger at this test's captured stderr,
        # which is closed once the test ends.
        root.handlers[:], root.level = handlers, level
        for name, old in quieted.items():
            logging.getLogger(name).setLevel(old)
    code = exited.value.code
    assert isinstance(code, int)
    return code, capsys.readouterr().err


@pytest.fixture
def witness_key(tmp_path: Path) -> Path:
    path = tmp_path / "witness.pem"
    path.write_text(WITNESS_KEY.private_key_pem())
    return path


def test_cli_unreachable_api_is_one_line_and_exit_1(
    tmp_path: Path, witness_key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = ["witness", "--url", url, "--vkey", Ledger().verifier.vkey()]
    args += ["--state", str(tmp_path / "state.json"), "--key", str(witness_key), "--once"]
    code, err = cli(args, capsys)
    assert code == 1
    error_lines = [line for line in err.splitlines() if line.startswith("agentmesh: error:")]
    assert len(error_lines) == 1
    assert error_lines[0].startswith(f"agentmesh: error: cannot reach {url}/v1/ledger/checkpoint: ")
    assert not (tmp_path / "state.json").exists()


@pytest.mark.parametrize(
    ("vkey", "message"),
    [
        ("nonsense", "verifier key is not"),
        (CosignatureVerifier("w", SigningKey.generate().public).vkey(), "Ed25519 note key"),
    ],
)
def test_cli_refuses_a_bad_ledger_vkey(
    tmp_path: Path,
    witness_key: Path,
    capsys: pytest.CaptureFixture[str],
    vkey: str,
    message: str,
) -> None:
    args = ["witness", "--url", "http://127.0.0.1:1", "--vkey", vkey]
    args += ["--state", str(tmp_path / "s.json"), "--key", str(witness_key), "--once"]
    code, err = cli(args, capsys)
    assert code == 1
    assert message in err
    assert len(err.splitlines()) == 1


def test_cli_refuses_a_state_file_of_another_ledger(
    tmp_path: Path, witness_key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger, tree = Ledger(), Tree(entries(3))
    state = accepted_state(ledger, ledger.checkpoint(tree, 3))
    path = tmp_path / "state.json"
    path.write_text(state.to_json(ledger.verifier, WITNESS_VERIFIER))
    args = [
        "witness",
        "--url",
        f"http://127.0.0.1:{free_port()}",
        "--vkey",
        Ledger().verifier.vkey(),
    ]
    args += ["--state", str(path), "--key", str(witness_key), "--name", WITNESS.name, "--once"]
    code, err = cli(args, capsys)
    assert code == 1
    assert "state was accepted under ledger key" in err.splitlines()[-1]


# --- against the real API: PostgreSQL, Redis, the ledger's own checkpoints ----------------


@pytest.fixture
async def api(
    database_url: str, redis_server: EmbeddedRedis, ledger_key: SigningKey
) -> AsyncIterator[Api]:
    # A checkpoint after every append, as a busy ledger would have between two polls.
    settings = api_settings(
        database_url, redis_server, ledger_key, AGENTMESH_LEDGER_CHECKPOINT_EVERY="1"
    )
    async with running_api(settings) as running:
        yield running


def witness_config(api: Api, ledger_key: SigningKey, state: Path) -> WitnessConfig:
    """A --once witness pinned to the ledger key, known out of band (here: the test's)."""
    return WitnessConfig(
        url=api.url,
        ledger=tlog.verifier(ledger_key.public),
        state_path=state,
        key=WITNESS_KEY,
        name=WITNESS.name,
        once=True,
    )


async def grow(api: Api, count: int) -> int:
    """Append ``count`` registrations; return the head position."""
    for _ in range(count):
        agent = Agent()
        response = await api.client.post(
            "/v1/agents", headers=ADMIN, json={"public_key": agent.key.public.pem()}
        )
        assert response.status_code == 201, response.text
    return await api.head()


def state_size(path: Path) -> int:
    size: int = json.loads(path.read_text())["size"]
    return size


def alarm_files(config: WitnessConfig) -> list[Path]:
    found = sorted(config.state_path.parent.glob(f"{config.state_path.name}.alarm-*.json"))
    assert found
    return found


def alarms(metrics: WitnessMetrics, kind: AlarmKind) -> float:
    value = metrics.registry.get_sample_value("agentmesh_witness_alarms_total", {"kind": kind})
    assert value is not None
    return value


async def cli_witness(config: WitnessConfig, *extra: str) -> tuple[int, list[str]]:
    """``agentmesh witness --once`` as a real process: its exit code and stderr lines."""
    key_file = config.state_path.parent / "witness.pem"
    key_file.write_text(config.key.private_key_pem())
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentmesh",
        "witness",
        "--url",
        config.url,
        "--state",
        str(config.state_path),
        "--key",
        str(key_file),
        "--name",
        config.name,
        "--once",
        *(extra or ("--vkey", config.ledger.vkey())),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "AGENTMESH_LOG_FORMAT": "text"},
    )
    _, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, err.decode().splitlines()


class Attacker:
    """Write access to the ledger's PostgreSQL, and no ledger key."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    @classmethod
    @contextlib.asynccontextmanager
    async def on(cls, database_url: str) -> AsyncIterator[Attacker]:
        conn = await asyncpg.connect(database_url)
        try:
            yield cls(conn)
        finally:
            await conn.close()

    async def checkpoint_before(self, position: int) -> int:
        """The last position before ``position`` that has a signed note."""
        found: int = await self.conn.fetchval(
            "SELECT max(position) FROM checkpoints WHERE note IS NOT NULL AND position < $1",
            position,
        )
        return found

    async def drop_tail(self, cut: int) -> None:
        """Delete every entry after ``cut`` and every trace of them."""
        async with self.conn.transaction():
            await self.conn.execute("DELETE FROM events WHERE position > $1", cut)
            await self.conn.execute("DELETE FROM event_ids WHERE position > $1", cut)
            await self.conn.execute("DELETE FROM checkpoints WHERE position > $1", cut)
            await self.rebuild_head_and_tree()

    async def rewrite(self, position: int) -> None:
        """Edit one entry's body, re-chain everything after it, drop the checkpoints."""
        async with self.conn.transaction():
            body = await self.conn.fetchval("SELECT body FROM events WHERE position = $1", position)
            forged = json.loads(body)
            forged["capabilities"] = ["forged:everything"]  # what a registration says it allows
            await self.conn.execute(
                "UPDATE events SET body = $2 WHERE position = $1",
                position,
                canonical_bytes(forged),
            )
            await self.rechain(position)

    async def swap(self, position: int) -> None:
        """Exchange the contents of two neighbouring entries, re-chain, drop the checkpoints."""
        async with self.conn.transaction():
            columns = "stream_id, stream_version, event_type, actor, subjects, body, signature"
            a, b = await self.conn.fetch(
                f"SELECT position, {columns} FROM events WHERE position IN ($1, $2) "  # noqa: S608
                "ORDER BY position",
                position,
                position + 1,
            )
            for target, source in ((a, b), (b, a)):
                await self.conn.execute(
                    "UPDATE events SET stream_id = $2, stream_version = $3, event_type = $4, "
                    "actor = $5, subjects = $6, body = $7, signature = $8 WHERE position = $1",
                    target["position"],
                    *(source[c] for c in columns.split(", ")),
                )
            await self.rechain(position)

    async def delete_and_renumber(self, position: int) -> None:
        """Remove one entry, close the gap, re-chain, drop the checkpoints."""
        async with self.conn.transaction():
            await self.conn.execute("DELETE FROM events WHERE position = $1", position)
            await self.conn.execute("DELETE FROM event_ids WHERE position = $1", position)
            later = await self.conn.fetch(
                "SELECT position FROM events WHERE position > $1 ORDER BY position", position
            )
            for row in later:  # one at a time, upwards: the key never collides
                old = row["position"]
                await self.conn.execute(
                    "UPDATE events SET position = $2 WHERE position = $1", old, old - 1
                )
                await self.conn.execute(
                    "UPDATE event_ids SET position = $2 WHERE position = $1", old, old - 1
                )
            await self.rechain(position)

    async def rechain(self, start: int) -> None:
        rows = await self.conn.fetch(
            "SELECT position, recorded_at, stream_id, stream_version, body, signature, "
            "prev_hash FROM events WHERE position >= $1 ORDER BY position",
            start,
        )
        previous = await self.conn.fetchval(
            "SELECT entry_hash FROM events WHERE position = $1", start - 1
        )
        prev_hash = bytes(previous) if previous is not None else GENESIS_HASH
        for row in rows:
            envelope = envelope_bytes(
                position=row["position"],
                recorded_at=row["recorded_at"],
                stream_id=row["stream_id"],
                stream_version=row["stream_version"],
                body=bytes(row["body"]),
                signature=bytes(row["signature"]),
            )
            digest = entry_hash(prev_hash, envelope)
            await self.conn.execute(
                "UPDATE events SET prev_hash = $2, entry_hash = $3 WHERE position = $1",
                row["position"],
                prev_hash,
                digest,
            )
            prev_hash = digest
        await self.conn.execute("DELETE FROM checkpoints WHERE position >= $1", start)
        await self.rebuild_head_and_tree()

    async def rebuild_head_and_tree(self) -> None:
        """Make the head and the stored subtrees agree with the rows (no key needed)."""
        rows = await self.conn.fetch(
            "SELECT position, entry_hash, recorded_at FROM events ORDER BY position"
        )
        _, subtrees = Frontier().extend_with_subtrees(
            tlog.entry_leaf(bytes(r["entry_hash"])) for r in rows
        )
        await self.conn.execute("DELETE FROM merkle_nodes")
        await self.conn.executemany(
            "INSERT INTO merkle_nodes (level, idx, hash) VALUES ($1, $2, $3)",
            [(s.level, s.index, s.hash) for s in subtrees if s.level >= tlog.STORED_LEVEL],
        )
        last = rows[-1]
        await self.conn.execute(
            "UPDATE ledger_head SET position = $1, entry_hash = $2, recorded_at = $3 WHERE id = 1",
            last["position"],
            bytes(last["entry_hash"]),
            last["recorded_at"],
        )


async def test_witness_follows_a_growing_ledger_and_cosigns_each_checkpoint(
    api: Api, ledger_key: SigningKey, tmp_path: Path
) -> None:
    config = witness_config(api, ledger_key, tmp_path / "state.json")
    metrics = WitnessMetrics()
    # First use: whatever the ledger shows now is trusted, and said so.
    head = await grow(api, 1)
    assert await run_witness(config, metrics) == 0
    assert state_size(config.state_path) == head
    # Growth across power-of-two sizes and past the stored subtrees (16 leaves).
    for count in (1, 2, 5, 9, 3):
        head = await grow(api, count)
        assert await run_witness(config, metrics) == 0
        assert state_size(config.state_path) == head
        assert metrics.registry.get_sample_value("agentmesh_witness_checkpoint_size") == head
    # Nothing new: the same checkpoint is accepted (and cosigned) again.
    assert await run_witness(config, metrics) == 0
    assert all(alarms(metrics, kind) == 0 for kind in AlarmKind)
    assert metrics.registry.get_sample_value("agentmesh_witness_last_success_timestamp_seconds")
    # The state holds the ledger's note with the witness's cosignature appended.
    state = load_state(config)
    assert state is not None
    served = (await api.client.get("/v1/ledger/checkpoint")).text
    assert state.note_text().startswith(served)
    assert open_note(state.note_text(), [WITNESS_VERIFIER]).verified == (state.cosignature,)
    # And the real command agrees, pinned with the vkey the operator was handed.
    assert (await api.client.get("/v1/ledger/vkey")).text.strip() == config.ledger.vkey()
    code, lines = await cli_witness(config)
    assert code == 0, lines


async def test_first_use_through_the_cli_says_so_and_vkey_url_warns(
    api: Api, ledger_key: SigningKey, tmp_path: Path
) -> None:
    await grow(api, 2)
    config = witness_config(api, ledger_key, tmp_path / "state.json")
    code, lines = await cli_witness(config, "--vkey-url", f"{api.url}/v1/ledger/vkey")
    assert code == 0, lines
    assert any("WARNING" in line and "trust on first use" in line for line in lines)
    assert any("no state yet" in line and "trust on first use" in line for line in lines)
    assert state_size(config.state_path) == await api.head()


async def test_tail_deleted_in_the_database_is_a_rollback_alarm(
    api: Api, ledger_key: SigningKey, database_url: str, tmp_path: Path
) -> None:
    config = witness_config(api, ledger_key, tmp_path / "state.json")
    await grow(api, 4)
    assert await run_witness(config) == 0
    witnessed = await grow(api, 4)
    assert await run_witness(config) == 0
    before = config.state_path.read_bytes()
    async with Attacker.on(database_url) as attacker:
        cut = await attacker.checkpoint_before(witnessed - 2)
        await attacker.drop_tail(cut)
    served = Checkpoint.parse(parse_note((await api.client.get("/v1/ledger/checkpoint")).text).text)
    assert served.size == cut  # the database now tells a shorter story, validly signed

    metrics = WitnessMetrics()
    assert await run_witness(config, metrics) == EXIT_ALARM
    assert alarms(metrics, AlarmKind.ROLLBACK) == 1
    assert config.state_path.read_bytes() == before  # the old state is kept
    code, lines = await cli_witness(config)
    assert code == EXIT_ALARM
    [line] = [line for line in lines if "witness alarm" in line]
    assert "rollback" in line
    assert f"accepted size {witnessed} root" in line
    assert f"offered size {cut} root" in line
    assert config.state_path.read_bytes() == before
    # The evidence: the cosigned note of the longer tree and the ledger's note of a
    # shorter one, both signed by the ledger key.
    [evidence] = {json.loads(p.read_text())["offered"] for p in alarm_files(config)}
    assert served == Checkpoint.parse(open_note(evidence, [config.ledger]).text)


@pytest.mark.parametrize("attack", ["rewrite", "swap", "delete_and_renumber"])
async def test_history_rewritten_in_the_database_is_a_fork_alarm(
    api: Api, ledger_key: SigningKey, database_url: str, tmp_path: Path, attack: str
) -> None:
    config = witness_config(api, ledger_key, tmp_path / "state.json")
    witnessed = await grow(api, 6)
    assert await run_witness(config) == 0
    before = config.state_path.read_bytes()
    async with Attacker.on(database_url) as attacker:
        await getattr(attacker, attack)(3)
    # The ledger goes on appending (and signing checkpoints) over the rewritten rows.
    head = await grow(api, 2)
    assert head >= witnessed

    metrics = WitnessMetrics()
    assert await run_witness(config, metrics) == EXIT_ALARM
    assert alarms(metrics, AlarmKind.FORK) == 1
    assert config.state_path.read_bytes() == before
    code, lines = await cli_witness(config)
    assert code == EXIT_ALARM
    [line] = [line for line in lines if "witness alarm" in line]
    assert "fork" in line
    assert f"accepted size {witnessed} root" in line
    for path in alarm_files(config):
        evidence = json.loads(path.read_text())
        assert evidence["kind"] == "fork"
        accepted = Checkpoint.parse(open_note(evidence["accepted"], [config.ledger]).text)
        offered = Checkpoint.parse(open_note(evidence["offered"], [config.ledger]).text)
        # Anyone can check it: the proof the ledger gave does not join the two trees.
        proof = [base64.b64decode(h) for h in evidence["consistency_proof"]]
        with pytest.raises(ProofError):
            verify_consistency(
                accepted.size, offered.size, proof, accepted.root_hash, offered.root_hash
            )


async def test_loop_mode_serves_metrics_and_stops_at_the_first_alarm(
    api: Api, ledger_key: SigningKey, database_url: str, tmp_path: Path
) -> None:
    config = dataclasses.replace(
        witness_config(api, ledger_key, tmp_path / "state.json"), once=False, interval=0.05
    )
    metrics = WitnessMetrics()
    close = serve_metrics(metrics, port := free_port())
    try:
        witnessed = await grow(api, 5)
        loop = asyncio.create_task(run_witness(config, metrics))
        # Wait (on the exposition, as Prometheus would see it) until it has cosigned.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as scrape:
            while True:
                exposition = (await scrape.get("/metrics")).text
                if f"agentmesh_witness_checkpoint_size {witnessed:.1f}" in exposition:
                    break
                assert not loop.done(), loop.result()
                await asyncio.sleep(0.02)
            assert 'agentmesh_witness_alarms_total{kind="rollback"} 0.0' in exposition
            assert "agentmesh_witness_last_success_timestamp_seconds" in exposition
            async with Attacker.on(database_url) as attacker:
                await attacker.drop_tail(await attacker.checkpoint_before(witnessed))
            # A witness that saw a rollback does not keep going.
            assert await loop == EXIT_ALARM
            exposition = (await scrape.get("/metrics")).text
            assert 'agentmesh_witness_alarms_total{kind="rollback"} 1.0' in exposition
    finally:
        close()


async def test_loop_mode_returns_0_when_stopped(
    api: Api, ledger_key: SigningKey, tmp_path: Path
) -> None:
    config = dataclasses.replace(
        witness_config(api, ledger_key, tmp_path / "state.json"), once=False, interval=3600
    )
    await grow(api, 1)
    stop = asyncio.Event()
    loop = asyncio.create_task(run_witness(config, stop=stop))
    while not config.state_path.exists():  # the first check is done at once
        assert not loop.done(), loop.result()
        await asyncio.sleep(0.02)
    stop.set()
    assert await loop == 0
