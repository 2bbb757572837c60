"""The ledger on PostgreSQL: the only package that imports the driver.

``reader`` (every SELECT, the row mapping), ``store`` (the group-committing
writer), ``batch`` (what one commit checks and writes, pure), ``signers`` (the
signature checks before it), ``identity`` (the ledger's key, recorded at
genesis), ``tree`` (stored Merkle subtrees), ``checkpoints`` (when a commit
signs one), ``retention`` (the cut's SQL), ``audit`` (the exporter's queries),
``schema`` (table metadata for Alembic), ``dsn`` (URL handling, no driver).
Driver errors are translated once, here, into ``ledger.errors``.

The names in ``__all__`` are loaded on first use, so ``ledger.postgres.dsn``
(which ``agentmesh.settings`` reads for every command) does not load asyncpg.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ledger.postgres.reader import PostgresLedgerReader, partition_name
    from ledger.postgres.store import PostgresEventStore

_EXPORTS = {
    "PostgresEventStore": "ledger.postgres.store",
    "PostgresLedgerReader": "ledger.postgres.reader",
    "partition_name": "ledger.postgres.reader",
}

__all__ = ["PostgresEventStore", "PostgresLedgerReader", "partition_name"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ledger.postgres' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
