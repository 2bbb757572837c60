"""The witness: its pure core over real signed notes and real Merkle trees, and the CLI."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from agentmesh.cli import main
from agentmesh.embedded import free_port
from agentmesh.witness import (
    STATE_FORMAT,
    Accepted,
    Alarm,
    AlarmKind,
    SignedCheckpoint,
    StateError,
    WitnessState,
    check_consistency,
    cosign,
    decide,
    needs_proof,
    open_ledger_checkpoint,
    write_state,
)
from ledger.identity import SigningKey
from ledger.merkle import EMPTY_ROOT, Frontier, consistency_proof, leaf_hash, root_at
from ledger.note import (
    Checkpoint,
    CosignatureSigner,
    CosignatureVerifier,
    Ed25519Signer,
    Ed25519Verifier,
    cosignature_timestamp,
    open_note,
    sign_checkpoint,
)

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
    with pytest.raises(SystemExit) as exited:
        main(argv)
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
