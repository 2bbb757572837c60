"""The sidecar: routes, decisions, reports, peer handshakes, health and metrics.

Routes on :8081 —
``GET /health`` (readiness: 200 when the policy is loaded and trust data is
fresh, 503 with the reason otherwise), ``/mcp/{name}`` (MCP relay),
``POST /.well-known/agentmesh/handshake`` (answers handshake challenges for
this agent by signing them), absolute-form and ``CONNECT`` requests (HTTP
egress proxy). Every denial — and every would-be denial in shadow or
permissive mode — is recorded through ``sidecar.denials`` (one penalty per
window and kind, repeats as a count) in the durable outbox before it is
answered. When the tools the agent may call change (a trust change, a policy
reload), open MCP server streams get ``notifications/tools/list_changed``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import httpx
import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ledger.canonical import canonical_bytes
from ledger.events import new_event_id
from ledger.identity import SigningKey, b64encode
from ledger.timefmt import format_time, parse_time
from sidecar.denials import DEFAULT_WINDOW_SECONDS, Denials
from sidecar.egress import egress, is_proxy_request
from sidecar.httpserver import Request, Response, Tunnel
from sidecar.mcp import MaybeVerdict, McpRelay, Upstream, settled
from sidecar.outbox import Outbox
from sidecar.policy import (
    Action,
    Address,
    Decision,
    Policy,
    PolicyWatcher,
    RateLimiter,
    TrustInfo,
    decide,
)
from sidecar.trust import MISS, TrustSource
from sidecar.upstream import UpstreamPool

log = logging.getLogger("agentmesh.sidecar")

WELL_KNOWN = "/.well-known/agentmesh/handshake"
CHALLENGE_TYPE = "agentmesh.handshake.challenge"
HANDSHAKE_REQUEST_TYPE = "agentmesh.handshake.request"
_DECISIONS_KEPT = 4096  # cached tool decisions (cleared when full)
DECISION_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25)


class SidecarMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "agentmesh_sidecar_decisions",
            "Policy decisions",
            ["outcome", "reason"],
            registry=registry,
        )
        self.decision_seconds = Histogram(
            "agentmesh_sidecar_decision_seconds",
            "Time to decide",
            buckets=DECISION_BUCKETS,
            registry=registry,
        )
        self.upstream_seconds = Histogram(
            "agentmesh_sidecar_upstream_seconds",
            "Upstream response time (to headers)",
            ["upstream"],
            buckets=DECISION_BUCKETS,
            registry=registry,
        )
        self.outbox_depth = Gauge(
            "agentmesh_sidecar_outbox_depth", "Reports waiting for the API", registry=registry
        )
        self.cache = Counter(
            "agentmesh_sidecar_trust_cache", "Trust cache lookups", ["result"], registry=registry
        )
        self.handshakes = Counter(
            "agentmesh_handshake",
            "Peer handshakes run by this sidecar",
            ["outcome", "reason"],
            registry=registry,
        )
        self.policy_reloads = Counter(
            "agentmesh_sidecar_policy_reloads", "Policy file reloads", ["result"], registry=registry
        )
        self.reports = Counter(
            "agentmesh_sidecar_denial_records",
            "Denials recorded: the first of a window (a violation) or a repeat (counted)",
            ["kind"],
            registry=registry,
        )
        self.list_changed = Counter(
            "agentmesh_sidecar_tools_list_changed",
            "notifications/tools/list_changed sent on open MCP streams",
            registry=registry,
        )
        self._children: dict[tuple[str, ...], Any] = {}

    def observe_upstream(self, upstream: str, seconds: float) -> None:
        key = ("upstream_seconds", upstream)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.upstream_seconds.labels(upstream)
        child.observe(seconds)

    def count(self, counter: Counter, *labels: str) -> None:
        """``counter.labels(*labels).inc()``, with the labelled child kept (hot path)."""
        key = (counter._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(*labels)
        child.inc()


@dataclass
class _Peer:
    verified_until: float = 0.0
    lock: asyncio.Lock | None = None


class Sidecar:
    def __init__(
        self,
        *,
        key: SigningKey,
        trust: TrustSource,
        policy: PolicyWatcher,
        outbox: Outbox,
        upstreams: dict[str, Upstream],
        api: httpx.AsyncClient,
        registry: CollectorRegistry,
        clock: Callable[[], datetime],
        handshake_ttl: float,
        health_file: Path | None,
        denial_window: float = DEFAULT_WINDOW_SECONDS,
    ) -> None:
        self.key = key
        self.did = key.did
        self.trust = trust
        self.policy = policy
        self.outbox = outbox
        self.upstreams = upstreams
        self.api = api
        self.clock = clock
        self.handshake_ttl = handshake_ttl
        self.health_file = health_file
        self.metrics = SidecarMetrics(registry)
        self.metrics.outbox_depth.set_function(lambda: float(outbox.depth()))
        self.limiter = RateLimiter()
        # tool -> (policy, trust stamp, decision): see _decide
        self._decisions: dict[str, tuple[Policy, tuple[int, float | None], Decision]] = {}
        self.pools = {name: UpstreamPool(u.url) for name, u in upstreams.items()}
        self.egress_client = _pooled_client()
        self.peers: dict[str, _Peer] = {name: _Peer(lock=asyncio.Lock()) for name in upstreams}
        self.denials = Denials(outbox, self.did, clock, denial_window)
        self.relay = McpRelay(
            self.pools,
            upstreams,
            self._gate_tool,
            self._visible_tools,
            self._ensure_peer,
            self._unclassifiable,
        )
        # Per upstream: the tool names its last tools/list carried, and those shown.
        self.listed: dict[str, list[str]] = {}
        self.shown: dict[str, set[str]] = {}
        self._visibility: asyncio.Task[None] | None = None
        self._visibility_again = False
        trust.on_change = self.visibility_may_have_changed

    # -- routing -----------------------------------------------------------------------------

    def handle(self, request: Request) -> Response | Tunnel | Awaitable[Response | Tunnel]:
        """Sync-first (see ``sidecar.httpserver``): the answer now when nothing must be
        awaited — ``/health``, a refusal, a repeated denial — else an awaitable."""
        if is_proxy_request(request):
            return egress(request, self._gate_host, self.egress_client)
        path = request.target.split("?", 1)[0]
        if path == "/health" and request.method in ("GET", "HEAD"):
            return self.health()
        if path.startswith("/mcp/"):
            name = path[len("/mcp/") :].strip("/")
            outcome = self.relay.handle(name, request)
            if isinstance(outcome, Response) or name not in self.upstreams:
                return outcome
            if isinstance(outcome, asyncio.Future):  # answered from a callback
                started = time.perf_counter()
                outcome.add_done_callback(
                    lambda _: self.metrics.observe_upstream(name, time.perf_counter() - started)
                )
                return outcome
            return self._timed(name, outcome)
        if path == WELL_KNOWN and request.method == "POST":
            return self.answer_challenge(request)
        return _problem(404, "not-found", "Not found", f"no route for {request.method} {path}")

    async def _timed(self, name: str, outcome: Awaitable[Response]) -> Response:
        started = time.perf_counter()
        response = await outcome
        self.metrics.observe_upstream(name, time.perf_counter() - started)
        return response

    # -- decisions -------------------------------------------------------------------------------

    def _decide(self, action: Action, trust: TrustInfo | None, record: bool) -> Decision:
        started = time.perf_counter()
        policy = self.policy.current
        # The decision for a tool, cached per (policy, trust read): the same policy object
        # and the same read of the agent's trust (no invalidation, no re-read since) decide
        # the same — unless the rule that matches is rate limited (it counts every call) or
        # the trust was stale (the decision then depends on its age).
        stamp = self.trust.stamp
        cached = self._decisions.get(action.name) if action.kind == "tool" else None
        fresh = trust is not None and trust.age_seconds <= policy.staleness_seconds
        if cached is not None and cached[0] is policy and cached[1] == stamp and fresh:
            decision = cached[2]
        else:
            limiter = self.limiter if record else RateLimiter()
            decision = decide(policy, action, trust, self.did, limiter, time.monotonic())
            if (
                action.kind == "tool"
                and fresh
                and not any(r.rate_limit is not None and r.matches(action) for r in policy.rules)
            ):
                if len(self._decisions) >= _DECISIONS_KEPT:
                    self._decisions.clear()
                self._decisions[action.name] = (policy, stamp, decision)
        if record:
            self.metrics.decision_seconds.observe(time.perf_counter() - started)
            outcome = (
                "denied"
                if not decision.allowed
                else "would_deny"
                if not decision.enforced
                else "allowed"
            )
            self.metrics.count(self.metrics.decisions, outcome, decision.reason)
        return decision

    async def decide(self, action: Action, *, record: bool = True, note: str = "") -> Decision:
        trust = await self.trust.current()
        decision = self._decide(action, trust, record)
        if record and (not decision.allowed or not decision.enforced):
            await self._report(action, decision, note)
        return decision

    def decide_now(
        self, action: Action, note: str = ""
    ) -> tuple[Decision, Awaitable[None] | None] | None:
        """``decide`` without waiting when the trust cache holds a fresh value: the
        decision, and what is left to await before answering (a first denial's commit),
        or None when the trust must be read first (nothing was done then)."""
        trust = self.trust.cached()
        if trust is MISS:
            return None
        decision = self._decide(action, cast(TrustInfo | None, trust), True)
        if decision.allowed and decision.enforced:
            return decision, None
        return decision, self._report_now(action, decision, note)

    async def _report(self, action: Action, decision: Decision, note: str = "") -> None:
        wait = self._report_now(action, decision, note)
        if wait is not None:
            await wait

    def _report_now(
        self, action: Action, decision: Decision, note: str = ""
    ) -> Awaitable[None] | None:
        if decision.reason == "allowed":
            return None
        wait = self.denials.record_now(action, decision, note)
        if wait is None:
            self.metrics.count(self.metrics.reports, "repeat")
            return None
        return self._counted(wait)

    async def _counted(self, wait: Awaitable[bool]) -> None:
        first = await wait
        self.metrics.count(self.metrics.reports, "first" if first else "repeat")

    def _unclassifiable(self, why: str) -> MaybeVerdict:
        """A POST body the relay cannot classify: refused (and recorded) unless the
        policy is permissive or in shadow mode, which forward it and record it."""
        trust = self.trust.cached()
        if trust is MISS:
            return self._unclassifiable_later(why)
        return self._refuse_unclassifiable(why, cast(TrustInfo | None, trust))

    async def _unclassifiable_later(self, why: str) -> dict[str, Any] | None:
        refused = self._refuse_unclassifiable(why, await self.trust.current())
        return await settled(refused)

    def _refuse_unclassifiable(self, why: str, trust: TrustInfo | None) -> MaybeVerdict:
        policy = self.policy.current
        enforced = not (policy.shadow or policy.mode == "permissive")
        detail = why if enforced else f"{why} (not enforced: forwarded)"
        decision = Decision(
            allowed=not enforced,
            enforced=enforced,
            reason="unparseable",
            rule=None,
            policy=policy.source,
            mode=policy.mode,
            agent=self.did,
            score=None if trust is None else trust.score,
            tier=None if trust is None else trust.tier,
            severity="low",
            detail=detail,
        )
        outcome = "denied" if enforced else "would_deny"
        self.metrics.count(self.metrics.decisions, outcome, decision.reason)
        action = Action("tool", "(unparseable request)")
        error: dict[str, Any] | None = None
        if enforced:
            error = self._error(decision, action)
            error["message"] = f"refused by AgentMesh: {why}"
        wait = self._report_now(action, decision)
        if wait is None:
            return error
        return _after(wait, error)

    @staticmethod
    def _error(decision: Decision, action: Action) -> dict[str, Any]:
        return {
            "message": f"blocked by AgentMesh policy: {decision.reason}",
            "reason": decision.reason,
            "rule": decision.rule,
            "policy": decision.policy,
            "mode": decision.mode,
            "agent": decision.agent,
            "score": decision.score,
            "tier": decision.tier,
            "detail": decision.detail,
            action.kind: action.name,
        }

    def _gate_tool(self, upstream: str, tool: str) -> MaybeVerdict:
        action = Action("tool", tool)
        shown = self.shown.get(upstream)
        hidden = shown is not None and tool not in shown
        # Calling a tool tools/list did not show is recorded as the denial it is, and says so.
        note = " (a tool hidden from this agent's tools/list)" if hidden else ""
        now = self.decide_now(action, note)
        if now is None:
            return self._gate_tool_later(action, note)
        decision, wait = now
        error = None if decision.allowed else self._error(decision, action)
        return error if wait is None else _after(wait, error)

    async def _gate_tool_later(self, action: Action, note: str) -> dict[str, Any] | None:
        decision = await self.decide(action, note=note)
        return None if decision.allowed else self._error(decision, action)

    async def _gate_host(self, host: str, address: Address | None) -> dict[str, Any] | None:
        action = Action("host", host, address)
        decision = await self.decide(action)
        error = None if decision.allowed else self._error(decision, action)
        if error is not None and address is not None:
            error["address"] = str(address)
        return error

    async def _allowed(self, names: list[str]) -> set[str]:
        visible = set()
        for name in names:
            if (await self.decide(Action("tool", name), record=False)).allowed:
                visible.add(name)
        return visible

    async def _visible_tools(self, upstream: str, names: list[str]) -> set[str]:
        """tools/list shows only what the agent may call (no reports, no rate use)."""
        visible = await self._allowed(names)
        self.listed[upstream] = names
        self.shown[upstream] = visible
        return visible

    def visibility_may_have_changed(self) -> None:
        """Trust or policy changed: check (in a task) whether the visible tools did."""
        if self._visibility is not None and not self._visibility.done():
            self._visibility_again = True
            return
        self._visibility = asyncio.get_running_loop().create_task(self._check_visibility())

    async def _check_visibility(self) -> None:
        again = True
        while again:
            self._visibility_again = False
            for upstream, names in list(self.listed.items()):
                visible = await self._allowed(names)
                if visible != self.shown.get(upstream):
                    self.shown[upstream] = visible
                    sent = self.relay.tools_changed(upstream)
                    self.metrics.list_changed.inc(sent)
                    log.info(
                        "tools_list_changed",
                        extra={"upstream": upstream, "streams": sent, "visible": sorted(visible)},
                    )
            again = self._visibility_again

    # -- peer handshakes -----------------------------------------------------------------------

    def _ensure_peer(self, upstream: Upstream) -> MaybeVerdict:
        """When the upstream is another agent, verify it (challenge/response through
        the API) before the first call and whenever the last verification expired."""
        if upstream.did is None:
            return None
        if time.monotonic() < self.peers[upstream.name].verified_until:
            return None
        return self._verify_peer(upstream)

    async def _verify_peer(self, upstream: Upstream) -> dict[str, Any] | None:
        peer = self.peers[upstream.name]
        assert peer.lock is not None
        async with peer.lock:
            if time.monotonic() < peer.verified_until:
                return None
            reason = await self._handshake(upstream)
            self.metrics.handshakes.labels(
                "verified" if reason is None else "failed", reason or "ok"
            ).inc()
            if reason is None:
                peer.verified_until = time.monotonic() + self.handshake_ttl
                return None
        return {
            "message": f"blocked by AgentMesh: peer handshake failed: {reason}",
            "reason": "peer_unverified",
            "peer": upstream.did,
            "detail": reason,
            "agent": self.did,
            "rule": None,
            "policy": self.policy.current.source,
        }

    async def _handshake(self, upstream: Upstream) -> str | None:
        try:
            started = await self.api.post("/v1/handshakes", json=self._handshake_request(upstream))
            if started.status_code != 201:
                return f"api answered {started.status_code}"
            challenge = started.json()
            target = (upstream.handshake_url or "").rstrip("/") + WELL_KNOWN
            async with httpx.AsyncClient(timeout=10) as client:
                signed = await client.post(target, json={"to_sign": challenge["to_sign"]})
            if signed.status_code != 200:
                return f"peer answered {signed.status_code}"
            answer = await self.api.post(
                f"/v1/handshakes/{challenge['handshake_id']}/response",
                json={"signature": signed.json()["signature"]},
            )
            result = answer.json()
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            return f"handshake could not run: {exc}"
        if result.get("verified") and not result.get("shadow"):
            return None
        return str(result.get("reason") or "not verified")

    def _handshake_request(self, upstream: Upstream) -> dict[str, Any]:
        """The start of a handshake, signed by this agent (single-use ``request_id``)."""
        body = {
            "type": HANDSHAKE_REQUEST_TYPE,
            "initiator": self.did,
            "responder": upstream.did,
            "request_id": new_event_id(),
            "requested_at": format_time(self.clock()),
        }
        return {"body": body, "signature": b64encode(self.key.sign(canonical_bytes(body)))}

    def answer_challenge(self, request: Request) -> Response:
        """Sign a handshake challenge addressed to this agent (and only such)."""
        try:
            to_sign = base64.b64decode(msgspec.json.decode(request.body)["to_sign"], validate=True)
            challenge = msgspec.json.decode(to_sign)
            expires = parse_time(challenge["expires_at"])
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            return _problem(
                400,
                "invalid-challenge",
                "Invalid challenge",
                'expected {"to_sign": base64 of an AgentMesh handshake challenge}',
            )
        if challenge.get("type") != CHALLENGE_TYPE or challenge.get("responder") != self.did:
            return _problem(
                403,
                "not-for-me",
                "Forbidden",
                "this sidecar only signs challenges addressed to its own agent",
            )
        if expires <= self.clock():
            return _problem(410, "expired", "Challenge expired", "the challenge has expired")
        body = {"did": self.did, "signature": b64encode(self.key.sign(to_sign))}
        return Response(200, [("content-type", "application/json")], msgspec.json.encode(body))

    # -- health ------------------------------------------------------------------------------------

    def health_problem(self) -> str | None:
        age = self.trust.age
        stale = self.policy.current.staleness_seconds
        if age is None:
            return f"no trust data yet ({self.trust.last_error or 'reading'})"
        if age > stale:
            return f"trust data is {age:.0f}s old (bound {stale:.0f}s): {self.trust.last_error}"
        if self.trust.registered is False:
            return f"agent {self.did} is not registered with the API (POST /v1/agents)"
        return None

    def health(self) -> Response:
        problem = self.health_problem()
        if problem is not None:
            return _problem(503, "unhealthy", "Not ready", problem)
        body = {
            "status": "healthy",
            "agent": self.did,
            "policy": self.policy.current.source,
            "mode": self.policy.current.mode,
            "outbox_depth": self.outbox.depth(),
        }
        return Response(200, [("content-type", "application/json")], msgspec.json.encode(body))

    def touch_health_file(self) -> None:
        if self.health_file is None:
            return
        with contextlib.suppress(OSError):
            self.health_file.parent.mkdir(parents=True, exist_ok=True)
            self.health_file.write_text(format_time(self.clock()) + "\n")

    def remove_health_file(self) -> None:
        if self.health_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.health_file.unlink()

    async def close(self) -> None:
        if self._visibility is not None:
            self._visibility.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._visibility
        for pool in self.pools.values():
            await pool.aclose()
        await self.egress_client.aclose()


async def _after(wait: Awaitable[None], verdict: dict[str, Any] | None) -> dict[str, Any] | None:
    await wait
    return verdict


def _pooled_client() -> httpx.AsyncClient:
    """The egress proxy's pooled client: connections are reused, never one per call.
    No read timeout: a response may stream for a long time."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=10.0, read=None, write=30.0, pool=30.0),
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
    )


def _problem(status: int, slug: str, title: str, detail: str) -> Response:
    body = {
        "type": f"https://agentmesh.dev/problems/{slug}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    return Response(
        status, [("content-type", "application/problem+json")], msgspec.json.encode(body)
    )
