"""``agentmesh ledger verify|prove|vkey|checkpoint|head|rotate-key``: the event ledger.

The PostgreSQL adapter (and with it asyncpg, ~50 ms) is imported inside the
handlers: ``agentmesh`` loads every command group to build its parser, and
commands that never reach the database should not pay for the driver.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import msgspec

from agentmesh.cli.common import CliError, ProgressBar, positive_int, print_json, run
from agentmesh.settings import Settings
from ledger import tlog
from ledger.errors import SignatureError
from ledger.events import LedgerKeyRotated, stamp
from ledger.identity import SigningKey, VerifyKey, b64encode
from ledger.signed import SignedEvent
from ledger.timefmt import format_time, utc_now


def register(commands: Any) -> None:
    ledger = commands.add_parser("ledger", help="the event ledger")
    sub = ledger.add_subparsers(required=True, metavar="ACTION")
    verify_ = sub.add_parser("verify", help="verify chain, signatures and checkpoints")
    verify_.add_argument(
        "--from",
        dest="from_position",
        type=positive_int,
        default=1,
        metavar="POSITION",
        help="start at this position (default 1)",
    )
    verify_.add_argument(
        "--ledger-public-key",
        type=Path,
        metavar="FILE",
        help="PEM public key of the ledger (default: AGENTMESH_AGENT_PRIVATE_KEY's, else "
        "the local stack's .agentmesh/ledger.pub.pem)",
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
        help="a checkpoint seen before (its C2SP note, e.g. saved from GET /v1/ledger/checkpoint "
        "or a witness's state file): fail unless the ledger still contains it",
    )
    verify_.set_defaults(handler=verify, local_stack="read")
    prove_ = sub.add_parser("prove", help="RFC 9162 inclusion and consistency proofs")
    proofs = prove_.add_subparsers(required=True, metavar="PROOF")
    inclusion = proofs.add_parser("inclusion", help="the audit path of one entry")
    inclusion.add_argument("position", type=positive_int)
    inclusion.add_argument("--tree-size", type=positive_int, default=None, help="default: the head")
    inclusion.set_defaults(handler=prove, local_stack="read")
    consistency = proofs.add_parser("consistency", help="a tree is a prefix of a later one")
    consistency.add_argument("first", type=positive_int)
    consistency.add_argument(
        "second", type=positive_int, nargs="?", default=None, help="default: the head"
    )
    consistency.set_defaults(handler=prove, local_stack="read")
    vkey_ = sub.add_parser("vkey", help="the note verifier key witnesses pin")
    vkey_.add_argument("--ledger-public-key", type=Path, metavar="FILE")
    vkey_.set_defaults(handler=vkey, local_stack="read")
    checkpoint_ = sub.add_parser("checkpoint", help="sign a checkpoint of the head now")
    checkpoint_.add_argument(
        "--note", action="store_true", help="print it as a C2SP signed note (what witnesses read)"
    )
    checkpoint_.set_defaults(handler=checkpoint, local_stack="sign")
    head_ = sub.add_parser("head", help="print the head position and hash")
    head_.set_defaults(handler=head, local_stack="read")
    rotate_ = sub.add_parser(
        "rotate-key", help="rotate the ledger's own key (a signed ledger.key_rotated)"
    )
    rotate_.add_argument(
        "--new-key",
        type=Path,
        required=True,
        metavar="FILE",
        help="PEM Ed25519 private key to become the ledger's (agentmesh identity generate "
        "--out FILE); the current key is AGENTMESH_AGENT_PRIVATE_KEY's",
    )
    rotate_.set_defaults(handler=rotate_key, local_stack="sign")


def ledger_public_key(args: argparse.Namespace, settings: Settings) -> VerifyKey:
    """The ledger's public key: ``--ledger-public-key``, else the configured private
    key's, else the one ``agentmesh up`` recorded in the data directory."""
    if getattr(args, "ledger_public_key", None) is not None:
        try:
            return VerifyKey.from_pem(args.ledger_public_key.read_bytes())
        except OSError as exc:
            raise CliError(f"cannot read {args.ledger_public_key}: {exc.strerror}") from None
        except SignatureError as exc:
            raise CliError(f"{args.ledger_public_key}: {exc}") from None
    if settings.agent_private_key_pem is not None or settings.agent_private_key_file is not None:
        return settings.signing_key().public
    # Lazy: agentmesh.local brings the embedded servers' modules (~400 ms).
    from agentmesh.local import PUBLIC_KEY_FILE

    recorded = settings.data_dir / PUBLIC_KEY_FILE
    if recorded.exists():  # written by `agentmesh up`: verification needs no private key
        return VerifyKey.from_pem(recorded.read_bytes())
    raise CliError(
        "no ledger public key: pass --ledger-public-key FILE (the ledger_public_key of "
        "GET /v1/ledger/checkpoints/latest), or run next to `agentmesh up`"
    )


def verify(args: argparse.Namespace, settings: Settings) -> int:
    from ledger.postgres import PostgresLedgerReader  # lazy: asyncpg (module docstring)
    from ledger.postgres.retention import PostgresRetentionStore  # lazy: asyncpg
    from ledger.verify import make_executor, verify_ledger

    key = ledger_public_key(args, settings)
    url = settings.require_database_url()
    trusted = None if args.trusted_checkpoint is None else read_note(args.trusted_checkpoint)

    async def verify_all() -> int:
        reader = await PostgresLedgerReader.connect(url)
        executor = make_executor(args.workers)
        try:
            head = await reader.head()
            bar = ProgressBar("verify", head.position)
            report = await verify_ledger(
                reader,
                key,
                anchors=PostgresRetentionStore(reader.pool),
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

    return run(verify_all())


def read_note(path: Path) -> str:
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


def prove(args: argparse.Namespace, settings: Settings) -> int:
    from ledger.postgres import PostgresLedgerReader  # lazy: asyncpg (module docstring)

    async def proof() -> int:
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
        print_json({**found, "hashes": [b64encode(h) for h in hashes]})
        return 0

    return run(proof())


def vkey(args: argparse.Namespace, settings: Settings) -> int:
    print(tlog.verifier(ledger_public_key(args, settings)).vkey())
    return 0


def checkpoint(args: argparse.Namespace, settings: Settings) -> int:
    from ledger.postgres import PostgresEventStore  # lazy: asyncpg (module docstring)

    async def sign() -> int:
        store = await PostgresEventStore.open(
            settings.require_database_url(), settings.signing_key()
        )
        try:
            signed = await store.checkpoint()
            note = await store.latest_tree_head()
        finally:
            await store.close()
        if args.note and note is not None:
            print(note, end="")
        else:
            print_json(msgspec.to_builtins(signed))
        return 0

    return run(sign())


def head(_: argparse.Namespace, settings: Settings) -> int:
    from ledger.postgres import PostgresLedgerReader  # lazy: asyncpg (module docstring)

    async def read_head() -> int:
        reader = await PostgresLedgerReader.connect(settings.require_database_url())
        try:
            found = await reader.head()
        finally:
            await reader.close()
        print_json(
            {
                "position": found.position,
                "entry_hash": found.entry_hash.hex(),
                "recorded_at": format_time(found.recorded_at),
            }
        )
        return 0

    return run(read_head())


def read_new_key(path: Path) -> SigningKey:
    """The key to rotate to, read from ``path`` (errors never quote the file)."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise CliError(f"--new-key: cannot read {path}: {exc.strerror}") from None
    try:
        return SigningKey.from_pem(pem)
    except SignatureError as exc:
        raise CliError(f"--new-key: {path}: {exc}") from None


def rotate_key(args: argparse.Namespace, settings: Settings) -> int:
    """Append ``ledger.key_rotated`` (signed by the current key, with the new key's
    proof), then sign a checkpoint with the new key. Every input is checked before
    anything is written; the current key must be the ledger's (the store refuses to
    open otherwise)."""
    from ledger.postgres import PostgresEventStore  # lazy: asyncpg (module docstring)

    url = settings.require_database_url()
    current = settings.signing_key()
    new = read_new_key(args.new_key)
    if new.public.raw == current.public.raw:
        raise CliError(
            f"--new-key: {args.new_key} holds the ledger's current key ({current.did}): "
            "generate another (agentmesh identity generate --out FILE)"
        )

    async def rotate() -> int:
        store = await PostgresEventStore.open(url, current)
        try:
            await store.checkpoint()  # the retiring key's last tree head
            event = LedgerKeyRotated(
                actor=current.did,
                occurred_at=stamp(utc_now()),
                did=new.did,
                public_key=new.public.pem(),
                previous_key=current.public.pem(),
            )
            [position] = (await store.append([SignedEvent.rotation(event, current, new)])).positions
        finally:
            await store.close()
        renewed = await PostgresEventStore.open(url, new)
        try:
            signed = await renewed.checkpoint()
        finally:
            await renewed.close()
        print(
            f"ledger key rotated at position {position}: {current.did} -> {new.did}; "
            f"checkpoint {signed.position} signed by the new key. Next: restart every API "
            "process (and the projector, retention and export jobs) with the new key as "
            "AGENTMESH_AGENT_PRIVATE_KEY: the old key now appends and signs nothing"
        )
        return 0

    return run(rotate())
