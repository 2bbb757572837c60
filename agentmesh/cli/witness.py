"""``agentmesh witness``: follow a ledger's checkpoints, cosign, alarm.

``agentmesh.witness`` (httpx and the metrics server, ~100 ms) is imported
inside the handler, so other commands do not load it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from agentmesh.cli.common import CliError, port_or_zero, positive_float, run
from agentmesh.logs import configure_logging
from agentmesh.settings import Settings
from ledger.errors import SignatureError
from ledger.identity import SigningKey
from ledger.note import Ed25519Verifier, is_valid_key_name, parse_vkey


def register(commands: Any) -> None:
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
        type=positive_float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between checks (default 5)",
    )
    witness.add_argument("--once", action="store_true", help="check once and exit")
    witness.add_argument(
        "--metrics-port",
        type=port_or_zero,
        default=0,
        metavar="PORT",
        help="serve Prometheus metrics on PORT (default 0: none)",
    )
    witness.set_defaults(handler=follow)


def follow(args: argparse.Namespace, settings: Settings) -> int:
    from agentmesh import witness  # lazy: module docstring
    from agentmesh.services import stop_on_signals

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

    async def loop() -> int:
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

    return run(loop())
