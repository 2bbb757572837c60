"""The write side of AgentMesh: signed, hash-chained events in PostgreSQL.

Modules:
    errors     -- the exception tree (``LedgerError`` at the root)
    canonical  -- the one place canonical bytes are produced (RFC 8785 JSON)
    identity   -- Ed25519 keys, DIDs, signing and verification
    events     -- event types (frozen, tagged msgspec structs) and the signed body
    chain      -- hash chain and signed checkpoints (pure)
    schema     -- table metadata (used by the Alembic migrations)
    store      -- ``PostgresEventStore``: group-committed, serialized appends
    verify     -- full-ledger verification, signatures spread over all cores
"""
