"""``agentmesh identity generate|show``: Ed25519 agent identities."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from agentmesh.cli.common import CliError, print_json
from agentmesh.settings import Settings
from ledger.errors import SignatureError
from ledger.identity import SigningKey


def register(commands: Any) -> None:
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
    gen.set_defaults(handler=generate)
    show_ = sub.add_parser("show", help="print the DID and public key of a private key")
    show_.add_argument(
        "key_file",
        nargs="?",
        metavar="FILE",
        help="PEM private key file, or - for stdin "
        "(default: AGENTMESH_AGENT_PRIVATE_KEY, else stdin)",
    )
    show_.set_defaults(handler=show)


def generate(args: argparse.Namespace, _: Settings) -> int:
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
    print_json({"did": key.did, "public_key": key.public.pem(), "key_file": str(path)})
    return 0


def show(args: argparse.Namespace, settings: Settings) -> int:
    pem = _read_private_key(args.key_file, settings)
    try:
        key = SigningKey.from_pem(pem)
    except SignatureError as exc:
        raise CliError(str(exc)) from None
    print_json({"did": key.did, "public_key": key.public.pem()})
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
