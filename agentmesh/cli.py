"""The ``agentmesh`` command line.

Every failure is one line on stderr (``agentmesh: error: …``) and a non-zero
exit: 1 for a failed operation (including a failed verification), 2 for bad
usage. Private keys are only ever written where the user asked for them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import msgspec

from agentmesh.settings import ConfigError, Settings
from ledger.errors import LedgerError, SignatureError
from ledger.identity import SigningKey, VerifyKey
from ledger.timefmt import utc_now

if TYPE_CHECKING:  # names for the replay commands' annotations; imported where used
    from datetime import datetime

    from matplotlib.axes import Axes

    from ledger.postgres import PostgresLedgerReader
    from projections.config import TrustConfig
    from projections.replay import MeshAt, MeshDiff, Replay, ReplaySource, Timeline

Handler = Callable[[argparse.Namespace, Settings], int]


class CliError(Exception):
    """A failure to report as one line and exit 1."""


def main(argv: Sequence[str] | None = None) -> NoReturn:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        if getattr(args, "local_stack", None) is not None:
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
    _identity_commands(commands)
    _db_commands(commands)
    _ledger_commands(commands)
    _projection_commands(commands)
    _retention_commands(commands)
    _replay_commands(commands)
    _audit_commands(commands)
    _witness_command(commands)
    up = commands.add_parser("up", help="run the local stack (what make run runs)")
    up.set_defaults(handler=_cmd_up)
    demo = commands.add_parser(
        "demo",
        help="against a running `agentmesh up`: a call allowed, then blocked after a violation",
    )
    demo.set_defaults(handler=_cmd_demo)
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
    upgrade.set_defaults(handler=_cmd_db_upgrade, local_stack="read")


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
        help="PEM public key of the ledger (default: AGENTMESH_AGENT_PRIVATE_KEY's, else "
        "the local stack's .agentmesh/ledger.pub.pem)",
    )
    verify.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="signature-checking processes (default: one per core)",
    )
    verify.add_argument(
        "--trusted-checkpoint",
        type=Path,
        metavar="FILE",
        help="a checkpoint seen before (its C2SP note, e.g. saved from GET /v1/ledger/checkpoint "
        "or a witness's state file): fail unless the ledger still contains it",
    )
    verify.set_defaults(handler=_cmd_ledger_verify, local_stack="read")
    prove = sub.add_parser("prove", help="RFC 9162 inclusion and consistency proofs")
    proofs = prove.add_subparsers(required=True, metavar="PROOF")
    inclusion = proofs.add_parser("inclusion", help="the audit path of one entry")
    inclusion.add_argument("position", type=_positive_int)
    inclusion.add_argument(
        "--tree-size", type=_positive_int, default=None, help="default: the head"
    )
    inclusion.set_defaults(handler=_cmd_ledger_prove, local_stack="read")
    consistency = proofs.add_parser("consistency", help="a tree is a prefix of a later one")
    consistency.add_argument("first", type=_positive_int)
    consistency.add_argument(
        "second", type=_positive_int, nargs="?", default=None, help="default: the head"
    )
    consistency.set_defaults(handler=_cmd_ledger_prove, local_stack="read")
    vkey = sub.add_parser("vkey", help="the note verifier key witnesses pin")
    vkey.add_argument("--ledger-public-key", type=Path, metavar="FILE")
    vkey.set_defaults(handler=_cmd_ledger_vkey, local_stack="read")
    checkpoint = sub.add_parser("checkpoint", help="sign a checkpoint of the head now")
    checkpoint.add_argument(
        "--note", action="store_true", help="print it as a C2SP signed note (what witnesses read)"
    )
    checkpoint.set_defaults(handler=_cmd_ledger_checkpoint, local_stack="sign")
    head = sub.add_parser("head", help="print the head position and hash")
    head.set_defaults(handler=_cmd_ledger_head, local_stack="read")


def _projection_commands(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run a long-lived process")
    sub = serve.add_subparsers(required=True, metavar="PROCESS")
    projector = sub.add_parser("projector", help="tail the ledger into the read store")
    projector.set_defaults(handler=_cmd_serve_projector)
    sidecar = sub.add_parser("sidecar", help="the enforcing proxy beside an agent on :8081")
    sidecar.set_defaults(handler=_cmd_serve_sidecar)
    api = sub.add_parser("api", help="the trust API on :8080, metrics on :9090")
    api.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="worker processes (default AGENTMESH_API_WORKERS)",
    )
    api.set_defaults(handler=_cmd_serve_api)
    _injector_command(sub)
    projections = commands.add_parser("projections", help="the read-side projections")
    sub = projections.add_subparsers(required=True, metavar="ACTION")
    rebuild = sub.add_parser("rebuild", help="rebuild from the ledger, swapped in when complete")
    rebuild.add_argument(
        "--backend",
        choices=["redis", "postgres"],
        help="read store to rebuild (default AGENTMESH_STORAGE_BACKEND)",
    )
    rebuild.set_defaults(handler=_cmd_projections_rebuild, local_stack="read")
    status = sub.add_parser("status", help="print position, head and lag")
    status.add_argument(
        "--backend",
        choices=["redis", "postgres"],
        help="read store to inspect (default AGENTMESH_STORAGE_BACKEND)",
    )
    status.set_defaults(handler=_cmd_projections_status, local_stack="read")


def _retention_commands(commands: Any) -> None:
    retention = commands.add_parser("retention", help="the audit window")
    sub = retention.add_subparsers(required=True, metavar="ACTION")
    run = sub.add_parser(
        "run", help="remove events older than AGENTMESH_GOVERNANCE_AUDIT_RETENTION_DAYS"
    )
    run.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    run.set_defaults(handler=_cmd_retention_run, local_stack="sign")


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
    if settings.agent_private_key_pem is not None or settings.agent_private_key_file is not None:
        return settings.signing_key().public
    from agentmesh.local import PUBLIC_KEY_FILE

    recorded = settings.data_dir / PUBLIC_KEY_FILE
    if recorded.exists():  # written by `agentmesh up`: verification needs no private key
        return VerifyKey.from_pem(recorded.read_bytes())
    raise CliError(
        "no ledger public key: pass --ledger-public-key FILE (the ledger_public_key of "
        "GET /v1/ledger/checkpoints/latest), or run next to `agentmesh up`"
    )


def _cmd_ledger_verify(args: argparse.Namespace, settings: Settings) -> int:
    from ledger.postgres import PostgresLedgerReader
    from ledger.verify import make_executor, verify_ledger

    key = _ledger_public_key(args, settings)
    url = settings.require_database_url()
    trusted = None if args.trusted_checkpoint is None else _read_note(args.trusted_checkpoint)

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
                trusted=trusted,
            )
            bar.done()
        finally:
            executor.shutdown(cancel_futures=True)
            await reader.close()
        print(report.summary())
        return 0

    return _run(run())


def _read_note(path: Path) -> str:
    """A checkpoint's C2SP note: the file itself, or the ``checkpoint`` of a witness's
    JSON state file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {path}: {exc}") from None
    if text.lstrip().startswith("{"):
        try:
            state = json.loads(text)
        except ValueError as exc:
            raise CliError(f"{path}: not a note nor a witness state file: {exc}") from None
        note = state.get("checkpoint") if isinstance(state, dict) else None
        if not isinstance(note, str):
            raise CliError(f"{path}: a witness state file holds its note under 'checkpoint'")
        return note
    return text


def _cmd_ledger_prove(args: argparse.Namespace, settings: Settings) -> int:
    from ledger.identity import b64encode
    from ledger.postgres import PostgresLedgerReader

    async def run() -> int:
        reader = await PostgresLedgerReader.connect(settings.require_database_url(), 2)
        try:
            size = (await reader.head()).position
            if hasattr(args, "position"):
                tree_size = args.tree_size or size
                hashes = await reader.inclusion_proof(args.position, tree_size)
                found = {"position": args.position, "tree_size": tree_size}
            else:
                second = args.second or size
                hashes = await reader.consistency_proof(args.first, second)
                found = {"first": args.first, "second": second}
        finally:
            await reader.close()
        _print_json({**found, "hashes": [b64encode(h) for h in hashes]})
        return 0

    return _run(run())


def _cmd_ledger_vkey(args: argparse.Namespace, settings: Settings) -> int:
    from ledger import tlog

    print(tlog.verifier(_ledger_public_key(args, settings)).vkey())
    return 0


def _cmd_ledger_checkpoint(args: argparse.Namespace, settings: Settings) -> int:
    from ledger.postgres import PostgresEventStore

    async def run() -> int:
        store = await PostgresEventStore.open(
            settings.require_database_url(), settings.signing_key()
        )
        try:
            checkpoint = await store.checkpoint()
            note = await store.latest_tree_head()
        finally:
            await store.close()
        if args.note and note is not None:
            print(note, end="")
        else:
            _print_json(msgspec.to_builtins(checkpoint))
        return 0

    return _run(run())


def _cmd_ledger_head(_: argparse.Namespace, settings: Settings) -> int:
    from ledger.postgres import PostgresLedgerReader
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


def _cmd_serve_sidecar(_: argparse.Namespace, settings: Settings) -> int:
    from agentmesh.logs import configure_logging
    from agentmesh.services import stop_on_signals
    from agentmesh.sidecar_main import run_sidecar

    configure_logging(settings)
    settings.require_api_url()
    settings.signing_key()

    async def run() -> int:
        await run_sidecar(settings, stop_on_signals())
        return 0

    return _run(run())


def _cmd_serve_api(args: argparse.Namespace, settings: Settings) -> int:

    from agentmesh.services import serve_api

    if args.workers is not None:
        settings = dataclasses.replace(settings, api_workers=args.workers)
    url = settings.require_database_url()
    asyncio.run(_check_ledger_key(url, settings.signing_key()))
    return serve_api(settings)


async def _check_ledger_key(url: str, key: SigningKey) -> None:
    """Refuse, in one line, to serve a ledger with another key than its own."""
    from ledger.postgres import PostgresLedgerReader
    from ledger.postgres.store import claim_identity

    reader = await PostgresLedgerReader.connect(url, pool_size=1)
    try:
        await claim_identity(reader.pool, key, utc_now())
    finally:
        await reader.close()


def _injector_command(sub: Any) -> None:
    env = os.environ.get
    injector = sub.add_parser(
        "injector", help="the sidecar-injecting admission webhook on :8443 (HTTPS)"
    )
    injector.add_argument(
        "--config",
        type=Path,
        default=env("AGENTMESH_INJECTOR_CONFIG"),
        help="YAML of what to inject (default AGENTMESH_INJECTOR_CONFIG, else built-in)",
    )
    injector.add_argument(
        "--tls-cert",
        type=Path,
        default=env("AGENTMESH_INJECTOR_TLS_CERT", "/etc/agentmesh-injector/tls/tls.crt"),
        help="PEM certificate (default AGENTMESH_INJECTOR_TLS_CERT)",
    )
    injector.add_argument(
        "--tls-key",
        type=Path,
        default=env("AGENTMESH_INJECTOR_TLS_KEY", "/etc/agentmesh-injector/tls/tls.key"),
        help="PEM private key (default AGENTMESH_INJECTOR_TLS_KEY)",
    )
    injector.add_argument("--host", default=env("AGENTMESH_INJECTOR_HOST", "0.0.0.0"))  # noqa: S104
    injector.add_argument(
        "--port", type=_positive_int, default=env("AGENTMESH_INJECTOR_PORT", "8443")
    )
    injector.add_argument(
        "--metrics-port", type=_positive_int, default=env("AGENTMESH_INJECTOR_METRICS_PORT", "9093")
    )
    injector.set_defaults(handler=_cmd_serve_injector)


def _cmd_serve_injector(args: argparse.Namespace, settings: Settings) -> int:
    from agentmesh.injector import serve
    from agentmesh.logs import configure_logging

    configure_logging(settings)
    try:
        return serve(
            args.config, args.tls_cert, args.tls_key, args.host, args.port, args.metrics_port
        )
    except (OSError, ValueError) as exc:
        raise CliError(f"injector: {exc}") from None


@contextlib.asynccontextmanager
async def _ledger_and_store(settings: Settings, backend: str) -> AsyncIterator[tuple[Any, Any]]:
    """The ledger reader and the chosen read store, closed on the way out."""
    from agentmesh.wiring import open_projection_store
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


def _cmd_projections_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from agentmesh.wiring import trust_config
    from projections.projector import Projector

    backend = _shared_backend(settings, args.backend)

    async def run() -> int:
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

    return _run(run())


def _cmd_projections_status(args: argparse.Namespace, settings: Settings) -> int:
    from agentmesh.wiring import trust_config
    from projections.readstore import ProjectionReader

    backend = _shared_backend(settings, args.backend)

    async def run() -> int:
        async with _ledger_and_store(settings, backend) as (reader, store):
            head = await reader.head()
            status = await ProjectionReader(store, trust_config(settings)).status(head.position)
        _print_json(dataclasses.asdict(status))
        return 0

    return _run(run())


# -- replay -------------------------------------------------------------------


def _replay_commands(commands: Any) -> None:
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
    agent = sub.add_parser("agent", parents=[common], help="an agent's trust timeline")
    agent.add_argument("did", metavar="DID")
    agent.add_argument(
        "--from", dest="start", type=_replay_time, metavar="TIME", help="first moment (RFC 3339)"
    )
    agent.add_argument(
        "--to", dest="end", type=_replay_time, metavar="TIME", help="last moment (RFC 3339)"
    )
    agent.add_argument(
        "--plot", type=Path, metavar="FILE", help="also draw the score over time (.png or .svg)"
    )
    agent.set_defaults(handler=_cmd_replay_agent, local_stack="read")
    state = sub.add_parser("state", parents=[common], help="the mesh as it was at a moment")
    state.add_argument("--at", required=True, type=_replay_time, metavar="TIME")
    state.add_argument(
        "--lowest", type=_positive_int, default=10, help="lowest-trust agents to list (10)"
    )
    state.set_defaults(handler=_cmd_replay_state, local_stack="read")
    diff = sub.add_parser("diff", parents=[common], help="what changed between two moments")
    diff.add_argument("--from", dest="start", required=True, type=_replay_time, metavar="TIME")
    diff.add_argument("--to", dest="end", required=True, type=_replay_time, metavar="TIME")
    diff.set_defaults(handler=_cmd_replay_diff, local_stack="read")


def _replay_time(text: str) -> datetime:
    from ledger.timefmt import parse_time

    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_replay_agent(args: argparse.Namespace, settings: Settings) -> int:
    from projections.replay import AgentTimelineReplay

    plot_format = None if args.plot is None else _replay_plot_format(args.plot)
    timeline = _replay(
        args,
        settings,
        lambda source, config: AgentTimelineReplay(
            source, args.did, start=args.start, end=args.end, config=config
        ),
    )
    _replay_print(args, timeline)
    if plot_format is not None:
        _replay_plot(timeline, args.plot, plot_format)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0


def _cmd_replay_state(args: argparse.Namespace, settings: Settings) -> int:
    from projections.replay import StateReplay

    mesh = _replay(
        args,
        settings,
        lambda source, config: StateReplay(source, args.at, lowest=args.lowest, config=config),
    )
    _replay_print(args, mesh)
    return 0


def _cmd_replay_diff(args: argparse.Namespace, settings: Settings) -> int:
    from projections.replay import DiffReplay

    diff = _replay(
        args,
        settings,
        lambda source, config: DiffReplay(source, args.start, args.end, config=config),
    )
    _replay_print(args, diff)
    return 0


def _replay(
    args: argparse.Namespace,
    settings: Settings,
    build: Callable[[ReplaySource, TrustConfig], Replay[Any]],
) -> Any:
    """Run the replay ``build`` makes over the bundle or the live ledger; its errors
    become one-line CLI errors."""
    from agentmesh.wiring import trust_config
    from ledger.postgres import PostgresLedgerReader
    from projections.errors import ProjectionError

    config = trust_config(settings)

    async def run() -> Any:
        if args.bundle is not None:
            return await build(_replay_bundle_source(args.bundle), config).run_async()
        reader = await PostgresLedgerReader.connect(settings.require_database_url())
        bar = ProgressBar("replay", 1)
        try:
            source = await _replay_ledger_source(reader, config)
            bar.total = max((await reader.head()).position, 1)
            return await build(source, config).run_async(progress=bar.update)
        finally:
            bar.done()
            await reader.close()

    try:
        return asyncio.run(run())
    except ProjectionError as exc:
        raise CliError(str(exc)) from None


async def _replay_ledger_source(reader: PostgresLedgerReader, config: TrustConfig) -> ReplaySource:
    """The live ledger, streamed; after a retention cut, from the cut's snapshot on."""
    from ledger.retention import retention_window
    from projections.errors import SnapshotError
    from projections.replay import ReplaySource
    from projections.state import MeshState

    window = await retention_window(reader)
    if window is None:
        return ReplaySource(reader.iter_entries(batch=10_000))
    try:
        initial = MeshState.from_snapshot(window.snapshot, config)
    except SnapshotError as exc:
        raise CliError(
            f"the retention snapshot at position {window.position} cannot be used: {exc}; the "
            "events before it are gone, so replay needs the trust settings it was folded under"
        ) from None
    entries = reader.iter_entries(after=window.position, batch=10_000)
    return ReplaySource(entries, initial, window.cut_time)


def _replay_bundle_source(path: Path) -> ReplaySource:
    """An audit export bundle (``agentmesh audit export``): its key entries and events
    merged by position. Only a bundle from the ledger's first entry holds every
    event a score depends on; its exclusive ``to`` ends what it can answer."""
    from ledger.audit import read_bundle, verify_bundle
    from ledger.timefmt import parse_time
    from projections.replay import ReplaySource, merge_by_position

    try:
        # An incident review must not rest on a tampered bundle: verify it first.
        verify_bundle(path)
        bundle = read_bundle(path)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    if bundle.manifest is None:
        raise CliError(f"{path} has no manifest: the bundle is incomplete")
    first = bundle.manifest.first_position
    if first != 1:
        where = "no entries" if first is None else f"entries from position {first} on"
        raise CliError(
            f"{path} holds {where}: replay needs a bundle from the ledger's first entry "
            "(export it with a --from before the first event)"
        )
    events = list(merge_by_position(bundle.keys, bundle.events))
    return ReplaySource(
        events,
        window_end=parse_time(bundle.header.to),
        agent=bundle.header.agent,
        ledger_did=VerifyKey.from_pem(bundle.header.ledger_public_key).did,
    )


def _replay_print(args: argparse.Namespace, result: Timeline | MeshAt | MeshDiff) -> None:
    try:
        if args.json:
            _print_json(result.to_dict())
        else:
            print("\n".join(result.lines()))
        sys.stdout.flush()
    except BrokenPipeError:
        # Piped into `head`: the reader has what it wanted; no traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


_REPLAY_PLOT_FORMATS = {".png": "png", ".svg": "svg"}
# One colour and marker per event type, the same in every plot: harm in red and
# orange, good news in greens, status changes in black, the rest in blues.
REPLAY_EVENT_STYLES: dict[str, tuple[str, str]] = {
    "policy.violation": ("#d62728", "v"),
    "handshake.failed": ("#ff7f0e", "X"),
    "agent.suspended": ("#000000", "s"),
    "agent.reinstated": ("#2ca02c", "P"),
    "trust.signal": ("#1a9850", "^"),
    "handshake.completed": ("#66bd63", "o"),
    "agent.registered": ("#1f77b4", "D"),
    "agent.key_rotated": ("#17becf", "d"),
    "delegation.granted": ("#6a3d9a", ">"),
    "delegation.revoked": ("#cab2d6", "<"),
    "ledger.retention_applied": ("#7f7f7f", "|"),
}
_REPLAY_OTHER_STYLE = ("#8c564b", "h")
_REPLAY_TIER_COLORS = {
    "verified_partner": "#2e7d32",
    "trusted": "#7cb342",
    "standard": "#fdd835",
    "probationary": "#fb8c00",
    "untrusted": "#e53935",
}


def _replay_plot_format(path: Path) -> str:
    plot_format = _REPLAY_PLOT_FORMATS.get(path.suffix.lower())
    if plot_format is None:
        raise CliError(f"--plot {path}: unknown image format; name a .png or .svg file")
    return plot_format


def _replay_plot(timeline: Timeline, path: Path, plot_format: str) -> None:
    """The score over time with decay, tier bands shaded, events marked; drawn on
    matplotlib's Agg canvas (no display, no pyplot state), times in UTC."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install matplotlib") from None

    figure = Figure(figsize=(12, 5.5))
    FigureCanvasAgg(figure)
    # The date converter is chosen when dates first reach the axes.
    with matplotlib.rc_context({"date.converter": "concise"}):
        _replay_draw(figure.add_subplot(), timeline)
        try:
            figure.savefig(path, format=plot_format, bbox_inches="tight")
        except OSError as exc:
            raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None


def _replay_draw(axes: Axes, timeline: Timeline) -> None:
    import itertools

    import numpy

    from projections.replay import tier_bands

    def times(moments: Sequence[datetime]) -> Any:
        # Naive UTC datetime64: numpy warns about (and drops) time zones.
        return numpy.array([m.replace(tzinfo=None) for m in moments], dtype="datetime64[us]")

    from matplotlib.dates import AutoDateLocator, DateFormatter

    for low, high, tier in tier_bands(timeline.config):
        axes.axhspan(low, high, color=_REPLAY_TIER_COLORS[tier], alpha=0.16, linewidth=0)
        label_y = (low + high) / 2
        axes.text(1.005, label_y, tier, transform=axes.get_yaxis_transform(), va="center")
    series = timeline.series()
    axes.plot(
        times([t for t, _ in series]), [s for _, s in series], color="black", lw=1.2, label="score"
    )
    rows = timeline.rows
    suspended = False
    for row, following in itertools.pairwise(rows):
        if row.suspended:
            span = times([row.time, following.time])
            axes.fill_between(
                span, 0, 1000, color="grey", alpha=0.25, linewidth=0,
                label=None if suspended else "suspended",
            )  # fmt: skip
            suspended = True
    events = [row for row in rows if row.kind == "event"]
    axes.vlines(times([r.time for r in events]), 0, 1000, colors="grey", alpha=0.3, lw=0.5)
    # Hollow markers of distinct shapes, several events at one point drawn side by
    # side (a few points apart), so no marker hides another.
    seen: dict[tuple[datetime, int], int] = {}
    for kind in sorted({row.event or "" for row in events}, key=_replay_event_order):
        color, marker = REPLAY_EVENT_STYLES.get(kind, _REPLAY_OTHER_STYLE)
        marked = [row for row in events if row.event == kind]
        offsets = []
        for row in marked:
            spot = (row.time, row.score_after)
            offsets.append(seen.get(spot, 0))
            seen[spot] = offsets[-1] + 1
        axes.scatter(
            times([r.time for r in marked]),
            [r.score_after + 14 * k for r, k in zip(marked, offsets, strict=True)],
            s=46, zorder=3, marker=marker, facecolors="none", edgecolors=color,
            linewidths=1.6, label=f"{kind} ({len(marked)})",
        )  # fmt: skip
    crossings = [row for row in rows if row.kind == "decay"]
    if crossings:
        x, y = times([r.time for r in crossings]), [r.score_after for r in crossings]
        axes.scatter(x, y, s=30, zorder=3, marker="_", color="black", label="tier change (decay)")
    axes.set_ylim(0, 1000)
    axes.set_ylabel("trust score (points, 0 to 1000)")
    axes.set_xlabel("time (UTC)")
    span = (timeline.end - rows[0].time) if rows else None
    locator = AutoDateLocator(minticks=3, maxticks=8)  # type: ignore[no-untyped-call]
    axes.xaxis.set_major_locator(locator)
    formatter = DateFormatter(_replay_time_format(span))  # type: ignore[no-untyped-call]
    axes.xaxis.set_major_formatter(formatter)
    where = ", suspended periods shaded" if suspended else ""
    axes.set_title(f"trust score of {timeline.did} over time{where}")
    axes.legend(loc="upper left", bbox_to_anchor=(1.15, 1.0), fontsize="small")


def _replay_event_order(kind: str) -> tuple[int, str]:
    order = list(REPLAY_EVENT_STYLES)
    return (order.index(kind) if kind in order else len(order), kind)


def _replay_time_format(span: Any) -> str:
    """Tick labels that say what they are: seconds on short spans, dates on long."""
    from datetime import timedelta

    if span is None or span <= timedelta(minutes=10):
        return "%H:%M:%S"
    if span <= timedelta(days=2):
        return "%m-%d %H:%M"
    return "%Y-%m-%d"


# -- local stack --------------------------------------------------------------


def _cmd_demo(_: argparse.Namespace, settings: Settings) -> int:
    from agentmesh.local import run_demo

    return _run(run_demo(settings))


def _cmd_up(_: argparse.Namespace, settings: Settings) -> int:
    from agentmesh.local import StackError, run_local_stack

    try:
        return run_local_stack(settings)
    except StackError as exc:
        raise CliError(str(exc)) from None


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


# -- audit --------------------------------------------------------------------


def _audit_commands(commands: Any) -> None:
    audit = commands.add_parser("audit", help="audit bundles for compliance, verifiable offline")
    sub = audit.add_subparsers(required=True, metavar="ACTION")
    export = sub.add_parser("export", help="export a time range of the ledger as a signed bundle")
    export.add_argument(
        "--from",
        dest="start",
        required=True,
        type=_audit_time,
        metavar="T1",
        help="first moment, inclusive (RFC 3339)",
    )
    export.add_argument(
        "--to",
        dest="end",
        required=True,
        type=_audit_time,
        metavar="T2",
        help="end, exclusive (RFC 3339)",
    )
    export.add_argument(
        "--agent",
        type=_audit_did,
        metavar="DID",
        help="only events signed by or about this agent; the others become stubs",
    )
    export.add_argument(
        "--format",
        dest="fmt",
        choices=["jsonl", "cloudevents"],
        default="jsonl",
        help="JSON Lines (default) or one CloudEvents 1.0 event per line",
    )
    export.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        metavar="FILE",
        help="where to write the bundle (replaced only once it is complete)",
    )
    export.set_defaults(handler=_cmd_audit_export, local_stack="sign")
    verify = sub.add_parser("verify", help="verify a bundle offline (no database, no network)")
    verify.add_argument("bundle", type=Path, metavar="FILE")
    verify.add_argument(
        "--ledger-public-key",
        type=Path,
        metavar="FILE",
        help="PEM public key the bundle must be signed by (default: the one it names, "
        "whose DID is printed)",
    )
    verify.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="signature-checking processes (default: one per core)",
    )
    verify.set_defaults(handler=_cmd_audit_verify)


def _audit_time(text: str) -> Any:
    """An RFC 3339 time as an aware datetime (for argparse)."""
    from ledger.timefmt import parse_time

    try:
        return parse_time(text)
    except (ValueError, OverflowError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _audit_did(text: str) -> str:
    from ledger.identity import is_did

    if not is_did(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a DID like did:mesh:<32 hex>")
    return text


def _cmd_audit_export(args: argparse.Namespace, settings: Settings) -> int:
    from ledger.audit import Manifest, export_bundle
    from ledger.postgres import PostgresLedgerReader

    if not args.start < args.end:
        raise CliError("--from must be earlier than --to")
    url = settings.require_database_url()
    key = settings.signing_key()
    target: Path = args.output

    async def run() -> int:
        reader = await PostgresLedgerReader.connect(url)
        bar = ProgressBar("export", 1)

        def progress(done: int, total: int) -> None:
            bar.total = max(total, 1)
            bar.update(done)

        try:
            manifest: Manifest = await _audit_write_atomically(
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

    return _run(run())


async def _audit_write_atomically(
    target: Path, write: Callable[[Any], Coroutine[Any, Any, Any]]
) -> Any:
    """Run ``write(handle)`` on a temporary file beside ``target`` and rename it over
    ``target`` only on success, so a failed export never leaves a partial bundle."""
    import contextlib
    import tempfile

    try:
        fd, temporary = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".partial"
        )
    except OSError as exc:
        raise CliError(f"cannot write {target}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            result = await write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return result


def _cmd_audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    from ledger.audit import verify_bundle

    path: Path = args.bundle
    pinned = _ledger_public_key(args, settings) if args.ledger_public_key else None
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    bar = ProgressBar("verify", size)
    try:
        report = verify_bundle(path, workers=args.workers, ledger_key=pinned, progress=bar.update)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        bar.done()
    print(report.summary())
    return 0


# -- witness ------------------------------------------------------------------


def _witness_command(commands: Any) -> None:
    witness = commands.add_parser(
        "witness",
        help="follow a ledger's checkpoints, cosign consistent ones, alarm on fork or rollback",
        description="Exit 0 when stopped (or after --once), 1 when the operation failed "
        "(unreachable API, unreadable key or state), 3 on an alarm (rollback, fork, "
        "bad_signature, malformed): the old state is kept.",
    )
    witness.add_argument("--url", required=True, help="the API's base URL")
    pinned = witness.add_mutually_exclusive_group(required=True)
    pinned.add_argument("--vkey", metavar="VKEY", help="the ledger's note verifier key")
    pinned.add_argument("--vkey-file", type=Path, metavar="FILE", help="a file holding it")
    pinned.add_argument(
        "--vkey-url",
        metavar="URL",
        help="fetch it from URL (e.g. the API's /v1/ledger/vkey): trust on first use only",
    )
    witness.add_argument(
        "--state", type=Path, required=True, metavar="FILE", help="the witness's state file"
    )
    witness.add_argument(
        "--key", type=Path, required=True, metavar="PEM", help="the witness's Ed25519 private key"
    )
    witness.add_argument(
        "--name", help="the witness's key name (default agentmesh.witness/<its DID>)"
    )
    witness.add_argument(
        "--interval",
        type=_positive_float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between checks (default 5)",
    )
    witness.add_argument("--once", action="store_true", help="check once and exit")
    witness.add_argument(
        "--metrics-port",
        type=_port_or_zero,
        default=0,
        metavar="PORT",
        help="serve Prometheus metrics on PORT (default 0: none)",
    )
    witness.set_defaults(handler=_cmd_witness)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _port_or_zero(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0..65535, got {text!r}")
    return value


def _cmd_witness(args: argparse.Namespace, settings: Settings) -> int:
    from agentmesh import witness
    from agentmesh.logs import configure_logging
    from agentmesh.services import stop_on_signals
    from ledger.note import Ed25519Verifier, is_valid_key_name, parse_vkey

    configure_logging(settings)
    try:
        key = SigningKey.from_pem(args.key.read_bytes())
    except OSError as exc:
        raise CliError(f"cannot read {args.key}: {exc.strerror}") from None
    except SignatureError as exc:
        raise CliError(f"{args.key}: {exc}") from None
    name = args.name or witness.default_witness_name(key)
    if not is_valid_key_name(name):
        raise CliError(f"--name {name!r}: a key name is non-empty, without spaces or '+'")
    if args.vkey_file is not None:
        try:
            vkey = args.vkey_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CliError(f"cannot read {args.vkey_file}: {exc.strerror}") from None
    elif args.vkey_url is not None:
        try:
            vkey = asyncio.run(witness.fetch_vkey(args.vkey_url))
        except witness.WitnessError as exc:
            raise CliError(str(exc)) from None
        print(
            f"agentmesh: WARNING: trusting the ledger key {vkey} as served by {args.vkey_url} "
            "(trust on first use): whoever controls that server chooses the key this witness "
            "checks; pin it with --vkey or --vkey-file instead",
            file=sys.stderr,
        )
    else:
        vkey = args.vkey
    ledger = parse_vkey(vkey)
    if not isinstance(ledger, Ed25519Verifier):
        raise CliError("the ledger's verifier key must be an Ed25519 note key (type 0x01)")
    config = witness.WitnessConfig(
        url=args.url,
        ledger=ledger,
        state_path=args.state,
        key=key,
        name=name,
        interval=args.interval,
        once=args.once,
    )
    metrics = witness.WitnessMetrics()

    async def run() -> int:
        stop = None if args.once else stop_on_signals()
        close = None
        if args.metrics_port:
            try:
                close = witness.serve_metrics(metrics, args.metrics_port)
            except OSError as exc:
                raise CliError(f"metrics port {args.metrics_port}: {exc.strerror}") from None
        try:
            return await witness.run_witness(config, metrics, stop)
        except witness.WitnessError as exc:
            raise CliError(str(exc)) from None
        finally:
            if close is not None:
                close()

    return _run(run())
