"""Table metadata of the ledger (the Alembic migrations create exactly this).

``events`` is partitioned by ``recorded_at`` into one partition per UTC day,
so retention drops whole partitions. A primary key on a partitioned table
must include the partition key, so global uniqueness of ``position`` and of
``(stream_id, stream_version)`` is kept by the writer, which serializes every
append on the single ``ledger_head`` row; the small side tables (``streams``,
``idempotency_keys``, ``agent_keys``, ``event_ids``) hold the write-side constraints and are
updated in the same transaction. ``event_ids`` and ``idempotency_keys`` are partitioned
by the UTC day their bodies occurred on: a replay or a retry meets its original in the
same partition, and days whose bodies are stale are dropped whole.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY

metadata = MetaData()

events = Table(
    "events",
    metadata,
    Column("position", BigInteger, primary_key=True),
    Column("recorded_at", DateTime(timezone=True), primary_key=True),
    Column("stream_id", Text, nullable=False),
    Column("stream_version", Integer, nullable=False),
    Column("event_type", Text, nullable=False),
    Column("actor", Text, nullable=False),
    Column("subjects", ARRAY(Text), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("signature", LargeBinary, nullable=False),
    Column("prev_hash", LargeBinary, nullable=False),
    Column("entry_hash", LargeBinary, nullable=False),
    Index("events_subjects_idx", "subjects", postgresql_using="gin"),
    # The ledger's key history: its rotations alone (see migration 0007).
    Index(
        "events_ledger_key_idx",
        "position",
        postgresql_where=text("event_type = 'ledger.key_rotated'"),
    ),
    postgresql_partition_by="RANGE (recorded_at)",
)

ledger_head = Table(
    "ledger_head",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("position", BigInteger, nullable=False),
    Column("entry_hash", LargeBinary, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("merkle_built", Boolean, nullable=False, server_default="false"),
)

ledger_identity = Table(
    "ledger_identity",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("did", Text, nullable=False),
    Column("public_key", LargeBinary, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
)

merkle_nodes = Table(
    "merkle_nodes",
    metadata,
    Column("level", SmallInteger, primary_key=True),
    Column("idx", BigInteger, primary_key=True),
    Column("hash", LargeBinary, nullable=False),
)

streams = Table(
    "streams",
    metadata,
    Column("stream_id", Text, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("last_position", BigInteger, nullable=False),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("signer", Text, primary_key=True),
    Column("key", Text, primary_key=True),
    # The UTC day the request's first event occurred on (a retry resends it); one
    # partition per day, dropped whole once such bodies are stale (migration 0008).
    Column("day", Date, primary_key=True),
    Column("first_position", BigInteger, nullable=False),
    Column("count", Integer, nullable=False),
    Column("stream_id", Text, nullable=False),
    Column("stream_version", Integer, nullable=False),
    Column("digest", LargeBinary, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    postgresql_partition_by="RANGE (day)",
)

agent_keys = Table(
    "agent_keys",
    metadata,
    Column("did", Text, primary_key=True),
    Column("public_key", LargeBinary, nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("suspended", Boolean, nullable=False, server_default="false"),
)

event_ids = Table(
    "event_ids",
    metadata,
    Column("key", LargeBinary, primary_key=True),
    Column("day", Date, primary_key=True),  # the body's occurred_at, as above
    Column("position", BigInteger, nullable=False),
    postgresql_partition_by="RANGE (day)",
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("position", BigInteger, primary_key=True),
    Column("head_hash", LargeBinary, nullable=False),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("signer", Text, nullable=False),
    Column("signature", LargeBinary, nullable=False),
    Column("note", Text, nullable=True),
)
