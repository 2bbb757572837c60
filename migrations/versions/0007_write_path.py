"""The write path's WAL: drop the (stream_id, stream_version) index on events;
index the ledger's key rotations alone.

No query reads events by stream: stream versions live in ``streams`` (updated in
the same commit as the events), and readers go by position or by subject. The
index cost every append about 160 WAL bytes and a B-tree insert with a ~60-byte
text key (measured with pg_waldump: 1,645 -> 1,487 bytes per event, one appender).
The ledger's key history (``ledger.key_rotated`` entries, read at start-up, by
``GET /v1/ledger/keys`` and by verify) gets a partial index holding those rows only.
Retention deletes ``event_ids`` and ``idempotency_keys`` rows by position, which no
index covered (a scan of the whole table per cut: 0.83 s at 4M events, growing with
the ledger); both are written in position order, so a BRIN index (a few pages, no
work per insert) finds the rows before a cut.

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
    op.execute(
        "CREATE INDEX event_ids_position_brin ON event_ids USING brin (position) "
        "WITH (autosummarize = on)"
    )
    op.execute(
        "CREATE INDEX idempotency_keys_position_brin ON idempotency_keys "
        "USING brin (first_position) WITH (autosummarize = on)"
    )
    # A build summarizes the last, partly filled block range too, and every insert
    # into a summarized range rewrites its summary (~70 WAL bytes). Leave that range
    # unsummarized: autosummarize summarizes each range once the next one starts.
    for index, table in (
        ("event_ids_position_brin", "event_ids"),
        ("idempotency_keys_position_brin", "idempotency_keys"),
    ):
        op.execute(
            f"SELECT brin_desummarize_range('{index}', "
            f"(pg_relation_size('{table}') / current_setting('block_size')::int / 128) * 128)"
        )


def downgrade() -> None:
    op.execute("DROP INDEX idempotency_keys_position_brin")
    op.execute("DROP INDEX event_ids_position_brin")
    op.execute("DROP INDEX events_ledger_key_idx")
    op.execute("CREATE INDEX events_stream_idx ON events (stream_id, stream_version)")
