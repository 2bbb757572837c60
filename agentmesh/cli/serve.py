"""``agentmesh serve projector|sidecar|api|injector``: the long-lived processes.

Each process's modules (Litestar and uvicorn, the sidecar, the injector,
asyncpg: up to a second of imports) are imported inside its handler, so a
process, and every other command, loads only what it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Any

from agentmesh.cli.common import CliError, positive_int, run
from agentmesh.cli.projections import shared_backend
from agentmesh.logs import configure_logging
from agentmesh.settings import Settings
from ledger.identity import SigningKey
from ledger.timefmt import utc_now


def register(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run a long-lived process")
    sub = serve.add_subparsers(required=True, metavar="PROCESS")
    projector_ = sub.add_parser("projector", help="tail the ledger into the read store")
    projector_.set_defaults(handler=projector)
    sidecar_ = sub.add_parser("sidecar", help="the enforcing proxy beside an agent on :8081")
    sidecar_.set_defaults(handler=sidecar)
    api_ = sub.add_parser("api", help="the trust API on :8080, metrics on :9090")
    api_.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="worker processes (default AGENTMESH_API_WORKERS)",
    )
    api_.set_defaults(handler=api)
    _register_injector(sub)


def projector(_: argparse.Namespace, settings: Settings) -> int:
    from agentmesh.services import run_projector  # lazy: module docstring

    shared_backend(settings, None)
    return run(run_projector(settings))


def sidecar(_: argparse.Namespace, settings: Settings) -> int:
    from agentmesh.services import stop_on_signals  # lazy: module docstring
    from agentmesh.sidecar_main import run_sidecar

    configure_logging(settings)
    settings.require_api_url()
    settings.signing_key()

    async def proxy() -> int:
        await run_sidecar(settings, stop_on_signals())
        return 0

    # The sidecar is one hop in every agent call: uvloop's event loop takes a third
    # off the relay's added latency and the CPU of a denial (bench/sidecar.py).
    import uvloop  # lazy: only the sidecar runs on it

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(proxy())


def api(args: argparse.Namespace, settings: Settings) -> int:
    from agentmesh.services import serve_api  # lazy: module docstring

    if args.workers is not None:
        settings = dataclasses.replace(settings, api_workers=args.workers)
    url = settings.require_database_url()
    asyncio.run(_check_ledger_key(url, settings.signing_key()))
    return serve_api(settings)


async def _check_ledger_key(url: str, key: SigningKey) -> None:
    """Refuse, in one line, to serve a ledger with another key than its own."""
    from ledger.postgres import PostgresLedgerReader  # lazy: module docstring
    from ledger.postgres.identity import claim_identity

    reader = await PostgresLedgerReader.connect(url, pool_size=1)
    try:
        await claim_identity(reader.pool, key, utc_now())
    finally:
        await reader.close()


def _register_injector(sub: Any) -> None:
    env = os.environ.get
    injector_ = sub.add_parser(
        "injector", help="the sidecar-injecting admission webhook on :8443 (HTTPS)"
    )
    injector_.add_argument(
        "--config",
        type=Path,
        default=env("AGENTMESH_INJECTOR_CONFIG"),
        help="YAML of what to inject (default AGENTMESH_INJECTOR_CONFIG, else built-in)",
    )
    injector_.add_argument(
        "--tls-cert",
        type=Path,
        default=env("AGENTMESH_INJECTOR_TLS_CERT", "/etc/agentmesh-injector/tls/tls.crt"),
        help="PEM certificate (default AGENTMESH_INJECTOR_TLS_CERT)",
    )
    injector_.add_argument(
        "--tls-key",
        type=Path,
        default=env("AGENTMESH_INJECTOR_TLS_KEY", "/etc/agentmesh-injector/tls/tls.key"),
        help="PEM private key (default AGENTMESH_INJECTOR_TLS_KEY)",
    )
    injector_.add_argument("--host", default=env("AGENTMESH_INJECTOR_HOST", "0.0.0.0"))  # noqa: S104
    injector_.add_argument(
        "--port", type=positive_int, default=env("AGENTMESH_INJECTOR_PORT", "8443")
    )
    injector_.add_argument(
        "--metrics-port", type=positive_int, default=env("AGENTMESH_INJECTOR_METRICS_PORT", "9093")
    )
    injector_.set_defaults(handler=injector)


def injector(args: argparse.Namespace, settings: Settings) -> int:
    from agentmesh.injector import serve  # lazy: module docstring

    configure_logging(settings)
    try:
        return serve(
            args.config, args.tls_cert, args.tls_key, args.host, args.port, args.metrics_port
        )
    except (OSError, ValueError) as exc:
        raise CliError(f"injector: {exc}") from None
