"""Handshake challenges shared by every API replica (single-use nonces).

Revision ID: 0003_handshakes
Revises: 0002_projections
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0003_handshakes"
down_revision = "0002_projections"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE handshakes (
            id          text PRIMARY KEY,
            initiator   text        NOT NULL,
            responder   text        NOT NULL,
            nonce       text        NOT NULL,
            min_score   integer,
            created_at  timestamptz NOT NULL,
            expires_at  timestamptz NOT NULL,
            used_at     timestamptz
        )
        """
    )
    op.execute("CREATE INDEX handshakes_expires_idx ON handshakes (expires_at)")


def downgrade() -> None:
    op.execute("DROP TABLE handshakes")
