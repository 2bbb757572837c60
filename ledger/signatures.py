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
from ledger.identity import VerifyKey, is_signature
from ledger.timefmt import format_time

__all__ = [
    "ANCHOR_TYPE",
    "SignatureJob",
    "Signer",
    "anchor_signed_bytes",
    "make_executor",
    "verify_signature_chunk",
]

ANCHOR_TYPE = "agentmesh.retention.anchor"

# (position, raw public key, signature, body)
SignatureJob = tuple[int, bytes, bytes, bytes]


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
