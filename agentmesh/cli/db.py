"""``agentmesh db upgrade``: the database schema."""

from __future__ import annotations

import argparse
from typing import Any

from agentmesh.cli.common import CliError, one_line
from agentmesh.settings import Settings


def register(commands: Any) -> None:
    db = commands.add_parser("db", help="database schema")
    sub = db.add_subparsers(required=True, metavar="ACTION")
    upgrade_ = sub.add_parser("upgrade", help="apply migrations (idempotent)")
    upgrade_.set_defaults(handler=upgrade, local_stack="read")


def upgrade(_: argparse.Namespace, settings: Settings) -> int:
    # Lazy: Alembic and SQLAlchemy cost ~400 ms that no other command needs.
    from agentmesh.migrate import head_revision
    from agentmesh.migrate import upgrade as migrate

    url = settings.require_database_url()
    try:
        migrate(url)
    except Exception as exc:  # alembic and drivers raise many types; report one line
        raise CliError(f"migration failed: {one_line(exc)}") from None
    print(f"database at revision {head_revision()}")
    return 0
