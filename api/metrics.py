"""Prometheus metrics of the API, served on their own port (9090).

Two kinds:

* per-request metrics — ``agentmesh_api_request_duration_seconds`` (labelled
  by the route *template*, never the raw path) and ``agentmesh_handshake_total``
  — live in each worker; with several workers they go through
  prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) and the
  metrics server sums them;
* state metrics — ``agentmesh_registry_size``, ``agentmesh_trust_score_gauge``
  (the mean score of active agents: one series, no per-agent labels) and
  ``agentmesh_policy_violation_count`` (violations recorded in the ledger, by
  severity) — are read from the projections by the metrics server itself, so
  they are the same whichever worker or replica is scraped. They are refreshed
  every 5 seconds (``MetricsServer.interval``), so a scrape may lag the ledger
  by up to that long; on a registry so large that reading it takes more than
  a fifth of a second of CPU, every 25 times that instead (``MetricsServer.pause``:
  about 20-25 s at 100,000 agents), so the refresh never keeps more than 4 % of
  a core busy beside the requests.

``agentmesh_policy_violation_count`` is exposed under exactly that name, as
the deployment guide's alert selects it (a plain prometheus-client Counter
would append ``_total``); its values only grow, so ``rate()`` applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from projections.documents import decode_trust_only
from projections.readstore import ProjectionReader, ReadStoreError
from projections.trust import TIERS, to_micros

log = logging.getLogger("agentmesh.metrics")

REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

REQUEST_DURATION = Histogram(
    "agentmesh_api_request_duration_seconds",
    "API request latency by route template",
    ["method", "route", "status"],
    buckets=REQUEST_BUCKETS,
)
HANDSHAKES = Counter(
    "agentmesh_handshake",
    "Trust handshakes answered, by outcome and reason",
    ["outcome", "reason", "shadow"],
)


@dataclass
class MeshStats:
    """State metrics as last read from the projections."""

    registry_size: int = 0
    mean_score: float | None = None
    tiers: dict[str, int] = field(default_factory=dict)
    violations: dict[str, int] = field(default_factory=dict)
    ok: bool = False


HOLD_SECONDS = 0.0002  # longest the refresh keeps the interpreter lock between hand-overs


async def read_stats(
    reader: ProjectionReader,
    now: datetime,
    yield_lock: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> MeshStats:
    """The state metrics from every agent document. On the refresh thread beside an
    event loop, ``yield_lock`` hands the interpreter lock over whenever the read has
    held it ``HOLD_SECONDS``: the loop, woken by a socket while the refresh
    computes, waits at most that long for the lock (it waited for every 64
    documents, ~2 ms on this machine; a request wakes the loop several times, and
    single reports were held 15-45 ms at every refresh)."""
    stats = MeshStats(
        tiers=dict.fromkeys(TIERS, 0),
        violations=dict.fromkeys(("low", "medium", "high", "critical"), 0),
    )
    scores: list[int] = []
    config, now_us = reader.config, to_micros(now)
    held = clock()
    async for raw in reader.store.all_agent_docs():
        if yield_lock is not None and clock() - held >= HOLD_SECONDS:
            yield_lock()
            held = clock()
        doc = decode_trust_only(raw)
        score, tier = doc.score_and_tier(config, now_us)
        stats.tiers[tier] += 1
        if doc.active:
            scores.append(score)
        for severity, count in doc.trust.violations.items():
            stats.violations[severity] = stats.violations.get(severity, 0) + count
    stats.registry_size = await reader.registry_size()
    stats.mean_score = sum(scores) / len(scores) if scores else None
    stats.ok = True
    return stats


REFRESH_SHARE = 0.2  # the most of the interpreter the refresh takes from the requests


def _release_lock() -> None:
    """Let a thread waiting for the interpreter lock (the API's event loop) take it,
    and stay off it four times as long as the read held it: beside a busy loop, a
    refresh that only handed the lock over still took every other turn of it for
    its whole length (~35 ms of CPU at 2,000 agents, ~1.6 s at 100,000:
    ``bench/metrics_refresh.py``), and reports queued behind the loop's halved pace."""
    time.sleep(HOLD_SECONDS * (1 / REFRESH_SHARE - 1))


class MeshStatsCollector(Collector):
    """Exposes the last ``MeshStats`` at scrape time."""

    def __init__(self) -> None:
        self.stats = MeshStats()

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        yield GaugeMetricFamily(
            "agentmesh_registry_size", "Active agents in the registry", value=stats.registry_size
        )
        # Always present: NaN while no agent is active (a mean of nothing), so the
        # series never vanishes and a `< threshold` alert does not fire on it.
        yield GaugeMetricFamily(
            "agentmesh_trust_score_gauge",
            "Mean trust score of active agents (0-1000; NaN while none is active)",
            value=stats.mean_score if stats.mean_score is not None else math.nan,
        )
        tiers = GaugeMetricFamily(
            "agentmesh_trust_tier_agents", "Agents per trust tier", labels=["tier"]
        )
        for tier, count in stats.tiers.items():
            tiers.add_metric([tier], count)
        yield tiers
        violations = Metric(
            "agentmesh_policy_violation_count",
            "Policy violations recorded in the ledger (a counter)",
            # Exposed untyped: prometheus-client's text format would rename a counter's
            # metadata to ``..._total``; the guide's alert needs this exact series name.
            "unknown",
        )
        for severity, count in stats.violations.items():
            violations.add_sample(
                "agentmesh_policy_violation_count", {"severity": severity}, float(count)
            )
        yield violations
        yield GaugeMetricFamily(
            "agentmesh_projections_up",
            "1 when the last read of the projections succeeded",
            value=1 if stats.ok else 0,
        )


def metrics_registry() -> CollectorRegistry:
    """The worker metrics: summed over processes in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


class MetricsServer:
    """Serves /metrics on ``port`` and refreshes the state metrics every few seconds
    on a thread of its own (so it works beside any number of workers)."""

    def __init__(
        self,
        port: int,
        make_reader: Callable[[], Awaitable[ProjectionReader | None]],
        clock: Callable[[], datetime],
        interval: float = 5.0,
        host: str = "0.0.0.0",  # noqa: S104 -- metrics are scraped over the pod network
    ) -> None:
        self.port = port
        self.host = host
        self.make_reader = make_reader
        self.clock = clock
        self.interval = interval
        self.collector = MeshStatsCollector()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._attached: ProjectionReader | None = None

    def attach(self, ctx: Any) -> None:
        """Read the state metrics through ``ctx.reader`` (the API's in-process store)."""
        self._attached = ctx.reader

    def start(self) -> None:
        registry = metrics_registry()
        registry.register(self.collector)
        self._server, self._server_thread = start_http_server(self.port, self.host, registry)
        self._thread = threading.Thread(
            target=self._refresh_forever, name="metrics-refresh", daemon=True
        )
        self._thread.start()

    def _refresh_forever(self) -> None:
        asyncio.run(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        reader = await self.make_reader()
        try:
            while not self._stop.is_set():
                current = reader or self._attached
                spent = 0.0
                if current is not None:
                    started = time.thread_time()
                    try:
                        self.collector.stats = await read_stats(
                            current, self.clock(), _release_lock
                        )
                    except ReadStoreError as exc:
                        log.warning("metrics_refresh_failed", extra={"error": str(exc)})
                        self.collector.stats.ok = False
                    spent = time.thread_time() - started
                await asyncio.get_running_loop().run_in_executor(
                    None, self._stop.wait, self.pause(spent)
                )
        finally:
            if reader is not None:
                await reader.store.close()

    def pause(self, spent: float) -> float:
        """Seconds until the next refresh: ``interval``, or longer when a read of every
        agent took more than a 25th of that CPU time, so the refresh never keeps
        more than 4 % of a core busy (with one worker, CPU taken from the requests:
        at a tenth, trust reads measured while it ran fell to half)."""
        return max(self.interval, spent * self.BUDGET)

    BUDGET = 25  # wait at least this many times the CPU time the last refresh took

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
        with contextlib.suppress(KeyError):
            metrics_registry().unregister(self.collector)
