"""Long-running services started by ``agentmesh serve …``."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from litestar import Litestar
from prometheus_client import start_http_server

from agentmesh.logs import configure_logging
from agentmesh.migrate import head_revision
from agentmesh.nodelay import http_protocol
from agentmesh.settings import Settings
from agentmesh.wiring import open_history_reader, open_projection_store, trust_config
from api.app import create_app
from api.context import ApiContext
from api.handshakes_postgres import PostgresHandshakeStore
from api.metrics import MetricsServer
from api.telemetry import setup_tracing
from ledger.postgres import PostgresEventStore, PostgresLedgerReader
from ledger.timefmt import utc_now
from projections.cache import CachedStore
from projections.config import TrustConfig
from projections.leader_postgres import append_wakeups, project_while_leader
from projections.projector import Projector, ProjectorMetrics
from projections.readstore import ProjectionReader, ProjectionStore

log = logging.getLogger("agentmesh")


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, for a graceful stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def run_projector(settings: Settings) -> int:
    """Compete for the projector lock and project while holding it, until SIGTERM."""
    configure_logging(settings)
    stop = stop_on_signals()
    url = settings.require_database_url()
    # The leader lock and the LISTEN wake-ups need a session of their own; reads and
    # store writes may go through a transaction pooler.
    direct = settings.require_direct_database_url("the projector's leader lock and LISTEN")
    metrics = ProjectorMetrics()
    if settings.projector_metrics_port:
        start_http_server(settings.projector_metrics_port)
    reader = await PostgresLedgerReader.connect(url)
    store = await open_projection_store(settings)
    try:
        projector = Projector(reader, store, trust_config(settings), metrics=metrics)
        await project_while_leader(projector, direct, stop)
    finally:
        await store.close()
        await reader.close()
    return 0


# -- the API --------------------------------------------------------------------------


async def open_api_context(
    settings: Settings, clock: Callable[[], datetime] = utc_now
) -> ApiContext:
    """Connect everything the API needs (called in the app's lifespan)."""
    url = settings.require_database_url()
    if settings.storage_backend == "postgres" and settings.cache_enabled:
        # The cache is invalidated by the read store's LISTEN: fail now, not later.
        settings.require_direct_database_url("the cache's change notifications (LISTEN)")
    ledger = await PostgresEventStore.open(
        url,
        settings.signing_key(),
        clock=clock,
        checkpoint_every=settings.checkpoint_every,
        checkpoint_interval=settings.checkpoint_interval,
    )
    history = (
        await open_history_reader(settings) if settings.database_read_url is not None else None
    )
    store = await open_projection_store(settings)
    cache = CachedStore(store, settings.cache_ttl) if settings.cache_enabled else None
    config = trust_config(settings)
    ctx = ApiContext(
        ledger=ledger,
        reader=ProjectionReader(cache or store, config),
        cache=cache,
        handshakes=PostgresHandshakeStore(ledger.pool),
        config=config,
        admin_token=settings.admin_token,
        shadow_mode=settings.governance_shadow_mode,
        clock=clock,
        expected_revision=head_revision(),
        history=history,
    )
    embedded = settings.api_projector == "true" or (
        settings.api_projector == "auto" and settings.storage_backend == "memory"
    )
    if embedded:
        ctx.background.append(
            asyncio.create_task(
                _embedded_projector(ledger, store, config, settings.direct_database_url())
            )
        )
    return ctx


async def _embedded_projector(
    ledger: PostgresEventStore,
    store: ProjectionStore,
    config: TrustConfig,
    listen_url: str | None,
) -> None:
    """Project in this process (no leader lock: one API process). Woken by LISTEN on
    ``listen_url``; behind a transaction pooler without a direct URL, by its poll alone."""

    async def always() -> bool:
        return True

    projector = Projector(ledger, store, config, poll_interval=0.5)
    async with append_wakeups(listen_url) as wake:
        await projector.project(asyncio.Event(), always, wake)


async def close_api_context(ctx: ApiContext) -> None:
    await ctx.ledger.close()
    if ctx.history is not None:
        await ctx.history.close()  # type: ignore[attr-defined]
    await ctx.reader.store.close()


def api_app(
    settings: Settings,
    clock: Callable[[], datetime] = utc_now,
    on_open: Callable[[ApiContext], None] | None = None,
) -> Litestar:
    if settings.otel_enabled:
        setup_tracing(settings.otel_endpoint, "agentmesh-api")

    async def open_context() -> ApiContext:
        ctx = await open_api_context(settings, clock)
        if on_open is not None:
            on_open(ctx)
        return ctx

    return create_app(open_context, close_api_context)


def metrics_server(settings: Settings, clock: Callable[[], datetime] = utc_now) -> MetricsServer:
    """The metrics server; it reads the shared read store on its own thread.

    With the memory backend there is nothing shared to read: the API attaches
    its in-process reader when it starts (one process only)."""
    config = trust_config(settings)

    async def make_reader() -> ProjectionReader | None:
        if settings.storage_backend == "memory":
            return None
        return ProjectionReader(await open_projection_store(settings), config)

    return MetricsServer(settings.metrics_port, make_reader, clock)


def wipe_metric_files(directory: str) -> None:
    """Remove the metric files earlier processes left in a multiprocess directory.

    prometheus-client sums every file in it, so it must be wiped before the workers
    start: a container restarted in its pod keeps its emptyDir, and the counts of the
    workers that died with it would be added to the new ones'. Only prometheus-client's
    own files (``counter_<pid>.db`` …) are removed; the directory stays."""
    for path in Path(directory).glob("*.db"):
        if path.name.startswith(_METRIC_FILES):
            path.unlink(missing_ok=True)


_METRIC_FILES = ("counter_", "gauge_", "histogram_", "summary_")


def serve_api(settings: Settings) -> int:
    """Run the API under uvicorn: metrics on their own port, graceful SIGTERM."""
    import uvicorn

    configure_logging(settings)
    made: str | None = None  # the workers' metric files, ours to remove when they stop
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        wipe_metric_files(given)
    elif settings.api_workers > 1:
        made = tempfile.mkdtemp(prefix="agentmesh-prom-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    server: MetricsServer | None = None
    workers = settings.api_workers
    if settings.storage_backend == "memory" and workers > 1:
        log.warning(
            "api_workers_reduced",
            extra={"workers": 1, "requested": workers, "reason": "memory read store"},
        )
        workers = 1
    try:
        if settings.metrics_port:
            server = metrics_server(settings)
            server.start()
        if workers == 1:
            # In-process, so the metrics server can see a memory read store.
            app = api_app(settings, on_open=server.attach if server is not None else None)
            uvicorn.run(
                app,
                host=settings.api_host,
                port=settings.api_port,
                log_config=None,
                timeout_graceful_shutdown=30,
                access_log=False,
            )
        else:
            uvicorn.run(
                "agentmesh.asgi:create",
                http=http_protocol(),
                factory=True,
                host=settings.api_host,
                port=settings.api_port,
                workers=workers,
                log_config=None,
                timeout_graceful_shutdown=30,
                access_log=False,
            )
    finally:
        if server is not None:
            server.stop()
        if made is not None:  # a directory given by the operator is theirs to keep
            shutil.rmtree(made, ignore_errors=True)
    return 0
