"""``agentmesh witness``: follow a ledger's checkpoints, cosign consistent ones, alarm otherwise.

A witness remembers the last checkpoint it accepted (its own state file, out
of the ledger operator's reach). Each new checkpoint must be signed by the
pinned ledger key and extend the remembered one: a larger tree with a
verifying RFC 9162 consistency proof, or the same tree (same size, same
root). Then the witness cosigns it (C2SP ``tlog-cosignature``,
``cosignature/v1``) and remembers it instead. Anything else is an alarm:

``rollback``       the tree is smaller than one the ledger already committed to
``fork``           same size and another root, or a consistency proof that fails
``bad_signature``  not signed by the pinned ledger key
``malformed``      not a signed note, not a checkpoint, or not this ledger's

The ledger's key may change by a ``ledger.key_rotated`` entry. A checkpoint
under another key than the trusted one is accepted only with proof
(``GET /v1/ledger/keys?tree_size=N``): every rotation after the accepted tree,
signed by the key trusted so far with the new key's proof, and proven in the
offered tree (``ledger.keyhistory.cross``). The state then names the new key
(``ledger_vkey``) and the keys crossed from (``rotated_from``), so a restart
with the originally pinned key carries on. Without that proof: ``bad_signature``.

On an alarm the old state is kept, one log line names both checkpoints, and
the process exits 3 (1 stays "the operation failed", e.g. an unreachable
API). A witness that saw a fork does not keep going. The evidence (the
accepted note, the offered bytes, the consistency proof) is written beside
the state file as ``<state>.alarm-<unix time>.json``
(``agentmesh.witness.alarm/v1``): two notes signed by the ledger key that
cannot both be true prove the fork to anyone holding the key.

The module has two halves. The core (``WitnessState``, ``open_ledger_checkpoint``,
``check_consistency``, ``decide``, ``cosign``) is pure: no I/O, no clock.
The loop (``run_witness``) fetches over HTTP, writes the state file and sets
the metrics.

State file (``--state``): one JSON object, written atomically (temporary file,
fsync, rename, fsync of the directory)::

    {
      "format": "agentmesh.witness.state/v1",
      "origin": "agentmesh.ledger/did:mesh:…",
      "size": 12,
      "root_hash": "<base64 RFC 9162 root>",
      "ledger_vkey": "<the pinned ledger key, vkey form>",
      "witness_vkey": "<this witness's cosignature key, vkey form>",
      "cosigned_at": 1764489600,
      "checkpoint": "<the signed note: checkpoint text, blank line, the ledger's
                     signature line, then this witness's cosignature line>"
    }

``checkpoint`` is the authority; the other fields are there for people and
scripts (``jq -r .checkpoint`` gives the cosigned note) and must agree with it.
On start the witness re-verifies both signatures in it, so a state file for
another ledger or another witness key is refused rather than trusted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from agentmesh.errors import AgentMeshError
from ledger import keyhistory, tlog
from ledger.chain import Entry
from ledger.errors import LedgerError, NoteError, ProofError
from ledger.identity import SigningKey, VerifyKey
from ledger.merkle import EMPTY_ROOT, verify_consistency
from ledger.note import (
    Checkpoint,
    CosignatureSigner,
    CosignatureVerifier,
    Ed25519Verifier,
    Note,
    NoteSignature,
    cosignature_timestamp,
    open_note,
    parse_note,
    parse_vkey,
)
from ledger.timefmt import parse_time

STATE_FORMAT = "agentmesh.witness.state/v1"
EVIDENCE_FORMAT = "agentmesh.witness.alarm/v1"
EXIT_ALARM = 3

logger = logging.getLogger("agentmesh.witness")


# --- the pure core ------------------------------------------------------------------


class AlarmKind(StrEnum):
    """Why a checkpoint was refused."""

    ROLLBACK = "rollback"
    FORK = "fork"
    BAD_SIGNATURE = "bad_signature"
    MALFORMED = "malformed"


@dataclass(frozen=True, slots=True)
class SignedCheckpoint:
    """A checkpoint whose note carries a valid signature by the pinned ledger key."""

    checkpoint: Checkpoint
    note: Note  # the text and only the ledger's verified signature(s)


@dataclass(frozen=True, slots=True)
class Alarm:
    """A refused checkpoint: the kind, why, and the two checkpoints involved."""

    kind: AlarmKind
    reason: str
    old: Checkpoint | None
    new: Checkpoint | None

    def line(self) -> str:
        """One log line naming the kind and both checkpoints."""
        return (
            f"witness alarm: {self.kind}: accepted {_describe(self.old)}, "
            f"offered {_describe(self.new)}: {self.reason}"
        )


@dataclass(frozen=True, slots=True)
class Accepted:
    """A checkpoint that extends (or repeats) the one accepted before it."""

    signed: SignedCheckpoint
    first_use: bool  # nothing was accepted before: trusted on first use

    @property
    def checkpoint(self) -> Checkpoint:
        return self.signed.checkpoint


Decision = Accepted | Alarm


@dataclass(frozen=True, slots=True)
class WitnessState:
    """The last accepted checkpoint, as the ledger signed it and this witness cosigned it."""

    checkpoint: Checkpoint
    note: Note  # checkpoint text; the ledger's signature, then the witness's cosignature
    cosignature: NoteSignature
    cosigned_at: int  # POSIX seconds, as stated in the cosignature
    ledger: Ed25519Verifier | None = field(default=None, compare=False)  # accepted under
    rotated_from: tuple[str, ...] = ()  # vkeys of the ledger keys crossed from, oldest first

    @property
    def size(self) -> int:
        return self.checkpoint.size

    @property
    def root_hash(self) -> bytes:
        return self.checkpoint.root_hash

    def note_text(self) -> str:
        """The cosigned checkpoint as a signed note."""
        return self.note.encode()

    def to_json(self, ledger: Ed25519Verifier, witness: CosignatureVerifier) -> str:
        """The state file's content (see the module docstring)."""
        document = {
            "format": STATE_FORMAT,
            "origin": self.checkpoint.origin,
            "size": self.checkpoint.size,
            "root_hash": _b64(self.checkpoint.root_hash),
            "ledger_vkey": ledger.vkey(),
            "rotated_from": list(self.rotated_from),
            "witness_vkey": witness.vkey(),
            "cosigned_at": self.cosigned_at,
            "checkpoint": self.note_text(),
        }
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(
        cls, text: str, ledger: Ed25519Verifier, witness: CosignatureVerifier
    ) -> WitnessState:
        """Parse and re-verify a state file; raise StateError naming what is wrong."""
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise StateError(f"state is not JSON: {exc}") from None
        if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
            raise StateError(f"state is not a {STATE_FORMAT} document")
        rotated_from = document.get("rotated_from") or []
        if not isinstance(rotated_from, list) or not all(isinstance(v, str) for v in rotated_from):
            raise StateError("state's rotated_from is not a list of vkeys")
        if document.get("ledger_vkey") != ledger.vkey() and ledger.vkey() in rotated_from:
            # Crossed a rotation since the key was pinned: the state names the new key.
            current = parse_vkey(str(document.get("ledger_vkey")))
            if not isinstance(current, Ed25519Verifier):
                raise StateError("state's ledger_vkey is not an Ed25519 note key")
            ledger = current
        if document.get("ledger_vkey") != ledger.vkey():
            raise StateError(
                f"state was accepted under ledger key {document.get('ledger_vkey')!r}, "
                f"not the pinned {ledger.vkey()!r}"
            )
        if document.get("witness_vkey") != witness.vkey():
            raise StateError(
                f"state was cosigned by witness key {document.get('witness_vkey')!r}, "
                f"not this witness's {witness.vkey()!r}"
            )
        note_text = document.get("checkpoint")
        if not isinstance(note_text, str):
            raise StateError("state has no checkpoint note")
        try:
            by_ledger = open_note(note_text, [ledger])
            by_witness = open_note(note_text, [witness])
            checkpoint = Checkpoint.parse(by_ledger.text)
        except NoteError as exc:
            raise StateError(f"state checkpoint: {exc}") from None
        cosignature = by_witness.verified[0]
        stated = (document.get("origin"), document.get("size"), document.get("root_hash"))
        if stated != (checkpoint.origin, checkpoint.size, _b64(checkpoint.root_hash)):
            raise StateError("state's origin, size or root_hash disagree with its checkpoint")
        return cls(
            checkpoint,
            Note(by_ledger.text, (*by_ledger.verified, cosignature)),
            cosignature,
            cosignature_timestamp(cosignature),
            ledger,
            tuple(rotated_from),
        )


class StateError(AgentMeshError):
    """A state file that cannot be read back as this witness's state for this ledger."""


def open_ledger_checkpoint(data: str | bytes, ledger: Ed25519Verifier) -> SignedCheckpoint | Alarm:
    """Check a fetched note is a checkpoint of the pinned ledger, signed by its key.

    Syntax first (``malformed``), then the signature (``bad_signature``: a
    signature by any other key, including a new key under the same name, is
    ignored as the spec requires, so such a note has no valid signature),
    then the origin, which must be the ledger key's name.
    """
    try:
        note = parse_note(data)
        checkpoint = Checkpoint.parse(note.text)
    except NoteError as exc:
        return Alarm(AlarmKind.MALFORMED, str(exc), None, None)
    try:
        verified = open_note(data, [ledger])
    except NoteError as exc:
        return Alarm(AlarmKind.BAD_SIGNATURE, str(exc), None, checkpoint)
    if checkpoint.origin != ledger.name:
        reason = f"origin {checkpoint.origin!r} is not the pinned ledger {ledger.name!r}"
        return Alarm(AlarmKind.MALFORMED, reason, None, checkpoint)
    if checkpoint.size == 0 and checkpoint.root_hash != EMPTY_ROOT:
        reason = "a checkpoint of the empty tree must carry the empty root"
        return Alarm(AlarmKind.MALFORMED, reason, None, checkpoint)
    return SignedCheckpoint(checkpoint, Note(verified.text, verified.verified))


def needs_proof(previous: WitnessState | None, new: Checkpoint) -> bool:
    """Whether judging ``new`` takes a consistency proof from the accepted size."""
    # Every tree extends the empty tree, and RFC 9162 has no proof from size 0.
    return previous is not None and 0 < previous.size < new.size


def check_consistency(
    previous: WitnessState | None, new: SignedCheckpoint, proof: Sequence[bytes] | None
) -> Decision:
    """Decide on a correctly signed checkpoint given the accepted state and a proof.

    ``proof`` is the consistency proof from ``previous.size`` to the new size;
    it is only read when :func:`needs_proof` says so, and must then be given.
    """
    new_cp = new.checkpoint
    if previous is None:
        return Accepted(new, first_use=True)
    old = previous.checkpoint
    if new_cp.size < old.size:
        reason = f"the tree shrank by {old.size - new_cp.size} entries"
        return Alarm(AlarmKind.ROLLBACK, reason, old, new_cp)
    if new_cp.size == old.size:
        if new_cp.root_hash != old.root_hash:
            return Alarm(AlarmKind.FORK, "same size, different root hash", old, new_cp)
        return Accepted(new, first_use=False)
    if not needs_proof(previous, new_cp):
        return Accepted(new, first_use=False)
    if proof is None:
        raise ValueError(f"a consistency proof from {old.size} to {new_cp.size} is needed")
    try:
        verify_consistency(old.size, new_cp.size, proof, old.root_hash, new_cp.root_hash)
    except ProofError as exc:
        return Alarm(AlarmKind.FORK, f"consistency proof: {exc}", old, new_cp)
    return Accepted(new, first_use=False)


def decide(
    previous: WitnessState | None,
    data: str | bytes,
    ledger: Ed25519Verifier,
    proof: Sequence[bytes] | None,
) -> Decision:
    """Accept or alarm on the fetched note ``data``: signature, then consistency."""
    opened = open_ledger_checkpoint(data, ledger)
    if isinstance(opened, Alarm):
        old = previous.checkpoint if previous is not None else None
        return Alarm(opened.kind, opened.reason, old, opened.new)
    return check_consistency(previous, opened, proof)


def cosign(
    accepted: SignedCheckpoint,
    signer: CosignatureSigner,
    ledger: Ed25519Verifier | None = None,
    rotated_from: tuple[str, ...] = (),
) -> WitnessState:
    """The new state: ``accepted`` with this witness's ``cosignature/v1`` appended."""
    note = accepted.note.signed(signer)
    cosignature = note.signatures[-1]
    return WitnessState(
        accepted.checkpoint, note, cosignature, signer.timestamp, ledger, rotated_from
    )


def cross_rotation(
    trusted: Ed25519Verifier,
    accepted_size: int,
    data: str | bytes,
    offered: Checkpoint,
    proven: Sequence[keyhistory.ProvenRotation],
) -> SignedCheckpoint | Alarm:
    """A checkpoint under a key other than ``trusted``: accepted only if the rotations
    after the accepted tree lead from ``trusted`` to its signer, each signed by the key
    before with the new key's proof and proven in the offered tree."""
    try:
        key = keyhistory.cross(trusted.key, accepted_size, offered.root_hash, offered.size, proven)
    except LedgerError as exc:
        return Alarm(AlarmKind.BAD_SIGNATURE, f"ledger key rotation: {exc}", None, offered)
    if key.raw == trusted.key.raw:
        reason = "not signed by the pinned ledger key, and no rotation of it is proven"
        return Alarm(AlarmKind.BAD_SIGNATURE, reason, None, offered)
    return open_ledger_checkpoint(data, tlog.verifier(key))


def evidence_json(
    alarm: Alarm,
    previous: WitnessState | None,
    offered: bytes,
    proof: Sequence[bytes] | None,
    at: int,
) -> str:
    """An alarm's evidence file: the kind, the accepted note, the offered bytes, the proof."""
    try:
        offered_note: str | None = offered.decode("utf-8")
    except UnicodeDecodeError:
        offered_note = None
    document = {
        "format": EVIDENCE_FORMAT,
        "kind": alarm.kind.value,
        "reason": alarm.reason,
        "at": at,
        "accepted": previous.note_text() if previous is not None else None,
        "offered": offered_note,
        "offered_base64": _b64(offered),  # the exact bytes, whatever they are
        "consistency_proof": None if proof is None else [_b64(h) for h in proof],
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def _describe(checkpoint: Checkpoint | None) -> str:
    if checkpoint is None:
        return "nothing"
    return f"size {checkpoint.size} root {_b64(checkpoint.root_hash)}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- the loop: HTTP, state file, metrics ----------------------------------------------


class WitnessError(AgentMeshError):
    """An operational failure to report as one line (exit 1): not an alarm."""


class WitnessMetrics:
    """The witness's Prometheus series, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.alarms = Counter(
            "agentmesh_witness_alarms",
            "Checkpoints refused, by kind (rollback, fork, bad_signature, malformed)",
            ["kind"],
            registry=self.registry,
        )
        for kind in AlarmKind:  # every kind is a series from the start, at 0
            self.alarms.labels(kind=kind.value)
        self.checkpoint_size = Gauge(
            "agentmesh_witness_checkpoint_size",
            "Tree size of the last accepted (cosigned) checkpoint",
            registry=self.registry,
        )
        self.last_success = Gauge(
            "agentmesh_witness_last_success_timestamp_seconds",
            "When a checkpoint was last accepted and cosigned (POSIX seconds)",
            registry=self.registry,
        )


@dataclass(frozen=True, slots=True)
class WitnessConfig:
    """What ``agentmesh witness`` was told."""

    url: str  # the API's base URL
    ledger: Ed25519Verifier  # the pinned ledger key
    state_path: Path
    key: SigningKey  # the witness's own key
    name: str  # the witness's key name in cosignature lines
    interval: float = 5.0
    once: bool = False
    timeout: float = 10.0

    def witness_verifier(self) -> CosignatureVerifier:
        return CosignatureVerifier(self.name, self.key.public)


def default_witness_name(key: SigningKey) -> str:
    """``agentmesh.witness/<DID>``: a key name is free of spaces and ``+``."""
    return f"agentmesh.witness/{key.did}"


def load_state(config: WitnessConfig) -> WitnessState | None:
    """The state file's state, or None when there is none yet."""
    try:
        text = config.state_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise WitnessError(f"cannot read {config.state_path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise WitnessError(f"{config.state_path}: state is not UTF-8 text") from None
    try:
        return WitnessState.from_json(text, config.ledger, config.witness_verifier())
    except StateError as exc:
        raise WitnessError(f"{config.state_path}: {exc}") from None


def write_state(path: Path, content: str) -> None:
    """Replace ``path`` atomically: a crash leaves the old state or the new, never half."""
    directory = path.parent
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
            handle.flush()
            os.fchmod(handle.fileno(), 0o644)  # public data: readers may be other users
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    # The rename itself is durable only once the directory is.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


async def fetch_vkey(url: str, wait: float = 10.0) -> str:
    """The ledger's verifier key as the API publishes it (trust on first use)."""
    async with httpx.AsyncClient(timeout=wait) as client:
        return (await _get(client, url)).text.strip()


async def _get(client: httpx.AsyncClient, url: str, **params: int) -> httpx.Response:
    try:
        response = await client.get(url, params=params or None)
    except httpx.TimeoutException:
        raise WitnessError(f"GET {url}: timed out") from None
    except httpx.HTTPError as exc:
        raise WitnessError(f"cannot reach {url}: {exc or type(exc).__name__}") from None
    if response.status_code != 200:
        detail = " ".join(response.text.split())[:200]
        raise WitnessError(f"GET {response.url}: HTTP {response.status_code} {detail}".rstrip())
    return response


async def _fetch_proof(
    client: httpx.AsyncClient, base: str, first: int, second: int
) -> list[bytes]:
    url = f"{base}/v1/ledger/proofs/consistency"
    response = await _get(client, url, first=first, second=second)
    try:
        body: Any = response.json()
    except ValueError:
        raise WitnessError(f"{url}: the consistency proof is not JSON") from None
    hashes = body.get("hashes") if isinstance(body, dict) else None
    if (
        not isinstance(body, dict)
        or (body.get("first"), body.get("second")) != (first, second)
        or not isinstance(hashes, list)
        or not all(isinstance(h, str) for h in hashes)
    ):
        raise WitnessError(f"{url}: not a consistency proof from {first} to {second}")
    try:
        return [base64.b64decode(h, validate=True) for h in hashes]
    except binascii.Error:
        raise WitnessError(f"{url}: a proof hash is not base64") from None


async def _fetch_rotations(
    client: httpx.AsyncClient, base: str, tree_size: int
) -> list[keyhistory.ProvenRotation]:
    """The ledger's rotations with inclusion proofs in the tree of ``tree_size``."""
    url = f"{base}/v1/ledger/keys"
    response = await _get(client, url, tree_size=tree_size)
    try:
        body: Any = response.json()
        if body.get("tree_size") != tree_size:
            raise ValueError(f"the answer is for tree size {body.get('tree_size')}")
        return [
            keyhistory.ProvenRotation(
                Entry(
                    position=int(item["position"]),
                    recorded_at=parse_time(item["recorded_at"]),
                    stream_id=str(item["stream_id"]),
                    stream_version=int(item["stream_version"]),
                    body=base64.b64decode(item["body"], validate=True),
                    signature=base64.b64decode(item["signature"], validate=True),
                    prev_hash=base64.b64decode(item["prev_hash"], validate=True),
                    entry_hash=base64.b64decode(item["entry_hash"], validate=True),
                ),
                tree_size,
                tuple(base64.b64decode(h, validate=True) for h in item["hashes"]),
            )
            for item in body["rotations"]
        ]
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise WitnessError(f"{url}: not the ledger's key rotations: {exc}") from None


def _keys(proven: Sequence[keyhistory.ProvenRotation]) -> list[VerifyKey]:
    """The new keys the (already checked) rotations install."""
    return [VerifyKey.from_pem(keyhistory.rotation_of(p.entry).public_key) for p in proven]


class Witness:
    """One witness over one ledger: the state in memory and on disk, and the metrics."""

    def __init__(
        self,
        config: WitnessConfig,
        metrics: WitnessMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.base = config.url.rstrip("/")
        self.state = load_state(config)
        self.ledger = config.ledger  # the ledger key trusted now (rotations move it)
        self.rotated_from: tuple[str, ...] = ()
        if self.state is not None:
            metrics.checkpoint_size.set(self.state.size)
            self.ledger = self.state.ledger or config.ledger
            self.rotated_from = self.state.rotated_from

    async def step(self, client: httpx.AsyncClient) -> Decision:
        """Fetch, judge, and cosign-and-save or count the alarm. Raise WitnessError on I/O."""
        response = await _get(client, f"{self.base}/v1/ledger/checkpoint")
        opened = open_ledger_checkpoint(response.content, self.ledger)
        ledger = self.ledger
        if isinstance(opened, Alarm) and opened.kind is AlarmKind.BAD_SIGNATURE and opened.new:
            size = self.state.size if self.state is not None else 0
            proven = await _fetch_rotations(client, self.base, opened.new.size)
            opened = cross_rotation(self.ledger, size, response.content, opened.new, proven)
            if not isinstance(opened, Alarm):
                ledger = tlog.verifier(
                    next(k for k in _keys(proven) if tlog.origin(k.did) == opened.checkpoint.origin)
                )
        if isinstance(opened, Alarm):
            old = self.state.checkpoint if self.state is not None else None
            alarm = Alarm(opened.kind, opened.reason, old, opened.new)
            return self._alarm(alarm, response.content, None)
        proof = None
        if needs_proof(self.state, opened.checkpoint):
            assert self.state is not None  # needs_proof says so
            proof = await _fetch_proof(client, self.base, self.state.size, opened.checkpoint.size)
        decision = check_consistency(self.state, opened, proof)
        if isinstance(decision, Alarm):
            return self._alarm(decision, response.content, proof)
        self._accept(decision, ledger)
        return decision

    def _accept(self, accepted: Accepted, ledger: Ed25519Verifier) -> None:
        now = self.clock()
        signer = CosignatureSigner(self.config.name, self.config.key, int(now))
        rotated_from = self.rotated_from
        if ledger.vkey() != self.ledger.vkey():
            rotated_from = (*rotated_from, self.ledger.vkey())
            logger.warning(
                f"ledger key rotated: now trusting {ledger.vkey()} (proven from "
                f"{self.ledger.vkey()})"
            )
        state = cosign(accepted.signed, signer, ledger, rotated_from)
        content = state.to_json(ledger, self.config.witness_verifier())
        try:
            write_state(self.config.state_path, content)
        except OSError as exc:
            raise WitnessError(f"cannot write {self.config.state_path}: {exc.strerror}") from None
        previous, self.state = self.state, state
        self.ledger, self.rotated_from = ledger, rotated_from
        self.metrics.checkpoint_size.set(state.size)
        self.metrics.last_success.set(now)
        checkpoint = accepted.checkpoint
        fields = {"size": checkpoint.size, "root_hash": _b64(checkpoint.root_hash)}
        if accepted.first_use:
            logger.warning(
                "no state yet: trusting the first checkpoint seen (trust on first use), "
                f"size {checkpoint.size} root {_b64(checkpoint.root_hash)}",
                extra=fields,
            )
        elif previous is not None and previous.size != checkpoint.size:
            logger.info(
                f"cosigned checkpoint size {checkpoint.size} (consistent with {previous.size})",
                extra=fields,
            )
        else:
            logger.debug(f"cosigned checkpoint size {checkpoint.size} again", extra=fields)

    def _alarm(self, alarm: Alarm, offered: bytes, proof: Sequence[bytes] | None) -> Alarm:
        self.metrics.alarms.labels(kind=alarm.kind.value).inc()
        now = int(self.clock())
        fields: dict[str, Any] = {"kind": alarm.kind.value}
        for side, checkpoint in (("old", alarm.old), ("new", alarm.new)):
            if checkpoint is not None:
                fields[f"{side}_size"] = checkpoint.size
                fields[f"{side}_root_hash"] = _b64(checkpoint.root_hash)
        # Keep what was offered: a fork signed by the ledger key, next to the
        # checkpoint accepted before, proves the ledger's misbehaviour to anyone.
        path = self.config.state_path.with_name(f"{self.config.state_path.name}.alarm-{now}.json")
        try:
            write_state(path, evidence_json(alarm, self.state, offered, proof, now))
            fields["evidence"] = str(path)
        except OSError as exc:
            fields["evidence_error"] = exc.strerror
        logger.error(alarm.line(), extra=fields)
        return alarm


async def run_witness(
    config: WitnessConfig,
    metrics: WitnessMetrics | None = None,
    stop: asyncio.Event | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """Witness until an alarm (exit 3), ``stop`` (0), or after one check with ``once``.

    A fetch that fails on the first check is an error (exit 1): a wrong URL
    fails loudly. Later failures are logged and retried at the next interval
    (an API restart is not a reason to stop witnessing); the staleness shows
    in ``agentmesh_witness_last_success_timestamp_seconds``.
    """
    witness = Witness(config, metrics or WitnessMetrics(), clock)
    stop = stop or asyncio.Event()
    logger.info(
        f"witnessing {config.url} for {config.ledger.name}; cosigning as "
        f"{config.witness_verifier().vkey()}",
        extra={"state": str(config.state_path)},
    )
    first = True
    async with httpx.AsyncClient(timeout=config.timeout) as client:
        while True:
            try:
                decision = await witness.step(client)
            except WitnessError as exc:
                if first or config.once:
                    raise
                logger.warning(f"witness: {exc}; retrying in {config.interval:g}s")
            else:
                if isinstance(decision, Alarm):
                    return EXIT_ALARM
            first = False
            if config.once:
                return 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), config.interval)
            if stop.is_set():
                return 0


def serve_metrics(metrics: WitnessMetrics, port: int) -> Callable[[], None]:
    """Expose ``metrics`` on ``port`` (all interfaces); return what stops it."""
    server, thread = start_http_server(port, registry=metrics.registry)

    def close() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return close
