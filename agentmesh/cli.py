"""The ``agentmesh`` command line.

Every failure is one line on stderr (``agentmesh: error: …``) and a non-zero
exit: 1 for a failed operation (including a failed verification), 2 for bad
usage. Private keys are only ever written where the user asked for them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

from agentmesh.settings import ConfigError, Settings
from ledger.errors import LedgerError, SignatureError
from ledger.identity import SigningKey, VerifyKey

Handler = Callable[[argparse.Namespace, Settings], int]


class CliError(Exception):
    """A failure to report as one line and exit 1."""


def main(argv: Sequence[str] | None = None) -> NoReturn:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        code = args.handler(args, settings)
    except (CliError, ConfigError, LedgerError) as exc:
        print(f"agentmesh: error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentmesh", description="AgentMesh trust ledger for AI-agent fleets."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    _identity_commands(commands)
    _db_commands(commands)
    _ledger_commands(commands)
    _projection_commands(commands)
    _retention_commands(commands)
    up = commands.add_parser("up", help="run the local stack (embedded PostgreSQL)")
    up.set_defaults(handler=_cmd_up)
    return parser


def _identity_commands(commands: Any) -> None:
    identity = commands.add_parser("identity", help="Ed25519 agent identities")
    sub = identity.add_subparsers(required=True, metavar="ACTION")
    gen = sub.add_parser("generate", help="generate a key pair")
    where = gen.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--output-key", action="store_true", help="print only the PEM private key on stdout"
    )
    where.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="write the PEM private key to FILE (mode 0600) and print the DID",
    )
    gen.set_defaults(handler=_cmd_identity_generate)
    show = sub.add_parser("show", help="print the DID and public key of a private key")
    show.add_argument(
        "key_file",
        nargs="?",
        metavar="FILE",
        help="PEM private key file, or - for stdin "
        "(default: AGENTMESH_AGENT_PRIVATE_KEY, else stdin)",
    )
    show.set_defaults(handler=_cmd_identity_show)


def _db_commands(commands: Any) -> None:
    db = commands.add_parser("db", help="database schema")
    sub = db.add_subparsers(required=True, metavar="ACTION")
    upgrade = sub.add_parser("upgrade", help="apply migrations (idempotent)")
    upgrade.set_defaults(handler=_cmd_db_upgrade)


def _ledger_commands(commands: Any) -> None:
    ledger = commands.add_parser("ledger", help="the event ledger")
    sub = ledger.add_subparsers(required=True, metavar="ACTION")
    verify = sub.add_parser("verify", help="verify chain, signatures and checkpoints")
    verify.add_argument(
        "--from",
        dest="from_position",
        type=_positive_int,
        default=1,
        metavar="POSITION",
        help="start at this position (default 1)",
    )
    verify.add_argument(
        "--ledger-public-key",
        type=Path,
        metavar="FILE",
        help="PEM public key of the ledger (default: from AGENTMESH_AGENT_PRIVATE_KEY)",
    )
    verify.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="signature-checking processes (default: one per core)",
    )
    verify.set_defaults(handler=_cmd_ledger_verify)
    checkpoint = sub.add_parser("checkpoint", help="sign a checkpoint of the head now")
    checkpoint.set_defaults(handler=_cmd_ledger_checkpoint)
    head = sub.add_parser("head", help="print the head position and hash")
    head.set_defaults(handler=_cmd_ledger_head)


def _projection_commands(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run a long-lived process")
    sub = serve.add_subparsers(required=True, metavar="PROCESS")
    projector = sub.add_parser("projector", help="tail the ledger into the read store")
    projector.set_defaults(handler=_cmd_serve_projector)
    api = sub.add_parser("api", help="the trust API on :8080, metrics on :9090")
    api.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="worker processes (default AGENTMESH_API_WORKERS)",
    )
    api.set_defaults(handler=_cmd_serve_api)
    projections = commands.add_parser("projections", help="the read-side projections")
    sub = projections.add_subparsers(required=True, metavar="ACTION")
    rebuild = sub.add_parser("rebuild", help="rebuild from the ledger, swapped in when complete")
    rebuild.add_argument(
        "--backend",
        choices=["redis", "postgres"],
        help="read store to rebuild (default AGENTMESH_STORAGE_BACKEND)",
    )
    rebuild.set_defaults(handler=_cmd_projections_rebuild)
    status = sub.add_parser("status", help="print position, head and lag")
    status.add_argument(
        "--backend",
        choices=["redis", "postgres"],
        help="read store to inspect (default AGENTMESH_STORAGE_BACKEND)",
    )
    status.set_defaults(handler=_cmd_projections_status)


def _retention_commands(commands: Any) -> None:
    retention = commands.add_parser("retention", help="the audit window")
    sub = retention.add_subparsers(required=True, metavar="ACTION")
    run = sub.add_parser(
        "run", help="remove events older than AGENTMESH_GOVERNANCE_AUDIT_RETENTION_DAYS"
    )
    run.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    run.set_defaults(handler=_cmd_retention_run)


def _cmd_retention_run(args: argparse.Namespace, settings: Settings) -> int:
    from agentmesh.retention_job import run_retention

    print(_run_text(run_retention(settings, dry_run=args.dry_run)))
    return 0


def _run_text(coroutine: Coroutine[Any, Any, str]) -> str:
    return asyncio.run(coroutine)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _run(coroutine: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coroutine)


# -- identity -----------------------------------------------------------------


def _cmd_identity_generate(args: argparse.Namespace, _: Settings) -> int:
    key = SigningKey.generate()
    if args.output_key:
        sys.stdout.write(key.private_key_pem())
        return 0
    path: Path = args.out
    try:
        # O_EXCL: never overwrite an existing key; 0600 from the first byte.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CliError(f"{path} already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as handle:
        handle.write(key.private_key_pem())
    _print_json({"did": key.did, "public_key": key.public.pem(), "key_file": str(path)})
    return 0


def _cmd_identity_show(args: argparse.Namespace, settings: Settings) -> int:
    pem = _read_private_key(args.key_file, settings)
    try:
        key = SigningKey.from_pem(pem)
    except SignatureError as exc:
        raise CliError(str(exc)) from None
    _print_json({"did": key.did, "public_key": key.public.pem()})
    return 0


def _read_private_key(source: str | None, settings: Settings) -> str:
    if source == "-" or (source is None and settings.agent_private_key_pem is None):
        if source is None and sys.stdin.isatty():
            raise CliError(
                "no key: pass a FILE, pipe one on stdin or set AGENTMESH_AGENT_PRIVATE_KEY"
            )
        return sys.stdin.read()
    if source is None:
        assert settings.agent_private_key_pem is not None
        return settings.agent_private_key_pem
    try:
        return Path(source).read_text()
    except OSError as exc:
        raise CliError(f"cannot read {source}: {exc.strerror}") from None


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


# -- db -----------------------------------------------------------------------


def _cmd_db_upgrade(_: argparse.Namespace, settings: Settings) -> int:
    from agentmesh.migrate import head_revision, upgrade

    url = settings.require_database_url()
    try:
        upgrade(url)
    except Exception as exc:  # alembic and drivers raise many types; report one line
        raise CliError(f"migration failed: {_one_line(exc)}") from None
    print(f"database at revision {head_revision()}")
    return 0


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# -- ledger -------------------------------------------------------------------


def _ledger_public_key(args: argparse.Namespace, settings: Settings) -> VerifyKey:
    if getattr(args, "ledger_public_key", None) is not None:
        try:
            return VerifyKey.from_pem(args.ledger_public_key.read_bytes())
        except OSError as exc:
            raise CliError(f"cannot read {args.ledger_public_key}: {exc.strerror}") from None
        except SignatureError as exc:
            raise CliError(f"{args.ledger_public_key}: {exc}") from None
    return settings.signing_key().public


def _cmd_ledger_verify(args: argparse.Namespace, settings: Settings) -> int:
    from ledger.store import PostgresLedgerReader
    from ledger.verify import make_executor, verify_ledger

    key = _ledger_public_key(args, settings)
    url = settings.require_database_url()

    async def run() -> int:
        reader = await PostgresLedgerReader.connect(url)
        executor = make_executor(args.workers)
        try:
            head = await reader.head()
            bar = ProgressBar("verify", head.position)
            report = await verify_ledger(
                reader,
                key,
                from_position=args.from_position,
                executor=executor,
                progress=bar.update,
            )
            bar.done()
        finally:
            executor.shutdown(cancel_futures=True)
            await reader.close()
        print(report.summary())
        return 0

    return _run(run())


def _cmd_ledger_checkpoint(_: argparse.Namespace, settings: Settings) -> int:
    from ledger.store import PostgresEventStore

    async def run() -> int:
        store = await PostgresEventStore.open(
            settings.require_database_url(), settings.signing_key()
        )
        try:
            checkpoint = await store.checkpoint()
        finally:
            await store.close()
        _print_json(
            {
                "origin": checkpoint.origin,
                "position": checkpoint.position,
                "head_hash": checkpoint.head_hash,
                "time": checkpoint.time,
                "signer": checkpoint.signer,
                "signature": checkpoint.signature,
            }
        )
        return 0

    return _run(run())


def _cmd_ledger_head(_: argparse.Namespace, settings: Settings) -> int:
    from ledger.store import PostgresLedgerReader
    from ledger.timefmt import format_time

    async def run() -> int:
        reader = await PostgresLedgerReader.connect(settings.require_database_url())
        try:
            head = await reader.head()
        finally:
            await reader.close()
        _print_json(
            {
                "position": head.position,
                "entry_hash": head.entry_hash.hex(),
                "recorded_at": format_time(head.recorded_at),
            }
        )
        return 0

    return _run(run())


# -- projections --------------------------------------------------------------


def _shared_backend(settings: Settings, backend: str | None) -> str:
    chosen = backend or settings.storage_backend
    if chosen == "memory":
        raise CliError(
            "the memory read store lives inside one process (the API's); use --backend "
            "redis or postgres"
        )
    return chosen


def _cmd_serve_projector(_: argparse.Namespace, settings: Settings) -> int:
    from agentmesh.services import run_projector

    _shared_backend(settings, None)
    return _run(run_projector(settings))


def _cmd_serve_api(args: argparse.Namespace, settings: Settings) -> int:
    import dataclasses

    from agentmesh.services import serve_api

    if args.workers is not None:
        settings = dataclasses.replace(settings, api_workers=args.workers)
    settings.require_database_url()
    settings.signing_key()
    return serve_api(settings)


def _cmd_projections_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from agentmesh.wiring import open_projection_store, trust_config
    from ledger.store import PostgresLedgerReader
    from projections.projector import Projector

    backend = _shared_backend(settings, args.backend)

    async def run() -> int:
        reader = await PostgresLedgerReader.connect(settings.require_database_url())
        store = await open_projection_store(settings, backend)  # type: ignore[arg-type]
        try:
            head = await reader.head()
            bar = ProgressBar("rebuild", head.position)
            projector = Projector(reader, store, trust_config(settings))
            progress = await projector.rebuild(progress=bar.update)
            bar.done()
        finally:
            await store.close()
            await reader.close()
        print(
            f"rebuilt {backend} read store: position {progress.state.position}, "
            f"{len(progress.state.agents)} agents, "
            f"{len(progress.state.delegations.grants)} grants"
        )
        return 0

    return _run(run())


def _cmd_projections_status(args: argparse.Namespace, settings: Settings) -> int:
    from agentmesh.wiring import open_projection_store, trust_config
    from ledger.store import PostgresLedgerReader
    from projections.readstore import ProjectionReader

    backend = _shared_backend(settings, args.backend)

    async def run() -> int:
        reader = await PostgresLedgerReader.connect(settings.require_database_url())
        store = await open_projection_store(settings, backend)  # type: ignore[arg-type]
        try:
            head = await reader.head()
            status = await ProjectionReader(store, trust_config(settings)).status(head.position)
        finally:
            await store.close()
            await reader.close()
        _print_json(
            {
                "backend": status.backend,
                "position": status.position,
                "head": status.head,
                "lag": status.lag,
                "updated_at": status.updated_at,
            }
        )
        return 0

    return _run(run())


# -- local stack --------------------------------------------------------------


def _cmd_up(_: argparse.Namespace, settings: Settings) -> int:
    from agentmesh.local import run_local_stack

    return run_local_stack(settings)


class ProgressBar:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = max(total, 1)
        self.enabled = sys.stderr.isatty()

    def update(self, current: int) -> None:
        if not self.enabled:
            return
        fraction = min(current / self.total, 1.0)
        filled = int(fraction * 30)
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {current}/{self.total}"
        )
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 70 + "\r")
            sys.stderr.flush()
