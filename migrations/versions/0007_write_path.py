"""The write path's WAL: drop the (stream_id, stream_version) index on events;
index the ledger's key rotations alone.

No query reads events by stream: stream versions live in ``streams`` (updated in
the same commit as the events), and readers go by position or by subject. The
index cost every append about 160 WAL bytes and a B-tree insert with a ~60-byte
text key (measured with pg_waldump: 1,645 -> 1,487 bytes per event, one appender).
The ledger's key history (``ledger.key_rotated`` entries, read at start-up, by
``GET /v1/ledger/keys`` and by verify) gets a partial index holding those rows only.

Revision ID: 0007_write_path
Revises: 0006_merkle
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0007_write_path"
down_revision = "0006_merkle"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DROP INDEX IF EXISTS events_stream_idx")
    op.execute(
        "CREATE INDEX events_ledger_key_idx ON events (position) "
        "WHERE event_type = 'ledger.key_rotated'"
    )


def downgrade() -> None:
    op.execute("DROP INDEX events_ledger_key_idx")
    op.execute("CREATE INDEX events_stream_idx ON events (stream_id, stream_version)")
