"""Retention anchors: the signed snapshot and chain anchor written at each cut.

Revision ID: 0004_retention
Revises: 0003_handshakes
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0004_retention"
down_revision = "0003_handshakes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE retention_anchors (
            position         bigint PRIMARY KEY,
            entry_hash       bytea       NOT NULL,
            cut_time         timestamptz NOT NULL,
            created_at       timestamptz NOT NULL,
            keys             bytea       NOT NULL,
            snapshot         bytea       NOT NULL,
            snapshot_digest  bytea       NOT NULL,
            signer           text        NOT NULL,
            signature        bytea       NOT NULL,
            status           text        NOT NULL
                CHECK (status IN ('anchored', 'pruned', 'recorded'))
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE retention_anchors")
