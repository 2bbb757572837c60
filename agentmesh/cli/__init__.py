"""The ``agentmesh`` command line.

Every failure is one line on stderr (``agentmesh: error: …``) and a non-zero
exit: 1 for a failed operation (including a failed verification), 2 for bad
usage. Private keys are only ever written where the user asked for them.

One module per command group, each with ``register(commands)`` adding its
parser and the handlers it names::

    common          CliError, run, argument types, print_json, ProgressBar,
                    write_atomically
    identity        identity generate|show
    db              db upgrade
    ledger          ledger verify|prove|vkey|checkpoint|head|rotate-key
    serve           serve projector|sidecar|api|injector
    projections     projections rebuild|status
    retention       retention run
    replay          replay agent|state|diff (replay_sources: the live ledger or
                    a bundle; replay_plot: drawing, loaded only for --plot)
    audit           audit export|verify
    witness         witness
    local           up, demo

Building the parser imports every group, so a group imports at the top only
what is cheap (the standard library, settings, the ledger's pure modules).
What costs start-up time — the PostgreSQL driver, the projections, Litestar,
Alembic, matplotlib, the embedded servers — is imported inside the handler
that needs it, each such import marked "lazy" with its reason.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from agentmesh.cli import (
    audit,
    db,
    identity,
    ledger,
    local,
    projections,
    replay,
    retention,
    serve,
    witness,
)
from agentmesh.cli.common import CliError
from agentmesh.settings import ConfigError, Settings
from ledger.errors import LedgerError

__all__ = ["CliError", "main"]


def main(argv: Sequence[str] | None = None) -> NoReturn:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        if getattr(args, "local_stack", None) is not None:
            # Lazy: the embedded servers' modules (~400 ms), for local-stack commands only.
            from agentmesh.local import with_local_stack

            # Next to a running `make run`: its database, Redis and token, found in
            # the data directory (the environment wins where it sets them).
            settings = with_local_stack(settings, signing=args.local_stack == "sign")
        code = args.handler(args, settings)
    except (CliError, ConfigError, LedgerError) as exc:
        print(f"agentmesh: error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        # `agentmesh … | head`: the reader left; say nothing more.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- swallow the final flush
        code = 0
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentmesh", description="AgentMesh trust ledger for AI-agent fleets."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for group in (
        identity,
        db,
        ledger,
        serve,
        projections,
        retention,
        replay,
        audit,
        witness,
        local,
    ):
        group.register(commands)
    return parser
