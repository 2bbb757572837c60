"""``agentmesh projections rebuild|status``: the read-side projections.

The adapters and the projector (asyncpg, redis, ~170 ms with the wiring) are
imported inside the handlers, so other commands do not load them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from agentmesh.cli.common import CliError, ProgressBar, print_json, run
from agentmesh.settings import Settings


def register(commands: Any) -> None:
    projections = commands.add_parser("projections", help="the read-side projections")
    sub = projections.add_subparsers(required=True, metavar="ACTION")
    rebuild_ = sub.add_parser("rebuild", help="rebuild from the ledger, swapped in when complete")
    rebuild_.add_argument(
        "--backend",
        choices=["redis", "postgres"],
        help="read store to rebuild (default AGENTMESH_STORAGE_BACKEND)",
    )
    rebuild_.set_defaults(handler=rebuild, local_stack="read")
    status_ = sub.add_parser("status", help="print position, head and lag")
    status_.add_argument(
        "--backend",
        choices=["redis", "postgres"],
        help="read store to inspect (default AGENTMESH_STORAGE_BACKEND)",
    )
    status_.set_defaults(handler=status, local_stack="read")


def shared_backend(settings: Settings, backend: str | None) -> str:
    """The read store a separate process can reach (not the API's in-memory one)."""
    chosen = backend or settings.storage_backend
    if chosen == "memory":
        raise CliError(
            "the memory read store lives inside one process (the API's); use --backend "
            "redis or postgres"
        )
    return chosen


@contextlib.asynccontextmanager
async def _ledger_and_store(settings: Settings, backend: str) -> AsyncIterator[tuple[Any, Any]]:
    """The ledger reader and the chosen read store, closed on the way out."""
    from agentmesh.wiring import open_projection_store  # lazy: module docstring
    from ledger.postgres import PostgresLedgerReader

    reader = await PostgresLedgerReader.connect(settings.require_database_url())
    try:
        store = await open_projection_store(settings, backend)  # type: ignore[arg-type]
        try:
            yield reader, store
        finally:
            await store.close()
    finally:
        await reader.close()


def rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from agentmesh.wiring import trust_config  # lazy: module docstring
    from projections.projector import Projector

    backend = shared_backend(settings, args.backend)

    async def fold() -> int:
        async with _ledger_and_store(settings, backend) as (reader, store):
            head = await reader.head()
            bar = ProgressBar("rebuild", head.position)
            projector = Projector(reader, store, trust_config(settings))
            progress = await projector.rebuild(progress=bar.update)
            bar.done()
        print(
            f"rebuilt {backend} read store: position {progress.state.position}, "
            f"{len(progress.state.agents)} agents, "
            f"{len(progress.state.delegations.grants)} grants"
        )
        return 0

    return run(fold())


def status(args: argparse.Namespace, settings: Settings) -> int:
    from agentmesh.wiring import trust_config  # lazy: module docstring
    from projections.readstore import ProjectionReader

    backend = shared_backend(settings, args.backend)

    async def inspect() -> int:
        async with _ledger_and_store(settings, backend) as (reader, store):
            head = await reader.head()
            found = await ProjectionReader(store, trust_config(settings)).status(head.position)
        print_json(dataclasses.asdict(found))
        return 0

    return run(inspect())
