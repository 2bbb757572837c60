"""Long-running services started by ``agentmesh serve …``."""

from __future__ import annotations

import asyncio
import logging
import signal

from prometheus_client import start_http_server

from agentmesh.logs import configure_logging
from agentmesh.settings import Settings
from agentmesh.wiring import open_projection_store, trust_config
from ledger.store import PostgresLedgerReader
from projections.projector import Projector, ProjectorMetrics

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
    metrics = ProjectorMetrics()
    if settings.projector_metrics_port:
        start_http_server(settings.projector_metrics_port)
    reader = await PostgresLedgerReader.connect(url)
    store = await open_projection_store(settings)
    try:
        projector = Projector(reader, store, trust_config(settings), metrics=metrics)
        await projector.run(url, stop)
    finally:
        await store.close()
        await reader.close()
    return 0
