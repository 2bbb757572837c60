"""Ed25519 signatures in bulk, what may sign as the ledger, and what a retention
anchor signs — pure, no I/O.

``verify_signature_chunk`` checks a list of signatures (it runs on worker
processes, so everything it takes is picklable); ``make_executor`` starts
such a pool. ``Signer`` is what signs the ledger's own statements
(checkpoints, audit manifests): a DID, a public key and ``sign``, never the
private bytes. ``ledger.identity.SigningKey`` is one. ``anchor_signed_bytes``
is the message of a retention anchor (written by ``ledger.retention``, checked
offline by ``ledger.audit``).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from typing import Protocol

from ledger.canonical import canonical_bytes
from ledger.identity import NOT_A_GROUP_ELEMENT, VerifyKey, is_group_element, is_signature
from ledger.timefmt import format_time

__all__ = [
    "ANCHOR_TYPE",
    "KeyEntryJob",
    "SignatureJob",
    "Signer",
    "anchor_signed_bytes",
    "check_key_entries",
    "make_executor",
    "verify_signature_chunk",
]

ANCHOR_TYPE = "agentmesh.retention.anchor"

# (position, raw public key, signature, body)
SignatureJob = tuple[int, bytes, bytes, bytes]
# An audit bundle's key entry: its signature, and the raw key it installs.
KeyEntryJob = tuple[SignatureJob, bytes]


class Signer(Protocol):
    """Signs as one key: its DID, its public key and Ed25519 signatures."""

    @property
    def did(self) -> str: ...

    @property
    def public(self) -> VerifyKey: ...

    def sign(self, message: bytes) -> bytes: ...


def verify_signature_chunk(jobs: list[SignatureJob]) -> list[int]:
    """Positions whose signature does not verify (runs in a worker process)."""
    return [
        position
        for position, raw_key, signature, body in jobs
        if not is_signature(raw_key, signature, body)
    ]


def check_key_entries(jobs: list[KeyEntryJob]) -> dict[int, str]:
    """Why each failing key entry fails, by position: the key it installs is not a
    point of the prime-order group (a ledger must never have admitted it), or its
    signature does not verify. Both checks are libsodium's and release the GIL, so
    this runs on threads or worker processes, off the reader's main thread."""
    bad: dict[int, str] = {}
    for (position, raw_key, signature, body), installed in jobs:
        if not is_group_element(installed):
            bad[position] = f"invalid public key: {NOT_A_GROUP_ELEMENT}"
        elif not is_signature(raw_key, signature, body):
            bad[position] = "signature does not verify"
    return bad


def make_executor(workers: int | None = None) -> ProcessPoolExecutor:
    """A process pool for signature checks, one worker per core by default."""
    return ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1)


def anchor_signed_bytes(
    position: int, entry_hash: bytes, cut_time: datetime, keys: bytes, snapshot_digest: bytes
) -> bytes:
    """What the ledger signs for a retention anchor: the cut's position, chain hash and
    time, and the digests of the agent keys and of the projections' snapshot there."""
    return canonical_bytes(
        {
            "type": ANCHOR_TYPE,
            "position": position,
            "entry_hash": entry_hash.hex(),
            "cut_time": format_time(cut_time),
            "keys_digest": hashlib.sha256(keys).hexdigest(),
            "snapshot_digest": snapshot_digest.hex(),
        }
    )
