"""``agentmesh audit export|verify``: audit bundles, verifiable offline.

``ledger.audit`` (~35 ms) and the PostgreSQL adapter (asyncpg, ~50 ms) are
imported inside the handlers, so other commands do not load them.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentmesh.cli.common import CliError, ProgressBar, positive_int, run, write_atomically
from agentmesh.cli.ledger import ledger_public_key, read_note
from agentmesh.settings import Settings
from ledger.identity import is_did
from ledger.timefmt import parse_time

if TYPE_CHECKING:
    from ledger.audit import Manifest


def register(commands: Any) -> None:
    audit = commands.add_parser("audit", help="audit bundles for compliance, verifiable offline")
    sub = audit.add_subparsers(required=True, metavar="ACTION")
    export_ = sub.add_parser("export", help="export a time range of the ledger as a signed bundle")
    export_.add_argument(
        "--from",
        dest="start",
        required=True,
        type=_time,
        metavar="T1",
        help="first moment, inclusive (RFC 3339)",
    )
    export_.add_argument(
        "--to",
        dest="end",
        required=True,
        type=_time,
        metavar="T2",
        help="end, exclusive (RFC 3339)",
    )
    export_.add_argument(
        "--agent",
        type=_did,
        metavar="DID",
        help="only events signed by or about this agent; the others become stubs",
    )
    export_.add_argument(
        "--format",
        dest="fmt",
        choices=["jsonl", "cloudevents"],
        default="jsonl",
        help="JSON Lines (default) or one CloudEvents 1.0 event per line",
    )
    export_.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        metavar="FILE",
        help="where to write the bundle (replaced only once it is complete)",
    )
    export_.set_defaults(handler=export, local_stack="sign")
    verify_ = sub.add_parser("verify", help="verify a bundle offline (no database, no network)")
    verify_.add_argument("bundle", type=Path, metavar="FILE")
    verify_.add_argument(
        "--ledger-public-key",
        type=Path,
        metavar="FILE",
        help="PEM public key the bundle must be signed by (default: the one it names, "
        "whose DID is printed)",
    )
    verify_.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="signature-checking processes (default: one per core)",
    )
    verify_.add_argument(
        "--trusted-checkpoint",
        type=Path,
        metavar="FILE",
        help="a checkpoint seen before (its C2SP note, or a witness's state file), of a "
        "size within the bundle's range: fail unless the bundle's tree contains it",
    )
    verify_.set_defaults(handler=verify)


def _time(text: str) -> datetime:
    """An RFC 3339 time as an aware datetime (for argparse)."""
    try:
        return parse_time(text)
    except (ValueError, OverflowError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _did(text: str) -> str:
    if not is_did(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a DID like did:mesh:<32 hex>")
    return text


def export(args: argparse.Namespace, settings: Settings) -> int:
    from ledger.audit import export_bundle  # lazy: module docstring
    from ledger.postgres import PostgresLedgerReader

    if not args.start < args.end:
        raise CliError("--from must be earlier than --to")
    url = settings.require_database_url()
    key = settings.signing_key()
    target: Path = args.output

    async def write_bundle() -> int:
        reader = await PostgresLedgerReader.connect(url)
        bar = ProgressBar("export", 1)

        def progress(done: int, total: int) -> None:
            bar.total = max(total, 1)
            bar.update(done)

        try:
            manifest: Manifest = await write_atomically(
                target,
                lambda handle: export_bundle(
                    reader,
                    key,
                    handle,
                    start=args.start,
                    end=args.end,
                    agent=args.agent,
                    fmt=args.fmt,
                    progress=progress,
                ),
            )
        except ValueError as exc:
            raise CliError(str(exc)) from None
        finally:
            bar.done()
            await reader.close()
        if manifest.first_position is None:
            print(f"exported no events from {manifest.from_} to {manifest.to} to {target}")
            return 0
        stubs = f" and {manifest.stubs} stubs" if manifest.agent is not None else ""
        print(
            f"exported {manifest.count} events{stubs} (positions {manifest.first_position}.."
            f"{manifest.last_position}), {manifest.keys} keys, checkpoint "
            f"{manifest.checkpoint_position} to {target}"
        )
        return 0

    return run(write_bundle())


def verify(args: argparse.Namespace, settings: Settings) -> int:
    from ledger.audit import verify_bundle  # lazy: module docstring

    path: Path = args.bundle
    pinned = ledger_public_key(args, settings) if args.ledger_public_key else None
    trusted = None if args.trusted_checkpoint is None else read_note(args.trusted_checkpoint)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    bar = ProgressBar("verify", size)
    try:
        report = verify_bundle(
            path,
            workers=args.workers,
            ledger_key=pinned,
            progress=bar.update,
            trusted=trusted,
        )
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        bar.done()
    print(report.summary())
    return 0
