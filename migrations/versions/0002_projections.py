"""Read-store tables for AGENTMESH_STORAGE_BACKEND=postgres.

Revision ID: 0002_projections
Revises: 0001_ledger
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0002_projections"
down_revision = "0001_ledger"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE projection_current (
            name        text PRIMARY KEY,
            generation  text NOT NULL
        )
        """
    )
    op.execute(
        """
        CREATE TABLE projection_meta (
            generation  text PRIMARY KEY,
            position    bigint NOT NULL,
            meta        bytea  NOT NULL
        )
        """
    )
    op.execute(
        """
        CREATE FUNCTION projection_generation(store text) RETURNS text
        LANGUAGE sql STABLE AS
        'SELECT generation FROM projection_current WHERE name = store'
        """
    )
    op.execute(
        """
        CREATE TABLE projection_docs (
            generation  text NOT NULL,
            kind        text NOT NULL,
            id          text NOT NULL,
            doc         bytea NOT NULL,
            PRIMARY KEY (generation, kind, id)
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION projection_generation(text)")
    for table in ("projection_docs", "projection_meta", "projection_current"):
        op.execute(f"DROP TABLE {table}")
