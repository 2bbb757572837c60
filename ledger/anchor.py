"""Retention anchors checked: pure, so verification needs no driver.

A ``ledger.ports.StoredAnchor`` is what the store holds; ``verify_anchor``
checks its snapshot digest and the ledger key's signature over
``ledger.signatures.anchor_signed_bytes`` and returns the ``Anchor``
verification restarts from (its keys decoded).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec

from ledger.errors import VerificationError
from ledger.identity import VerifyKey, b64decode
from ledger.ports import StoredAnchor
from ledger.signatures import anchor_signed_bytes

__all__ = ["Anchor", "verify_anchor"]


@dataclass(frozen=True, slots=True)
class Anchor:
    """A verified retention anchor: where the chain restarts after a cut."""

    position: int
    entry_hash: bytes
    cut_time: datetime
    keys: dict[str, bytes]
    snapshot: dict[str, Any]
    snapshot_digest: bytes
    status: str


def verify_anchor(stored: StoredAnchor, ledger_key: VerifyKey) -> Anchor:
    """The anchor, its digest and signature checked; ``VerificationError`` otherwise."""
    position = stored.position
    if hashlib.sha256(stored.snapshot).digest() != stored.snapshot_digest:
        raise VerificationError(position, "retention snapshot does not match its digest")
    if stored.signer != ledger_key.did:
        raise VerificationError(position, f"retention anchor signed by {stored.signer}")
    message = anchor_signed_bytes(
        position, stored.entry_hash, stored.cut_time, stored.keys, stored.snapshot_digest
    )
    if not ledger_key.is_valid(stored.signature, message):
        raise VerificationError(position, "retention anchor signature is invalid")
    keys = {did: b64decode(raw, "key") for did, raw in msgspec.json.decode(stored.keys).items()}
    return Anchor(
        position,
        stored.entry_hash,
        stored.cut_time,
        keys,
        msgspec.json.decode(stored.snapshot),
        stored.snapshot_digest,
        stored.status,
    )
