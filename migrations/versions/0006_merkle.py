"""The Merkle tree over the ledger: its frontier with the head, its stored subtrees,
and C2SP signed notes on checkpoints; the ledger's one identity (its key, recorded
at genesis).

Revision ID: 0006_merkle
Revises: 0005_authority
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0006_merkle"
down_revision = "0005_authority"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # False until the store has built the tree over the entries already there (at
    # open). The frontier itself is not stored: it is derived from the stored
    # subtrees and the last few entries, and kept in memory by the writer.
    op.execute("ALTER TABLE ledger_head ADD COLUMN merkle_built boolean NOT NULL DEFAULT false")
    # Complete subtrees of 16 leaves and more (ledger.tlog.STORED_LEVEL).
    op.execute(
        """
        CREATE TABLE merkle_nodes (
            level  smallint NOT NULL,
            idx    bigint   NOT NULL,
            hash   bytea    NOT NULL,
            PRIMARY KEY (level, idx)
        )
        """
    )
    op.execute("ALTER TABLE checkpoints ADD COLUMN note text")
    # One ledger, one key: the first process that opens the ledger records its key;
    # a process started with another key refuses to start.
    op.execute(
        """
        CREATE TABLE ledger_identity (
            id          integer PRIMARY KEY CHECK (id = 1),
            did         text        NOT NULL,
            public_key  bytea       NOT NULL,
            recorded_at timestamptz NOT NULL
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE ledger_identity")
    op.execute("ALTER TABLE checkpoints DROP COLUMN note")
    op.execute("DROP TABLE merkle_nodes")
    op.execute("ALTER TABLE ledger_head DROP COLUMN merkle_built")
