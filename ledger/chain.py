"""The hash chain and signed checkpoints — pure functions, no I/O.

``entry_hash = SHA-256(prev_hash ‖ canonical envelope)`` where the envelope is
``{"body", "position", "recorded_at", "signature", "stream_id",
"stream_version"}`` in RFC 8785 form. The first entry's ``prev_hash`` is 32
zero bytes. Because every entry commits to its predecessor, editing,
deleting, inserting or reordering any row changes every later hash; signed
checkpoints pin the head so that a rewrite of the tail is detectable too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

import msgspec

from ledger.canonical import canonical_bytes, canonical_envelope
from ledger.errors import SignatureError, VerificationError
from ledger.identity import VerifyKey, b64decode, b64encode
from ledger.signatures import Signer
from ledger.timefmt import format_time

GENESIS_HASH = bytes(32)
CHECKPOINT_ORIGIN = "agentmesh-ledger"


def envelope_bytes(
    *,
    position: int,
    recorded_at: datetime,
    stream_id: str,
    stream_version: int,
    body: bytes,
    signature: bytes,
) -> bytes:
    """Canonical envelope of one entry: what the chain hashes."""
    fields: dict[str, str | int] = {
        "position": position,
        "recorded_at": format_time(recorded_at),
        "signature": b64encode(signature),
        "stream_id": stream_id,
        "stream_version": stream_version,
    }
    return canonical_envelope(fields, body)


def entry_hash(prev_hash: bytes, envelope: bytes) -> bytes:
    return hashlib.sha256(prev_hash + envelope).digest()


@dataclass(frozen=True, slots=True)
class Entry:
    """One ledger row as stored (and as exported)."""

    position: int
    recorded_at: datetime
    stream_id: str
    stream_version: int
    body: bytes
    signature: bytes
    prev_hash: bytes
    entry_hash: bytes

    def envelope(self) -> bytes:
        return envelope_bytes(
            position=self.position,
            recorded_at=self.recorded_at,
            stream_id=self.stream_id,
            stream_version=self.stream_version,
            body=self.body,
            signature=self.signature,
        )


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where an append landed. ``duplicate`` is True for an idempotent retry."""

    positions: tuple[int, ...]
    stream_id: str
    stream_version: int
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Head:
    position: int
    entry_hash: bytes
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class RecordedEvent(Entry):
    """A stored entry with its indexed columns."""

    event_type: str
    actor: str
    subjects: tuple[str, ...]


def check_link(entry: Entry, expected_position: int, expected_prev: bytes) -> None:
    """Raise VerificationError unless ``entry`` extends the chain correctly."""
    if entry.position != expected_position:
        raise VerificationError(
            expected_position,
            f"missing or out of order: expected position {expected_position}, "
            f"found {entry.position}",
        )
    if entry.prev_hash != expected_prev:
        raise VerificationError(entry.position, "prev_hash does not match the previous entry")
    if entry_hash(entry.prev_hash, entry.envelope()) != entry.entry_hash:
        raise VerificationError(entry.position, "entry_hash does not match the entry's content")


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    """A signed statement by the ledger: the chain had ``head_hash`` at ``position``."""

    origin: str
    position: int
    head_hash: str  # hex
    time: str  # RFC 3339
    signer: str  # the ledger's DID
    signature: str = ""  # base64 Ed25519 over ``signed_bytes()``

    def signed_bytes(self) -> bytes:
        return canonical_bytes(
            {
                "origin": self.origin,
                "position": self.position,
                "head_hash": self.head_hash,
                "time": self.time,
                "signer": self.signer,
            }
        )


def sign_checkpoint(key: Signer, position: int, head_hash: bytes, moment: datetime) -> Checkpoint:
    """A checkpoint of ``head_hash`` at ``position``, signed by ``key`` (the ledger's,
    in memory or behind any ``Signer``)."""
    unsigned = Checkpoint(
        origin=CHECKPOINT_ORIGIN,
        position=position,
        head_hash=head_hash.hex(),
        time=format_time(moment),
        signer=key.did,
    )
    signature = b64encode(key.sign(unsigned.signed_bytes()))
    return msgspec.structs.replace(unsigned, signature=signature)


def verify_checkpoint(checkpoint: Checkpoint, ledger_key: VerifyKey) -> None:
    """Return None if the checkpoint is signed by ``ledger_key``; raise otherwise."""
    if checkpoint.signer != ledger_key.did:
        raise VerificationError(
            checkpoint.position,
            f"checkpoint signed by {checkpoint.signer}, not the ledger key {ledger_key.did}",
        )
    try:
        ledger_key.verify(
            b64decode(checkpoint.signature, "checkpoint signature"), checkpoint.signed_bytes()
        )
    except SignatureError as exc:
        raise VerificationError(checkpoint.position, "checkpoint signature is invalid") from exc
