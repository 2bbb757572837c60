"""``agentmesh ledger rotate-key --new-key FILE`` as a real process, against real
PostgreSQL (issue 12 item 5). Refusals first: each leaves the head, the ledger's key
and its checkpoints as they were, says one line, and quotes no key. Last, end to end:
a running API, a witness that crosses the rotation, and one that alarms on a fresh key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from agentmesh.witness import EXIT_ALARM, AlarmKind, WitnessConfig, WitnessMetrics, run_witness
from ledger import tlog
from ledger.identity import SigningKey
from ledger.note import Checkpoint as NoteCheckpoint
from ledger.note import parse_note
from ledger.postgres import PostgresEventStore, PostgresLedgerReader
from ledger.verify import verify_ledger
from tests.api_support import Api
from tests.support import register


def rotate_cli(
    database_url: str, current: SigningKey | None, new_key: Path, cwd: Path
) -> subprocess.CompletedProcess[str]:
    """``agentmesh ledger rotate-key`` with only the database URL and the current key set
    (run outside any checkout, so no local stack's key is picked up)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
    env["AGENTMESH_DATABASE_URL"] = database_url
    if current is not None:
        env["AGENTMESH_AGENT_PRIVATE_KEY"] = current.private_key_pem()
    return subprocess.run(
        [sys.executable, "-m", "agentmesh", "ledger", "rotate-key", "--new-key", str(new_key)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def key_file(path: Path, key: SigningKey) -> Path:
    path.write_text(key.private_key_pem())
    path.chmod(0o600)
    return path


def no_secret(result: subprocess.CompletedProcess[str]) -> None:
    assert "PRIVATE KEY" not in result.stdout + result.stderr


async def snapshot(database_url: str) -> tuple[object, ...]:
    reader = await PostgresLedgerReader.connect(database_url)
    try:
        return (
            await reader.head(),
            await reader.ledger_identity(),
            await reader.ledger_rotations(),
            await reader.latest_checkpoint(),
        )
    finally:
        await reader.close()


@pytest.fixture
async def ledger(database_url: str, ledger_key: SigningKey) -> str:
    """A ledger of two registrations and a checkpoint, under ``ledger_key``."""
    store = await PostgresEventStore.open(database_url, ledger_key)
    try:
        await register(store)
        await register(store)
        await store.checkpoint()
    finally:
        await store.close()
    return database_url


def bad_inputs(tmp_path: Path, ledger_key: SigningKey) -> list[tuple[str, Path, str]]:
    """(what, --new-key file, expected words) for every refused new key."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    public = tmp_path / "public.pem"
    public.write_text(SigningKey.generate().public.pem())
    unreadable = tmp_path / "dir.pem"
    unreadable.mkdir()
    return [
        ("missing", tmp_path / "nope.pem", "cannot read"),
        ("a directory", unreadable, "cannot read"),
        ("not a key", garbage, "not an unencrypted PEM PKCS#8 key"),
        ("a public key", public, "not an unencrypted PEM PKCS#8 key"),
        ("the current key", key_file(tmp_path / "same.pem", ledger_key), "current key"),
    ]


async def test_bad_input_is_one_line_and_appends_nothing(
    ledger: str, ledger_key: SigningKey, tmp_path: Path
) -> None:
    before = await snapshot(ledger)
    cases = bad_inputs(tmp_path, ledger_key)
    new = key_file(tmp_path / "new.pem", SigningKey.generate())
    # The current key is not the ledger's, or there is none.
    cases_with_current: list[tuple[str, Path, str, SigningKey | None]] = [
        (what, path, words, ledger_key) for what, path, words in cases
    ]
    cases_with_current.append(("another current key", new, "this ledger's key is", None))
    for what, path, words, current in cases_with_current:
        held = current or SigningKey.generate()
        result = rotate_cli(ledger, held, path, tmp_path)
        assert result.returncode == 1, (what, result.stdout, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1, (what, result.stderr)
        [line] = lines
        assert line.startswith("agentmesh: error:"), (what, line)
        assert words in line, (what, line)
        assert result.stdout == "", what
        no_secret(result)
        assert await snapshot(ledger) == before, what
    missing = rotate_cli(ledger, None, new, tmp_path)
    assert missing.returncode == 1
    assert "AGENTMESH_AGENT_PRIVATE_KEY" in missing.stderr
    assert await snapshot(ledger) == before


def test_new_key_is_required(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
    usage = subprocess.run(
        [sys.executable, "-m", "agentmesh", "ledger", "rotate-key"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert usage.returncode == 2
    assert "--new-key" in usage.stderr


async def test_rotate_key_appends_the_rotation_and_the_new_key_signs_next(
    ledger: str, ledger_key: SigningKey, tmp_path: Path
) -> None:
    new = SigningKey.generate()
    result = rotate_cli(ledger, ledger_key, key_file(tmp_path / "new.pem", new), tmp_path)
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert f"{ledger_key.did} -> {new.did}" in line
    assert "restart every API process" in line
    no_secret(result)
    reader = await PostgresLedgerReader.connect(ledger)
    try:
        [rotation] = await reader.ledger_rotations()
        assert f"ledger key rotated at position {rotation.position}:" in line
        assert await reader.ledger_identity() == new.public
        latest = await reader.latest_checkpoint()
        assert latest is not None
        assert latest.signer == new.did
        assert latest.position == (await reader.head()).position
        # The whole ledger verifies pinned to either key.
        for pinned in (ledger_key.public, new.public):
            await verify_ledger(reader, pinned)
    finally:
        await reader.close()
    # The old key is retired: a second rotation with it is refused, changing nothing.
    before = await snapshot(ledger)
    again = rotate_cli(
        ledger, ledger_key, key_file(tmp_path / "other.pem", SigningKey.generate()), tmp_path
    )
    assert again.returncode == 1
    assert "this ledger's key is" in again.stderr
    assert await snapshot(ledger) == before


# --- end to end: a running API, a witness, a rotation through the CLI ----------------------


async def test_a_witness_crosses_a_cli_rotation_and_alarms_on_a_fresh_key(
    api: Api, ledger_key: SigningKey, database_url: str, tmp_path: Path
) -> None:
    witness_key = SigningKey.generate()

    def witness(state: Path) -> WitnessConfig:
        return WitnessConfig(
            url=api.url,
            ledger=tlog.verifier(ledger_key.public),  # pinned before the rotation
            state_path=state,
            key=witness_key,
            name="agentmesh.witness/rotation-test",
            once=True,
        )

    await api.register()
    await api.register()
    first, second = witness(tmp_path / "a.json"), witness(tmp_path / "b.json")
    assert await run_witness(first) == 0
    second.state_path.write_bytes(first.state_path.read_bytes())  # the same past
    accepted = json.loads(first.state_path.read_text())["size"]

    new = SigningKey.generate()
    result = rotate_cli(database_url, ledger_key, key_file(tmp_path / "new.pem", new), tmp_path)
    assert result.returncode == 0, result.stderr

    # The next checkpoint is the new key's: crossed with the rotation's proof, no alarm.
    metrics = WitnessMetrics()
    assert await run_witness(first, metrics) == 0
    state = json.loads(first.state_path.read_text())
    assert state["size"] > accepted
    assert state["ledger_vkey"] == tlog.verifier(new.public).vkey()
    assert state["rotated_from"] == [tlog.verifier(ledger_key.public).vkey()]
    assert all(
        metrics.registry.get_sample_value("agentmesh_witness_alarms_total", {"kind": k}) == 0
        for k in AlarmKind
    )
    assert await run_witness(first) == 0  # and again, from the state it saved

    # A database writer serves the same tree head signed by a fresh key: the ledger's
    # rotations lead to the new key, not to it. Both witnesses alarm.
    size, note = state["size"], state["checkpoint"]
    root = NoteCheckpoint.parse(parse_note(note).text).root_hash
    forged = tlog.signed_tree_head(SigningKey.generate(), size, root)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE checkpoints SET note = $1 WHERE position = $2", forged, size)
    finally:
        await conn.close()
    assert (await api.client.get("/v1/ledger/checkpoint")).text == forged
    for config in (second, first):
        before = config.state_path.read_bytes()
        metrics = WitnessMetrics()
        assert await run_witness(config, metrics) == EXIT_ALARM
        alarms = metrics.registry.get_sample_value(
            "agentmesh_witness_alarms_total", {"kind": AlarmKind.BAD_SIGNATURE}
        )
        assert alarms == 1
        assert config.state_path.read_bytes() == before
