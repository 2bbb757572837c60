"""``agentmesh up`` and ``agentmesh demo``: the local stack.

``agentmesh.local`` (the embedded PostgreSQL and Redis, ~400 ms) is imported
inside the handlers, so other commands do not load it.
"""

from __future__ import annotations

import argparse
from typing import Any

from agentmesh.cli.common import CliError, run
from agentmesh.settings import Settings


def register(commands: Any) -> None:
    up_ = commands.add_parser("up", help="run the local stack (what make run runs)")
    up_.set_defaults(handler=up)
    demo_ = commands.add_parser(
        "demo",
        help="against a running `agentmesh up`: a call allowed, then blocked after a violation",
    )
    demo_.set_defaults(handler=demo)


def up(_: argparse.Namespace, settings: Settings) -> int:
    from agentmesh.local import StackError, run_local_stack  # lazy: module docstring

    try:
        return run_local_stack(settings)
    except StackError as exc:
        raise CliError(str(exc)) from None


def demo(_: argparse.Namespace, settings: Settings) -> int:
    from agentmesh.local import run_demo  # lazy: module docstring

    return run(run_demo(settings))
