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
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import secrets
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentmesh.embedded import EmbeddedError, EmbeddedPostgres, EmbeddedRedis, free_port
from agentmesh.errors import AgentMeshError
from agentmesh.logs import configure_logging
from agentmesh.migrate import upgrade
from agentmesh.settings import ConfigError, Settings
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


STACK_FILE = "stack.json"
LOCK_FILE = "up.lock"
PUBLIC_KEY_FILE = "ledger.pub.pem"


class StackError(AgentMeshError):
    """`agentmesh up` cannot start (or keep running); the message is one line."""


def _stable_port(data_dir: Path, name: str) -> int:
    """Keep an embedded server on one port across restarts (``<name>-port`` in the data
    dir), so URLs printed once keep working; a new one if that port is taken now."""
    port_file = data_dir / f"{name}-port"
    if port_file.exists():
        with contextlib.suppress(ValueError):
            port = int(port_file.read_text())
            if _port_free("127.0.0.1", port):
                return port
    port = free_port()
    port_file.write_text(str(port))
    return port


def _port_free(host: str, port: int) -> bool:
    try:
        _listen(host, port).close()
    except OSError:
        return False
    return True


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket as uvicorn makes it (SO_REUSEADDR, so TIME_WAIT is no
    conflict, but a live listener is)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _lock_data_dir(data_dir: Path) -> Any:
    """One `agentmesh up` per data dir: an exclusive lock held while it runs (released
    by the kernel however the process ends)."""
    handle = open(data_dir / LOCK_FILE, "a+")  # noqa: SIM115 -- held for the process's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        running = read_stack(data_dir)
        where = f" (pid {running.pid}, API {running.api_url})" if running else ""
        raise StackError(
            f"a local stack is already running from {data_dir}{where}; stop it first "
            "(Ctrl-C in its terminal) or set AGENTMESH_DATA_DIR for a second one"
        ) from None
    return handle


def _reserve_ports(settings: Settings) -> dict[str, socket.socket]:
    """Bind every port the stack serves before anything starts, so a taken port is one
    line naming it (and nothing is left running). The API's and the demo server's
    sockets are kept and handed to uvicorn; the others are checked and released."""
    wanted = [
        ("API", settings.api_host, settings.api_port, "AGENTMESH_API_PORT"),
        ("metrics", settings.api_host, settings.metrics_port, "AGENTMESH_METRICS_PORT"),
        ("sidecar", "127.0.0.1", settings.sidecar_port, "AGENTMESH_SIDECAR_PORT"),
        (
            "sidecar metrics",
            "127.0.0.1",
            settings.sidecar_metrics_port,
            "AGENTMESH_SIDECAR_METRICS_PORT",
        ),
        ("demo MCP server", "127.0.0.1", demo_mcp_port(settings), "AGENTMESH_SIDECAR_PORT"),
    ]
    held: dict[str, socket.socket] = {}
    try:
        for name, host, port, key in wanted:
            if port == 0:
                continue
            try:
                sock = _listen(host, port)
            except OSError as exc:
                reason = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                raise StackError(
                    f"port {port} ({name}) on {host} is {reason}: stop what listens there "
                    f"or set {key}"
                ) from None
            held[name] = sock
    except BaseException:
        for sock in held.values():
            sock.close()
        raise
    for name in ("metrics", "sidecar", "sidecar metrics"):
        if name in held:
            held.pop(name).close()
    return held


@dataclass(frozen=True)
class LocalStack:
    """What a running `agentmesh up` recorded in ``<data dir>/stack.json``, for the CLI."""

    data_dir: Path
    pid: int
    api_url: str
    database_url: str | None
    storage_backend: str
    redis_host: str | None
    redis_port: int | None

    @property
    def ledger_public_key_file(self) -> Path:
        return self.data_dir / PUBLIC_KEY_FILE

    @property
    def ledger_key_file(self) -> Path:
        return self.data_dir / "ledger-key.pem"

    @property
    def admin_token_file(self) -> Path:
        return self.data_dir / "admin-token"


def read_stack(data_dir: Path) -> LocalStack | None:
    """The stack running from ``data_dir``, or None (none recorded, or it is gone)."""
    try:
        raw = json.loads((data_dir / STACK_FILE).read_text())
        stack = LocalStack(
            data_dir=data_dir,
            pid=int(raw["pid"]),
            api_url=str(raw["api_url"]),
            database_url=raw.get("database_url"),
            storage_backend=str(raw.get("storage_backend", "redis")),
            redis_host=raw.get("redis_host"),
            redis_port=raw.get("redis_port"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(stack.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, someone else's
    return stack


def with_local_stack(settings: Settings, *, signing: bool = False) -> Settings:
    """``settings`` completed from a running `agentmesh up` in its data dir: the
    database URL, the Redis address and the admin token, each only where the
    environment does not set it; with ``signing``, the ledger's key file too (for
    commands that sign as the ledger: checkpoint, audit export, retention)."""
    stack = read_stack(settings.data_dir.resolve())
    if stack is None:
        return settings
    changes: dict[str, Any] = {}
    if settings.database_url is None and stack.database_url:
        changes["database_url"] = stack.database_url
    if settings.redis_host is None and stack.redis_host and stack.redis_port:
        changes["redis_host"] = stack.redis_host
        changes["redis_port"] = stack.redis_port
    if "AGENTMESH_STORAGE_BACKEND" not in os.environ:
        changes["storage_backend"] = stack.storage_backend
    if settings.admin_token is None and stack.admin_token_file.exists():
        changes["admin_token"] = stack.admin_token_file.read_text().strip()
    no_key = settings.agent_private_key_pem is None and settings.agent_private_key_file is None
    if signing and no_key and stack.ledger_key_file.exists():
        changes["agent_private_key_file"] = stack.ledger_key_file
    return dataclasses.replace(settings, **changes)


def _write_stack(data_dir: Path, settings: Settings) -> None:
    record = {
        "pid": os.getpid(),
        "api_url": f"http://{_url_host(settings.api_host)}:{settings.api_port}",
        "database_url": settings.database_url,
        "storage_backend": settings.storage_backend,
        "redis_host": settings.redis_host,
        "redis_port": settings.redis_port if settings.redis_host else None,
    }
    temporary = data_dir / f".{STACK_FILE}.tmp"
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    temporary.replace(data_dir / STACK_FILE)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 -- a wildcard bind is reached on loopback
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run_local_stack(settings: Settings) -> int:
    """Run the stack until SIGINT/SIGTERM. A port in use, a stack already running or a
    server that cannot start is a StackError (one line), with nothing left running."""
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if "AGENTMESH_API_HOST" not in os.environ:
        # A laptop's admin API stays on loopback unless asked otherwise.
        settings = dataclasses.replace(settings, api_host="127.0.0.1")
    lock = _lock_data_dir(data_dir)
    # SIGTERM interrupts start-up as Ctrl-C does; the event loop takes both over later.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    sockets: dict[str, socket.socket] = {}
    failure: str | None = None
    try:
        sockets = _reserve_ports(settings)
        key, token, created = ensure_local_secrets(data_dir)
        (data_dir / PUBLIC_KEY_FILE).write_text(key.public.pem())
        if settings.database_url is None:
            postgres = EmbeddedPostgres(
                data_dir / "postgres", port=_stable_port(data_dir, "postgres"), keep=True
            ).start()
        if settings.redis_host is None and settings.storage_backend == "redis":
            redis = EmbeddedRedis(
                data_dir / "redis", port=_stable_port(data_dir, "redis"), persist=True
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
        _write_stack(data_dir, local)
        failure = asyncio.run(_serve(local, sockets))
    except KeyboardInterrupt:
        pass
    except EmbeddedError as exc:
        failure = str(exc).strip().splitlines()[0]
    finally:
        signal.signal(signal.SIGTERM, previous)
        for sock in sockets.values():
            sock.close()
        (data_dir / STACK_FILE).unlink(missing_ok=True)
        try:
            if redis is not None:
                redis.stop()
        finally:
            if postgres is not None:
                postgres.stop()
            lock.close()
    if failure is not None:
        raise StackError(failure)
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
        f"agentmesh: ledger DID       {key.did} (public key in {data_dir / PUBLIC_KEY_FILE})",
        flush=True,
    )
    if token is not None:
        print(
            f"agentmesh: admin token (shown once, kept in {data_dir / 'admin-token'}): {token}",
            flush=True,
        )
    host = _url_host(settings.api_host)
    print(f"agentmesh: API              http://{host}:{settings.api_port}", flush=True)
    if settings.metrics_port:
        print(
            f"agentmesh: metrics          http://{host}:{settings.metrics_port}/metrics",
            flush=True,
        )
    print(
        "agentmesh: the CLI finds this stack from here (.venv/bin/agentmesh ledger verify, …)",
        flush=True,
    )
    print("agentmesh: press Ctrl-C to stop", flush=True)


DEMO_POLICY = """\
# The demo sidecar's policy (strict: anything not allowed here is denied).
version: 1
staleness_seconds: 30
rules:
  - id: everyday-tools
    tools: ["search", "read_file", "count"]
    effect: allow
  - id: destructive-tools-need-trust
    tools: ["delete_*"]
    effect: allow
    min_tier: trusted
  - id: local-egress
    hosts: ["127.0.0.1", "localhost"]
    effect: allow
"""


def demo_files(data_dir: Path) -> tuple[SigningKey, Path]:
    """The demo agent's key and the demo policy, created on first start."""
    key_file, policy_file = data_dir / "demo-agent.pem", data_dir / "demo-policy.yaml"
    if not key_file.exists():
        _write_secret(key_file, SigningKey.generate().private_key_pem())
    if not policy_file.exists():
        policy_file.write_text(DEMO_POLICY)
    return SigningKey.from_pem(key_file.read_text()), policy_file


def demo_mcp_port(settings: Settings) -> int:
    """9100 with the default ports; always a valid port."""
    port = settings.sidecar_port + 1019
    return port if port <= 65_535 else settings.sidecar_port - 1019


def sidecar_settings(settings: Settings, data_dir: Path) -> Settings:
    key, policy_file = demo_files(data_dir)
    return dataclasses.replace(
        settings,
        agent_private_key_pem=key.private_key_pem(),
        upstreams=f"demo=http://127.0.0.1:{demo_mcp_port(settings)}/mcp",
        api_url=f"http://127.0.0.1:{settings.api_port}",
        policy_file=policy_file,
        policy="strict",
        sidecar_host="127.0.0.1",
        sidecar_outbox_dir=data_dir / "outbox",
        sidecar_health_file=data_dir / "sidecar-healthy",
    )


def _quiet_server(config: Any) -> Any:
    """A uvicorn server that leaves signals to us: uvicorn's own handlers would let
    only the last of our servers see Ctrl-C, and re-raise it after shutdown."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server(config)


async def _serve_on(server: Any, sock: socket.socket, name: str) -> None:
    try:
        await server.serve(sockets=[sock])
    except SystemExit:  # uvicorn's way of saying the app did not start
        raise StackError(f"the {name} did not start (see the log above)") from None


async def _serve(settings: Settings, sockets: dict[str, socket.socket]) -> str | None:
    """Serve until SIGINT/SIGTERM; the first server to fail stops the rest. Returns the
    failure (one line) or None. A second signal stops without waiting."""
    import uvicorn

    from agentmesh.services import api_app, metrics_server
    from agentmesh.sidecar_main import run_sidecar
    from sidecar.demo import demo_app

    configure_logging(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    server = metrics_server(settings) if settings.metrics_port else None
    if server is not None:
        server.host = settings.api_host
        try:
            server.start()
        except OSError as exc:
            return f"port {settings.metrics_port} (metrics) on {settings.api_host}: {exc.strerror}"
    data_dir = settings.data_dir.resolve()
    try:
        app = api_app(settings, on_open=server.attach if server is not None else None)
        api = _quiet_server(
            uvicorn.Config(
                app,
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=10,
            )
        )
        demo = _quiet_server(
            uvicorn.Config(demo_app(), log_config=None, access_log=False, log_level="warning")
        )
        tasks = [
            asyncio.create_task(_serve_on(api, sockets["API"], "API")),
            asyncio.create_task(_serve_on(demo, sockets["demo MCP server"], "demo MCP server")),
            asyncio.create_task(_demo_sidecar(settings, data_dir, api, stop, run_sidecar)),
        ]

        def on_signal() -> None:
            if stop.is_set():  # a second Ctrl-C: do not wait for in-flight requests
                api.force_exit = demo.force_exit = True
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal)
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([*tasks, stopping], return_when=asyncio.FIRST_COMPLETED)
        failure = next(
            (_one_line(t.exception()) for t in done if t is not stopping and t.exception()),
            None,
        )
        stop.set()
        api.should_exit = demo.should_exit = True
        _, pending = await asyncio.wait(tasks, timeout=30)
        for task in pending:  # stuck past the grace period: do not hang on it
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        stopping.cancel()
        return failure
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        if server is not None:
            server.stop()


def _one_line(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    if isinstance(exc, StackError | ConfigError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return f"an address is in use: {exc}"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


async def _demo_sidecar(
    settings: Settings, data_dir: Path, api: Any, stop: asyncio.Event, run_sidecar: Any
) -> None:
    """Register the demo agent once the API answers, then run its sidecar."""
    import httpx

    while not api.started:  # noqa: ASYNC110 -- uvicorn exposes only a flag
        await asyncio.sleep(0.05)
    local = sidecar_settings(settings, data_dir)
    key = SigningKey.from_pem(local.agent_private_key_pem or "")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.api_port}") as client:
        response = await client.post(
            "/v1/agents",
            headers={"Authorization": f"Bearer {settings.admin_token}"},
            json={
                "public_key": key.public.pem(),
                "capabilities": ["tools:*"],
                "metadata": {"role": "demo agent behind the local sidecar"},
            },
        )
        if response.status_code not in (201, 409):
            print(f"agentmesh: demo agent not registered: {response.text}", flush=True)
            return
    print(
        f"agentmesh: sidecar          http://127.0.0.1:{settings.sidecar_port}/mcp/demo "
        f"(demo agent {key.did}); try: agentmesh demo",
        flush=True,
    )
    await run_sidecar(local, stop)


async def run_demo(settings: Settings) -> int:
    """Against a running `agentmesh up`: see ``sidecar.demo.run_demo`` (the same
    allowed-then-blocked story every time it is run in the same data directory)."""
    from sidecar.demo import run_demo as demo

    data_dir = settings.data_dir.resolve()
    key, _ = demo_files(data_dir)
    token = (data_dir / "admin-token").read_text().strip()
    api, sidecar = settings.api_port, settings.sidecar_port
    return await demo(f"http://127.0.0.1:{api}", f"http://127.0.0.1:{sidecar}", token, key.did)
