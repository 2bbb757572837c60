"""Taking the ledger's turn in one round trip: ``ledger_take_turn``.

Processes appending to one ledger take turns (``PostgresEventStore``'s "Turns"): a
session advisory lock, then the entries appended since the process's last commit.
That was three round trips per turn (try the lock, wait for it, read the entries),
and a holder handed the ledger over with one more after its commit. Now a holder
hands over inside its write statement, and a waiter takes the turn with one call:

1. the turn lock (``pg_try_advisory_lock``, else ``pg_advisory_lock``: it waits, for
   at most ``wait_ms``: a holder that froze, or whose node went away with its TCP
   connection left open, must not stall every other writer — turns are an economy,
   and the writer goes on without one, its guarded writes still correct);
2. the previous holder's commit: a holder that hands over inside its write releases
   the turn lock before that statement's transaction commits, so it also holds
   ``commit_lock`` (a transaction-level shared advisory lock) until its commit is
   visible; waiting for it here (exclusive, released at the end of this call)
   writes nothing, so this call never waits for a WAL flush of its own;
3. the entries after ``after_position`` (recorded at or after ``since``), in
   position order, at most ``max_rows`` — read with a snapshot taken after 2 (in a
   PL/pgSQL function each statement takes its own under READ COMMITTED).

The first row says whether the lock was waited for and whether it is held now (every
other column NULL); the entries follow, when it is held and ``after_position`` is not
NULL.

Revision ID: 0009_turn_function
Revises: 0008_single_use_days
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0009_turn_function"
down_revision = "0008_single_use_days"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION ledger_take_turn(
          lock_id bigint, commit_lock bigint, wait_ms int, after_position bigint,
          since timestamptz, max_rows int
        ) RETURNS TABLE (waited boolean, turn boolean, "position" bigint, entry_hash bytea,
                         recorded_at timestamptz, event_type text, stream_id text,
                         stream_version int, actor text, subjects text[])
        LANGUAGE plpgsql VOLATILE AS $f$
        #variable_conflict use_column
        DECLARE
          w boolean := NOT pg_try_advisory_lock(lock_id);
          held boolean := true;
          previous text;
        BEGIN
          IF w THEN
            previous := current_setting('lock_timeout');
            BEGIN
              PERFORM set_config('lock_timeout', wait_ms::text, true);
              PERFORM pg_advisory_lock(lock_id);
              PERFORM set_config('lock_timeout', previous, true);
            EXCEPTION WHEN lock_not_available THEN
              held := false;  -- the block's setting is rolled back with it
            END;
          END IF;
          IF held THEN
            PERFORM pg_advisory_xact_lock(commit_lock);
          END IF;
          RETURN QUERY SELECT w, held, NULL::bigint, NULL::bytea, NULL::timestamptz,
                              NULL::text, NULL::text, NULL::int, NULL::text, NULL::text[];
          IF held AND after_position IS NOT NULL THEN
            RETURN QUERY
              SELECT w, held, e.position, e.entry_hash, e.recorded_at, e.event_type,
                     e.stream_id, e.stream_version, e.actor, e.subjects
                FROM events e
               WHERE e.position > after_position AND e.recorded_at >= since
               ORDER BY e.position LIMIT max_rows;
          END IF;
        END
        $f$
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION ledger_take_turn(bigint, bigint, int, bigint, timestamptz, int)")
