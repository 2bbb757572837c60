"""``agentmesh retention run``: the audit window."""

from __future__ import annotations

import argparse
from typing import Any

from agentmesh.cli.common import run
from agentmesh.settings import Settings


def register(commands: Any) -> None:
    retention = commands.add_parser("retention", help="the audit window")
    sub = retention.add_subparsers(required=True, metavar="ACTION")
    run_ = sub.add_parser(
        "run", help="remove events older than AGENTMESH_GOVERNANCE_AUDIT_RETENTION_DAYS"
    )
    run_.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    run_.set_defaults(handler=apply, local_stack="sign")


def apply(args: argparse.Namespace, settings: Settings) -> int:
    # Lazy: the retention job wires asyncpg and the projections (~330 ms).
    from agentmesh.retention_job import run_retention

    print(run(run_retention(settings, dry_run=args.dry_run)))
    return 0
