"""`agentmesh serve sidecar`: wiring of the enforcing proxy beside one agent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime

import httpx
from prometheus_client import CollectorRegistry, start_http_server

from agentmesh.settings import ConfigError, Settings
from agentmesh.wiring import open_projection_store, trust_config
from ledger.identity import is_did
from ledger.timefmt import utc_now
from projections.readstore import ProjectionReader
from sidecar.httpserver import HttpServer
from sidecar.mcp import Upstream
from sidecar.outbox import Outbox
from sidecar.policy import PolicyError, PolicyWatcher
from sidecar.service import Sidecar
from sidecar.trust import TrustSource

log = logging.getLogger("agentmesh.sidecar")


def parse_upstreams(text: str | None) -> dict[str, Upstream]:
    """``name=url[;did=DID;handshake=URL]`` entries, comma-separated."""
    upstreams: dict[str, Upstream] = {}
    for entry in filter(None, (part.strip() for part in (text or "").split(","))):
        head, *options = entry.split(";")
        name, sep, url = head.partition("=")
        # Plain HTTP inside the pod network (TLS, where wanted, is the mesh's job).
        if not sep or not name.strip() or not url.strip().startswith("http://"):
            raise ConfigError(
                f"AGENTMESH_UPSTREAMS: expected name=http://host:port/mcp, got {entry!r}"
            )
        fields = dict(option.partition("=")[::2] for option in options)
        unknown = set(fields) - {"did", "handshake"}
        if unknown:
            raise ConfigError(
                f"AGENTMESH_UPSTREAMS: unknown option {sorted(unknown)[0]!r} in "
                f"{entry!r} (expected did=, handshake=)"
            )
        did = fields.get("did")
        if did is not None and not is_did(did):
            raise ConfigError(f"AGENTMESH_UPSTREAMS: {did!r} is not a DID")
        if did is not None and not fields.get("handshake"):
            raise ConfigError(
                f"AGENTMESH_UPSTREAMS: {name} names a peer DID but no handshake=URL of its sidecar"
            )
        upstreams[name.strip()] = Upstream(name.strip(), url.strip(), did, fields.get("handshake"))
    return upstreams


async def run_sidecar(
    settings: Settings,
    stop: asyncio.Event,
    clock: Callable[[], datetime] = utc_now,
    ready: Callable[[int], None] | None = None,
    denial_window: float | None = None,
) -> None:
    """Run the sidecar until ``stop`` is set. ``denial_window`` (seconds) overrides
    ``AGENTMESH_SIDECAR_DENIAL_WINDOW`` (``settings.sidecar_denial_window``)."""
    if denial_window is None:
        denial_window = settings.sidecar_denial_window
    key = settings.signing_key()
    upstreams = parse_upstreams(settings.upstreams)
    api_url = settings.require_api_url()
    try:
        policy = PolicyWatcher(
            settings.policy_file, settings.policy_mode, settings.governance_shadow_mode
        )
    except PolicyError as exc:
        raise ConfigError(str(exc)) from None
    store = await open_projection_store(settings)
    reader = ProjectionReader(store, trust_config(settings))
    trust = TrustSource(
        reader, key.did, clock, refresh_seconds=min(float(settings.cache_ttl or 5), 5.0)
    )
    outbox = Outbox.open(settings.sidecar_outbox_dir, api_url, key)
    registry = CollectorRegistry()
    api = httpx.AsyncClient(base_url=api_url, timeout=10)
    sidecar = Sidecar(
        key=key,
        trust=trust,
        policy=policy,
        outbox=outbox,
        upstreams=upstreams,
        api=api,
        registry=registry,
        clock=clock,
        handshake_ttl=settings.sidecar_handshake_ttl,
        health_file=settings.sidecar_health_file,
        denial_window=denial_window,
    )
    metrics = None
    if settings.sidecar_metrics_port:
        metrics = start_http_server(settings.sidecar_metrics_port, settings.sidecar_host, registry)
    sidecar.remove_health_file()  # never let a stale file from a previous run vouch for us
    server = HttpServer(sidecar.handle)
    tasks = [
        asyncio.create_task(coro)
        for coro in (
            trust.watch(),
            trust.keep_fresh(),
            outbox.run(stop),
            _reload_policy(sidecar, stop),
            _heartbeat(sidecar, stop),
            _sweep_denials(sidecar, stop),
        )
    ]
    try:
        await trust.refresh()
        port = await server.start(settings.sidecar_host, settings.sidecar_port)
        log.info(
            "sidecar_listening",
            extra={"port": port, "agent": key.did, "upstreams": sorted(upstreams)},
        )
        if ready is not None:
            ready(port)
        await stop.wait()
    finally:
        sidecar.remove_health_file()
        await server.close(drain_seconds=30)  # SIGTERM: finish in-flight calls
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await sidecar.denials.flush()  # the repeats counted so far, as follow-ups
        except Exception:
            log.exception("denial_flush_failed")  # the counts stay committed in the outbox
        with contextlib.suppress(Exception):
            await outbox.deliver_once()  # a last try; what remains is on disk
        await outbox.aclose()
        await sidecar.close()
        await api.aclose()
        await store.close()
        if metrics is not None:
            metrics[0].shutdown()
            metrics[0].server_close()


async def _reload_policy(sidecar: Sidecar, stop: asyncio.Event) -> None:
    """Reload the policy file atomically when it changes; a bad file keeps the old one."""
    while not stop.is_set():
        await asyncio.sleep(1.0)
        before = sidecar.policy.current
        policy, error = sidecar.policy.check()
        changed = policy is not before
        if error is not None:
            log.error("policy_reload_failed", extra={"error": error})
            sidecar.metrics.policy_reloads.labels("failed").inc()
        elif changed:
            log.info("policy_reloaded", extra={"source": sidecar.policy.current.source})
            sidecar.metrics.policy_reloads.labels("ok").inc()
            sidecar.visibility_may_have_changed()


async def _sweep_denials(sidecar: Sidecar, stop: asyncio.Event) -> None:
    """Close the denial windows that ended, so their repeat counts reach the ledger."""
    while not stop.is_set():
        await asyncio.sleep(1.0)
        try:
            await sidecar.denials.sweep()
        except Exception:
            log.exception("denial_sweep_failed")  # retried next second; nothing is lost


async def _heartbeat(sidecar: Sidecar, stop: asyncio.Event) -> None:
    """Keep the liveness file while the process (and its event loop) runs."""
    while not stop.is_set():
        sidecar.touch_health_file()
        await asyncio.sleep(5.0)
