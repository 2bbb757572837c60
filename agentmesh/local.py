"""`agentmesh up`: the whole stack on one machine, nothing to install by hand.

With no ``AGENTMESH_DATABASE_URL`` / ``AGENTMESH_REDIS_HOST`` it starts an
embedded PostgreSQL and Redis (PyPI wheels) under the data directory
(``AGENTMESH_DATA_DIR``, default ``.agentmesh``), applies the migrations, and
on first start generates the server's ledger key and an admin token (files
with mode 0600; the token is printed once). Then it runs the API (:8080), its
metrics (:9090) and the projector in this process. A second start reuses the
data. Ctrl-C (or SIGTERM) stops everything cleanly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
from pathlib import Path

from agentmesh.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from agentmesh.logs import configure_logging
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


def _redis_port(data_dir: Path) -> int:
    """Keep the embedded Redis on one port across restarts (sidecars remember it)."""
    port_file = data_dir / "redis-port"
    if port_file.exists():
        return int(port_file.read_text())
    port = free_port()
    port_file.write_text(str(port))
    return port


def run_local_stack(settings: Settings) -> int:
    data_dir = settings.data_dir.resolve()
    key, token, created = ensure_local_secrets(data_dir)
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    try:
        if settings.database_url is None:
            postgres = EmbeddedPostgres(data_dir / "postgres").start()
        if settings.redis_host is None and settings.storage_backend == "redis":
            redis = EmbeddedRedis(
                data_dir / "redis", port=_redis_port(data_dir), persist=True
            ).start()
        local = dataclasses.replace(
            settings,
            database_url=settings.database_url or (postgres.url if postgres else None),
            redis_host=settings.redis_host or (redis.host if redis else None),
            redis_port=redis.port if redis else settings.redis_port,
            agent_private_key_pem=settings.agent_private_key_pem or key.private_key_pem(),
            admin_token=settings.admin_token or token,
            api_projector="true",
            log_format="text" if "AGENTMESH_LOG_FORMAT" not in os.environ else settings.log_format,
        )
        assert local.database_url is not None
        upgrade(local.database_url)
        _announce(local, data_dir, key, token if created else None)
        asyncio.run(_serve(local))
    except KeyboardInterrupt:
        pass
    finally:
        if redis is not None:
            redis.stop()
        if postgres is not None:
            postgres.stop()
        print("agentmesh: stopped", flush=True)
    return 0


def _announce(settings: Settings, data_dir: Path, key: SigningKey, token: str | None) -> None:
    print(f"agentmesh: ledger database  {settings.database_url}", flush=True)
    if settings.storage_backend == "redis":
        print(
            f"agentmesh: read store       redis://{settings.redis_host}:{settings.redis_port}",
            flush=True,
        )
    print(
        f"agentmesh: ledger DID       {key.did} (key in {data_dir / 'ledger-key.pem'})", flush=True
    )
    if token is not None:
        print(
            f"agentmesh: admin token (shown once, kept in {data_dir / 'admin-token'}): {token}",
            flush=True,
        )
    print(f"agentmesh: API              http://127.0.0.1:{settings.api_port}", flush=True)
    if settings.metrics_port:
        print(
            f"agentmesh: metrics          http://127.0.0.1:{settings.metrics_port}/metrics",
            flush=True,
        )
    print("agentmesh: press Ctrl-C to stop", flush=True)


async def _serve(settings: Settings) -> None:
    import uvicorn

    from agentmesh.services import api_app, metrics_server

    configure_logging(settings)
    server = metrics_server(settings) if settings.metrics_port else None
    if server is not None:
        server.start()
    try:
        app = api_app(settings, on_open=server.attach if server is not None else None)
        config = uvicorn.Config(
            app,
            host=settings.api_host,
            port=settings.api_port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=10,
        )
        await uvicorn.Server(config).serve()
    finally:
        if server is not None:
            server.stop()
