"""The ledger on PostgreSQL: the only package that imports the driver.

``reader`` (every SELECT, the row mapping), ``store`` (the group-committing
writer), ``schema`` (table metadata for Alembic), ``dsn`` (URL handling).
Driver errors are translated once, here, into ``ledger.errors``.
"""

from ledger.postgres.reader import PostgresLedgerReader, partition_name
from ledger.postgres.store import PostgresEventStore

__all__ = ["PostgresEventStore", "PostgresLedgerReader", "partition_name"]
