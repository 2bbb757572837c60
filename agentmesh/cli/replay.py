"""``agentmesh replay agent|state|diff``: a past moment rebuilt for incident review.

Parsing and printing live here; where the events come from in
``replay_sources``; the plot is drawn in ``replay_plot`` and written to its file
here. The projections' replay (~55 ms), the PostgreSQL adapter (asyncpg) and
matplotlib (~400 ms, only with ``--plot``) are imported inside the handlers,
so other commands do not load them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentmesh.cli.common import CliError, ProgressBar, positive_int, print_json, run
from agentmesh.cli.replay_sources import bundle_source, ledger_source
from agentmesh.settings import Settings
from ledger.timefmt import parse_time

if TYPE_CHECKING:
    from projections.config import TrustConfig
    from projections.replay import MeshAt, MeshDiff, Replay, ReplaySource, Timeline

PLOT_FORMATS = {".png": "png", ".svg": "svg"}


def register(commands: Any) -> None:
    replay = commands.add_parser("replay", help="rebuild a past moment for incident review")
    sub = replay.add_subparsers(required=True, metavar="QUESTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--bundle",
        type=Path,
        metavar="FILE",
        help="replay an audit export bundle (default: the ledger at AGENTMESH_DATABASE_URL)",
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    agent_ = sub.add_parser("agent", parents=[common], help="an agent's trust timeline")
    agent_.add_argument("did", metavar="DID")
    agent_.add_argument(
        "--from", dest="start", type=_time, metavar="TIME", help="first moment (RFC 3339)"
    )
    agent_.add_argument(
        "--to", dest="end", type=_time, metavar="TIME", help="last moment (RFC 3339)"
    )
    agent_.add_argument(
        "--plot", type=Path, metavar="FILE", help="also draw the score over time (.png or .svg)"
    )
    agent_.set_defaults(handler=agent, local_stack="read")
    state_ = sub.add_parser("state", parents=[common], help="the mesh as it was at a moment")
    state_.add_argument("--at", required=True, type=_time, metavar="TIME")
    state_.add_argument(
        "--lowest", type=positive_int, default=10, help="lowest-trust agents to list (10)"
    )
    state_.set_defaults(handler=state, local_stack="read")
    diff_ = sub.add_parser("diff", parents=[common], help="what changed between two moments")
    diff_.add_argument("--from", dest="start", required=True, type=_time, metavar="TIME")
    diff_.add_argument("--to", dest="end", required=True, type=_time, metavar="TIME")
    diff_.set_defaults(handler=diff, local_stack="read")


def _time(text: str) -> datetime:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def agent(args: argparse.Namespace, settings: Settings) -> int:
    from projections.replay import AgentTimelineReplay  # lazy: module docstring

    plot_format = None if args.plot is None else _plot_format(args.plot)
    timeline = _replay(
        args,
        settings,
        lambda source, config: AgentTimelineReplay(
            source, args.did, start=args.start, end=args.end, config=config
        ),
    )
    _print(args, timeline)
    if plot_format is not None:
        _write_plot(timeline, args.plot, plot_format)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0


def state(args: argparse.Namespace, settings: Settings) -> int:
    from projections.replay import StateReplay  # lazy: module docstring

    mesh = _replay(
        args,
        settings,
        lambda source, config: StateReplay(source, args.at, lowest=args.lowest, config=config),
    )
    _print(args, mesh)
    return 0


def diff(args: argparse.Namespace, settings: Settings) -> int:
    from projections.replay import DiffReplay  # lazy: module docstring

    changes = _replay(
        args,
        settings,
        lambda source, config: DiffReplay(source, args.start, args.end, config=config),
    )
    _print(args, changes)
    return 0


def _replay(
    args: argparse.Namespace,
    settings: Settings,
    build: Callable[[ReplaySource, TrustConfig], Replay[Any]],
) -> Any:
    """Run the replay ``build`` makes over the bundle or the live ledger; its errors
    become one-line CLI errors."""
    from agentmesh.wiring import trust_config  # lazy: module docstring
    from ledger.postgres import PostgresLedgerReader
    from projections.errors import ProjectionError

    config = trust_config(settings)

    async def replay() -> Any:
        if args.bundle is not None:
            return await build(bundle_source(args.bundle), config).run_async()
        reader = await PostgresLedgerReader.connect(settings.require_database_url())
        bar = ProgressBar("replay", 1)
        try:
            source = await ledger_source(reader, config)
            bar.total = max((await reader.head()).position, 1)
            return await build(source, config).run_async(progress=bar.update)
        finally:
            bar.done()
            await reader.close()

    try:
        return run(replay())
    except ProjectionError as exc:
        raise CliError(str(exc)) from None


def _print(args: argparse.Namespace, result: Timeline | MeshAt | MeshDiff) -> None:
    try:
        if args.json:
            print_json(result.to_dict())
        else:
            print("\n".join(result.lines()))
        sys.stdout.flush()
    except BrokenPipeError:
        # Piped into `head`: the reader has what it wanted; no traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _plot_format(path: Path) -> str:
    plot_format = PLOT_FORMATS.get(path.suffix.lower())
    if plot_format is None:
        raise CliError(f"--plot {path}: unknown image format; name a .png or .svg file")
    return plot_format


def _write_plot(timeline: Timeline, path: Path, plot_format: str) -> None:
    """Draw the timeline (``replay_plot``) and write the image to ``path``."""
    try:
        from agentmesh.cli import replay_plot  # lazy: matplotlib (module docstring)
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install matplotlib") from None
    image = replay_plot.render(timeline, plot_format)
    try:
        path.write_bytes(image)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
