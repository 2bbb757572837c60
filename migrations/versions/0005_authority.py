"""Trust-model state on the write side: single-use event ids, agent status,
idempotency keys scoped by signer.

Revision ID: 0005_authority
Revises: 0004_retention
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0005_authority"
down_revision = "0004_retention"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # (actor, event_id) is unique: a signed body enters the ledger once. Rows older
    # than the freshness window could go; retention removes those before its cut.
    # The key is the first 16 bytes of SHA-256(actor ‖ 0x00 ‖ event_id): a quarter of
    # the two texts' size in the heap, the index and the WAL, 128 bits against collision.
    op.execute(
        """
        CREATE TABLE event_ids (
            key       bytea  PRIMARY KEY,
            position  bigint NOT NULL
        )
        """
    )
    # A suspended agent writes nothing: the append lock reads this, never a projection.
    op.execute("ALTER TABLE agent_keys ADD COLUMN suspended boolean NOT NULL DEFAULT false")
    # One signer's idempotency keys cannot collide with another's.
    op.execute("ALTER TABLE idempotency_keys ADD COLUMN signer text NOT NULL DEFAULT ''")
    op.execute("ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey")
    op.execute("ALTER TABLE idempotency_keys ADD PRIMARY KEY (signer, key)")


def downgrade() -> None:
    op.execute("ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey")
    op.execute(
        "DELETE FROM idempotency_keys a USING idempotency_keys b "
        "WHERE a.key = b.key AND a.signer > b.signer"
    )
    op.execute("ALTER TABLE idempotency_keys DROP COLUMN signer")
    op.execute("ALTER TABLE idempotency_keys ADD PRIMARY KEY (key)")
    op.execute("ALTER TABLE agent_keys DROP COLUMN suspended")
    op.execute("DROP TABLE event_ids")
