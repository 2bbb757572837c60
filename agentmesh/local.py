"""`agentmesh up`: the local stack.

With no ``AGENTMESH_DATABASE_URL`` it starts an embedded PostgreSQL under the
data directory (``AGENTMESH_DATA_DIR``, default ``.agentmesh``), applies the
migrations, and on first start generates the server's ledger key and an admin
token (files with mode 0600; the token is printed once). A second start reuses
all of it. Ctrl-C (or SIGTERM) stops everything cleanly.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
from pathlib import Path
from types import FrameType

from agentmesh.embedded import EmbeddedPostgres
from agentmesh.migrate import upgrade
from agentmesh.settings import Settings
from ledger.identity import SigningKey


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def ensure_local_secrets(data_dir: Path) -> tuple[SigningKey, str, bool]:
    """The ledger key and admin token of this data dir, created on first start."""
    data_dir.mkdir(parents=True, exist_ok=True)
    key_file, token_file = data_dir / "ledger-key.pem", data_dir / "admin-token"
    created = False
    if not key_file.exists():
        _write_secret(key_file, SigningKey.generate().private_key_pem())
        created = True
    if not token_file.exists():
        _write_secret(token_file, secrets.token_urlsafe(32))
        created = True
    return SigningKey.from_pem(key_file.read_text()), token_file.read_text().strip(), created


def run_local_stack(settings: Settings) -> int:
    data_dir = settings.data_dir.resolve()
    key, token, created = ensure_local_secrets(data_dir)
    postgres: EmbeddedPostgres | None = None
    url = settings.database_url
    if url is None:
        postgres = EmbeddedPostgres(data_dir / "postgres").start()
        url = postgres.url
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        upgrade(url)
        print(f"agentmesh: ledger database ready at {url}", flush=True)
        print(f"agentmesh: ledger DID {key.did} (key in {data_dir / 'ledger-key.pem'})", flush=True)
        if created:
            print(
                f"agentmesh: admin token (shown once, kept in {data_dir / 'admin-token'}): {token}",
                flush=True,
            )
        print("agentmesh: press Ctrl-C to stop", flush=True)
        stop.wait()
    finally:
        if postgres is not None:
            postgres.stop()
        print("agentmesh: stopped", flush=True)
    return 0
