"""The write side of AgentMesh: signed, hash-chained events, a transparency log.

Pure modules (no I/O, no driver)::

    errors      the exception tree below
    canonical   the one place canonical bytes are produced (RFC 8785 JSON)
    identity    Ed25519 keys, DIDs, signing and verification
    signatures  signatures in bulk; ``Signer``, what may sign as the ledger
    events      event types (frozen, tagged msgspec structs) and the signed body
    signed      ``SignedEvent``: a canonical body plus its origin's signature
    timefmt     RFC 3339 timestamps in one fixed form
    chain       the hash chain, signed checkpoints; RecordedEvent, AppendResult, Head
    authority   who may sign what: the write rules append and verify share
    merkle      RFC 9162 Merkle tree: hashing, frontier, proofs
    note        C2SP signed notes, checkpoints and cosignatures
    tlog        the ledger as a transparency log: leaves, subtrees, signed tree heads
    anchor      retention anchors checked (digest, ledger signature): ``verify_anchor``

Ports and adapters::

    ports       ``LedgerReader`` / ``LedgerWriter`` / ``Ledger`` Protocols, ``Window``;
                ``RetentionAnchors`` / ``RetentionStore`` (a cut, its anchors), ``StoredAnchor``
    memory      ``MemoryLedger``: the in-process adapter (unit tests, tools)
    postgres/   the PostgreSQL adapter, the only importer of asyncpg: store.py
                (``PostgresEventStore``, the writer), reader.py (every SELECT),
                schema.py (tables, for Alembic), dsn.py (URLs), retention.py
                (``PostgresRetentionStore``: anchors, retention's steps)

Through the ports::

    verify          full-ledger verification, signatures spread over all cores
    retention       remove events older than the audit window, keeping the proofs
    audit/          audit bundles: bundle, cloudevents, chunks, verify, reader, export

Exceptions (all under ``LedgerError``; ``ledger.errors`` unless named)::

    LedgerError
    ├── EventValidationError       malformed body, unknown type, bad payload
    ├── SignatureError             bad signature, unknown signer, wrong key
    │   └── NoteError              malformed or unverified signed note / checkpoint
    ├── ConcurrencyError           expected stream version did not match
    ├── IdempotencyConflictError   key reused with different content
    ├── LedgerKeyMismatchError     a process holds another key than the ledger's own
    ├── NotPermittedError          the signer may not write this (suspended, wrong role)
    ├── AppendRejectedError        the event contradicts ledger state (e.g. duplicate DID)
    │   └── ReplayError            an event with this (signer, event_id) is already recorded
    ├── VerificationError          chain, signature or checkpoint check failed (``position``)
    │   └── BundleVerificationError   ledger.audit: a bundle line is bad (``line``)
    ├── StoreUnavailableError      the database could not be reached or failed
    ├── ProofError                 Merkle proof malformed, does not verify, or not possible
    ├── RetentionError             ledger.retention: refused to run or could not finish
    └── LineError                  ledger.audit: not a bundle line (internal)

The names in ``__all__`` are loaded on first use, so importing one module of
the package (``ledger.timefmt``) does not import the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ledger.chain import AppendResult, Checkpoint, Head, RecordedEvent
    from ledger.errors import (
        AppendRejectedError,
        ConcurrencyError,
        EventValidationError,
        IdempotencyConflictError,
        LedgerError,
        LedgerKeyMismatchError,
        NoteError,
        NotPermittedError,
        ProofError,
        ReplayError,
        SignatureError,
        StoreUnavailableError,
        VerificationError,
    )
    from ledger.identity import SigningKey, VerifyKey
    from ledger.memory import MemoryLedger
    from ledger.ports import Ledger, LedgerReader, LedgerWriter, Window
    from ledger.signatures import Signer
    from ledger.signed import SignedEvent

_EXPORTS = {
    "AppendRejectedError": "ledger.errors",
    "AppendResult": "ledger.chain",
    "Checkpoint": "ledger.chain",
    "ConcurrencyError": "ledger.errors",
    "EventValidationError": "ledger.errors",
    "Head": "ledger.chain",
    "IdempotencyConflictError": "ledger.errors",
    "Ledger": "ledger.ports",
    "LedgerError": "ledger.errors",
    "LedgerKeyMismatchError": "ledger.errors",
    "LedgerReader": "ledger.ports",
    "LedgerWriter": "ledger.ports",
    "MemoryLedger": "ledger.memory",
    "NoteError": "ledger.errors",
    "NotPermittedError": "ledger.errors",
    "ProofError": "ledger.errors",
    "RecordedEvent": "ledger.chain",
    "ReplayError": "ledger.errors",
    "SignatureError": "ledger.errors",
    "SignedEvent": "ledger.signed",
    "Signer": "ledger.signatures",
    "SigningKey": "ledger.identity",
    "StoreUnavailableError": "ledger.errors",
    "VerificationError": "ledger.errors",
    "VerifyKey": "ledger.identity",
    "Window": "ledger.ports",
}

__all__ = [
    "AppendRejectedError",
    "AppendResult",
    "Checkpoint",
    "ConcurrencyError",
    "EventValidationError",
    "Head",
    "IdempotencyConflictError",
    "Ledger",
    "LedgerError",
    "LedgerKeyMismatchError",
    "LedgerReader",
    "LedgerWriter",
    "MemoryLedger",
    "NotPermittedError",
    "NoteError",
    "ProofError",
    "RecordedEvent",
    "ReplayError",
    "SignatureError",
    "SignedEvent",
    "Signer",
    "SigningKey",
    "StoreUnavailableError",
    "VerificationError",
    "VerifyKey",
    "Window",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ledger' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
