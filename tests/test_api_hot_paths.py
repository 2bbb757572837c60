"""The API's hot paths (issue 15): the same answers as the general paths they shortcut.

* ``GET /v1/agents/{did}/trust`` is answered by ``api.fastlane.TrustReadLane``
  below Litestar's handler machinery, from ``projections.documents.TrustOnly``'s
  narrow decoding:
  byte for byte what the routed handler answers and what
  ``ProjectionReader.trust`` computes, for fresh, penalised, decayed and
  suspended agents; everything else falls through to the handler.
* Single-agent reads from Redis are merged into one script call per turn of the
  event loop: each reader still gets its own agent's document (or None), and a
  failing Redis reaches every one of them as ``ReadStoreError``.
* The metrics refresh reads every agent through the same narrow decoding and
  still gives the reader's scores and tiers.
* One signed report per ``POST /v1/violations`` or ``/v1/signals`` is appended
  by ``api.fastlane.SignedReportLane``: answered as the routed handler answers
  (201, a retry's duplicate, a replay's 409, a forgery's 422), and what it does
  not take (bad JSON, another event type, an admin call, an oversized body)
  goes to the handler with its body intact.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
import pytest
import rfc8785

from agentmesh.embedded import EmbeddedRedis, free_port
from agentmesh.wiring import trust_config
from api.metrics import HOLD_SECONDS, REQUEST_DURATION, MetricsServer, read_stats
from api.schemas import trust_out
from bench.metrics_refresh import agent_doc
from ledger.events import PolicyViolation, TrustSignal, new_event_id
from ledger.identity import b64encode
from ledger.timefmt import format_time, parse_time
from projections.config import TrustConfig
from projections.documents import Batch, Meta, decode_trust_only, stored_micros
from projections.readstore import ProjectionReader, ReadStoreError
from projections.store_redis import RedisProjectionStore
from projections.trust import to_micros
from tests.api_support import ADMIN, Api, signed


def _reader(api: Api) -> ProjectionReader:
    settings = api.settings
    assert settings.redis_host is not None
    store = RedisProjectionStore.connect(
        settings.redis_host, settings.redis_port, prefix=settings.redis_prefix
    )
    return ProjectionReader(store, trust_config(settings))


async def test_the_trust_fast_lane_answers_what_the_handler_and_the_reader_answer(
    api: Api,
) -> None:
    fresh, reporter, penalised, suspended = [await api.register() for _ in range(4)]
    report = PolicyViolation(
        actor=reporter.did,
        occurred_at=format_time(api.clock.now),
        agent=penalised.did,
        severity="high",
        rule="r",
    )
    posted = await api.client.post("/v1/violations", json=signed(report, reporter.key))
    assert posted.status_code == 201, posted.text
    await api.projected(penalised.did, posted.json()["position"])
    stopped = await api.client.post(f"/v1/agents/{suspended.did}/suspend", headers=ADMIN)
    await api.projected(suspended.did, stopped.json()["position"])
    api.clock.advance(hours=7, microseconds=123)  # decay due, at a moment with microseconds
    reader = _reader(api)
    try:
        for agent in (fresh, reporter, penalised, suspended):
            path = f"/v1/agents/{agent.did}/trust"
            lane = await api.client.get(path)
            # Any query string goes to the routed handler.
            routed = await api.client.get(path, params={"via": "handler"})
            view = await reader.trust(agent.did, api.clock.now)
            assert view is not None
            expected = msgspec.json.encode(trust_out(view, format_time(api.clock.now)))
            assert lane.status_code == routed.status_code == 200
            assert lane.content == routed.content == expected
            assert lane.headers["content-type"] == routed.headers["content-type"]
            assert lane.headers["content-length"] == routed.headers["content-length"]
        assert (await api.client.get(f"/v1/agents/{suspended.did}/trust")).json()[
            "tier"
        ] == "suspended"
    finally:
        await reader.store.close()


async def test_what_the_fast_lane_does_not_answer_the_handler_does(api: Api) -> None:
    unknown = "did:mesh:" + "0" * 32
    missing = await api.client.get(f"/v1/agents/{unknown}/trust")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    malformed = await api.client.get("/v1/agents/did:mesh:XYZ/trust")
    assert malformed.status_code == 400
    assert malformed.headers["content-type"] == "application/problem+json"
    agent = await api.register()
    at = await api.client.get(
        f"/v1/agents/{agent.did}/trust", params={"at": format_time(api.clock.now)}
    )
    assert at.status_code == 200
    assert at.json()["score"] == 800


async def test_the_agent_record_and_its_trust_come_from_one_read(api: Api) -> None:
    agent = await api.register(("tools:read",))
    both = (await api.client.get(f"/v1/agents/{agent.did}")).json()
    trust = (await api.client.get(f"/v1/agents/{agent.did}/trust")).json()
    assert both["agent"]["did"] == agent.did
    assert both["agent"]["capabilities"] == ["tools:read"]
    assert both["trust"] == trust


def test_stored_times_are_read_as_the_ledger_parser_reads_them() -> None:
    for text in (
        "2026-11-30T10:25:21.510599Z",
        "1970-01-01T00:00:00.000000Z",
        "0001-01-01T00:00:00.000001Z",
        "2026-11-30T10:25:21Z",  # not the canonical form: the general parser
        "2026-11-30T11:25:21.5+01:00",
    ):
        assert stored_micros(text) == to_micros(parse_time(text)), text


def _doc(did: str, index: int, status: str = "active") -> bytes:
    return agent_doc(did, index, status, detail="é" * (index % 7))


@pytest.fixture
async def redis_store(redis_server: EmbeddedRedis) -> AsyncIterator[RedisProjectionStore]:
    store = RedisProjectionStore.connect(
        redis_server.host, redis_server.port, prefix=f"hot{uuid.uuid4().hex[:8]}:"
    )
    yield store
    await store.flush_for_tests()
    await store.close()


def _batch(docs: dict[str, bytes]) -> Batch:
    meta = Meta(
        generation="g1",
        position=len(docs),
        recorded_at=None,
        registry_size=len(docs),
        updated_at="2026-11-30T00:00:00.000000Z",
        config={},
    )
    return Batch(agents=docs, grants={}, meta=meta)


async def test_concurrent_single_reads_each_get_their_own_document(
    redis_store: RedisProjectionStore,
) -> None:
    docs = {f"did:mesh:{i:032x}": _doc(f"did:mesh:{i:032x}", i) for i in range(50)}
    await redis_store.replace_all(_batch(docs))
    asked = [*docs, "did:mesh:" + "f" * 32, *list(docs)[:10]]  # an unknown one, repeats
    answers = await asyncio.gather(*(redis_store.agent_docs([did]) for did in asked))
    assert answers == [[docs.get(did)] for did in asked]
    # Several at once still go as one read.
    assert await redis_store.agent_docs(list(docs)[:3]) == [docs[d] for d in list(docs)[:3]]


async def test_a_failing_redis_reaches_every_merged_reader() -> None:
    store = RedisProjectionStore.connect("127.0.0.1", free_port(), prefix="gone:")
    try:
        results = await asyncio.gather(
            *(store.agent_docs([f"did:mesh:{i:032x}"]) for i in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(r, ReadStoreError) for r in results), results
    finally:
        await store.close()


async def test_a_full_scan_returns_every_document_exactly(
    redis_store: RedisProjectionStore,
) -> None:
    docs = {f"did:mesh:{i:032x}": _doc(f"did:mesh:{i:032x}", i) for i in range(2_345)}
    await redis_store.replace_all(_batch(docs))
    scanned = [doc async for doc in redis_store.all_agent_docs()]
    assert sorted(scanned) == sorted(docs.values())


async def test_the_metrics_refresh_gives_the_readers_scores_and_tiers(
    redis_store: RedisProjectionStore,
) -> None:
    docs = {f"did:mesh:{i:032x}": _doc(f"did:mesh:{i:032x}", i) for i in range(40)}
    suspended = "did:mesh:" + "e" * 32
    docs[suspended] = _doc(suspended, 3, status="suspended")
    await redis_store.replace_all(_batch(docs))
    reader = ProjectionReader(redis_store, TrustConfig())
    now = datetime(2026, 11, 30, 8, 30, 0, 250, tzinfo=UTC)
    stats = await read_stats(reader, now)
    views = [await reader.trust(did, now) for did in docs]
    active = [v.score for did, v in zip(docs, views, strict=True) if v and did != suspended]
    assert stats.mean_score == sum(active) / len(active)
    tiers = [v.tier for v in views if v]
    assert stats.tiers == {tier: tiers.count(tier) for tier in stats.tiers}
    assert stats.tiers["suspended"] == 1
    assert stats.violations["low"] == sum(
        decode_trust_only(d).trust.violations["low"] for d in docs.values()
    )


async def test_the_metrics_refresh_hands_the_interpreter_lock_over_within_its_bound(
    redis_store: RedisProjectionStore,
) -> None:
    """The refresh runs on a thread beside the API's loop: whatever a document costs,
    it hands the lock over once it has held it ``HOLD_SECONDS`` (documents cost
    30 µs each on the clock here; handing over every 64 held the loop ~2 ms)."""
    docs = {f"did:mesh:{i:032x}": _doc(f"did:mesh:{i:032x}", i) for i in range(500)}
    await redis_store.replace_all(_batch(docs))
    reader = ProjectionReader(redis_store, TrustConfig())
    now = datetime(2026, 11, 30, 8, 30, 0, 250, tzinfo=UTC)
    step, readings = 30e-6, [0]

    def clock() -> float:  # each reading is one more document's worth of time
        readings[0] += 1
        return readings[0] * step

    handed: list[float] = []
    stats = await read_stats(reader, now, lambda: handed.append(readings[0] * step), clock)
    assert stats == await read_stats(reader, now)  # the hand-overs change no figure
    spans = [b - a for a, b in zip([0.0, *handed], handed, strict=False)]
    assert len(handed) >= 500 * step / (HOLD_SECONDS + 2 * step)
    assert max(spans) <= HOLD_SECONDS + 2 * step


def test_a_refresh_of_a_large_registry_waits_longer() -> None:
    server = MetricsServer(0, make_reader=None, clock=datetime.now)  # type: ignore[arg-type]
    assert server.pause(0.01) == 5.0  # the interval
    assert server.pause(0.9) == pytest.approx(22.5)  # 25 times the CPU it took


# -- one signed report per request: api.fastlane.SignedReportLane ----------------------

_HANDLER = {"content-type": "application/json; charset=utf-8"}  # not the lane's: the handler


async def _both(api: Api, path: str, body: bytes) -> tuple[httpx.Response, httpx.Response]:
    """The same request through the lane (``application/json``) and the handler."""
    lane = await api.client.post(path, content=body, headers={"content-type": "application/json"})
    routed = await api.client.post(path, content=body, headers=_HANDLER)
    return lane, routed


def _same_problem(lane: httpx.Response, routed: httpx.Response, status: int | None) -> None:
    assert lane.status_code == routed.status_code, (lane.text, routed.text)
    assert lane.status_code == status if status else 400 <= lane.status_code < 500
    assert lane.headers["content-type"] == routed.headers["content-type"]
    assert lane.content == routed.content


async def test_signed_reports_through_the_lane_are_answered_as_the_handler_answers(
    api: Api,
) -> None:
    reporter, subject, stranger = [await api.register() for _ in range(3)]
    now = format_time(api.clock.now)

    def report(path: str) -> PolicyViolation | TrustSignal:
        if path == "/v1/violations":
            return PolicyViolation(
                actor=reporter.did, occurred_at=now, agent=subject.did, severity="low", rule="r"
            )
        return TrustSignal(actor=reporter.did, occurred_at=now, agent=subject.did, signal="good")

    for path in ("/v1/violations", "/v1/signals"):
        # Appended, then retried with its key: the original position, duplicate.
        body = msgspec.json.encode(signed(report(path), reporter.key, idempotency_key=path))
        lane, routed = await _both(api, path, body)
        assert lane.status_code == routed.status_code == 201, (lane.text, routed.text)
        assert lane.headers["content-type"] == routed.headers["content-type"]
        first, again = lane.json(), routed.json()
        assert again == {**first, "duplicate": True}
        assert sorted(first) == ["duplicate", "position", "stream_id", "stream_version"]
        # Each through its own path, a fresh report appends.
        for headers in ({"content-type": "application/json"}, _HANDLER):
            fresh = msgspec.json.encode(signed(report(path), reporter.key))
            answer = await api.client.post(path, content=fresh, headers=headers)
            assert answer.status_code == 201
            assert not answer.json()["duplicate"]
        # A replayed body (no key) is refused alike.
        replayed = msgspec.json.encode(signed(report(path), reporter.key))
        assert (await api.client.post(path, content=replayed, headers=_HANDLER)).status_code == 201
        _same_problem(*await _both(api, path, replayed), 409)
        # Signed by a key that is not the actor's: 422 alike, nothing appended.
        forged = msgspec.json.encode(signed(report(path), stranger.key))
        head = await api.head()
        _same_problem(*await _both(api, path, forged), 422)
        assert await api.head() == head
    other = msgspec.json.encode(signed(report("/v1/signals"), reporter.key))
    for bad in (b"{", b"[]", b'{"body": {}, "signature": "x"}', other):  # the handler's 4xx
        _same_problem(*await _both(api, "/v1/violations", bad), None)
    too_big = b'{"body": {}, "signature": "' + b"A" * (3 * 1024 * 1024) + b'"}'
    _same_problem(*await _both(api, "/v1/violations", too_big), 413)
    admin = msgspec.json.encode({"agent": subject.did, "severity": "low", "rule": "r"})
    for headers in ({"content-type": "application/json"}, _HANDLER):
        unauthorised = await api.client.post("/v1/violations", content=admin, headers=headers)
        assert unauthorised.status_code == 401
        answer = await api.client.post(
            "/v1/violations", content=admin, headers={**headers, **ADMIN}
        )
        assert answer.status_code == 201, answer.text


async def test_a_report_signed_over_the_reference_encoding_is_taken_through_both_paths(
    api: Api,
) -> None:
    """The client signs ``rfc8785.dumps`` of its body (any JCS library would do); the
    server's canonical bytes, which come from the C encoder for plain values, are the
    same bytes, so the signature verifies: escapes, non-ASCII text, characters beyond
    the BMP, and members in the client's own order."""
    reporter, subject = await api.register(), await api.register()
    detail = 'quote " backslash \\ tab \t nl \n ctl \x01\x1f del \x7f é \u2028 \ufeff \U0001f600'
    for path, headers in (
        ("/v1/violations", {"content-type": "application/json"}),  # the lane
        ("/v1/violations", _HANDLER),
        ("/v1/signals", {"content-type": "application/json"}),
        ("/v1/signals", _HANDLER),
    ):
        body: dict[str, Any] = {
            "detail": detail,
            "agent": subject.did,
            "type": "policy.violation" if path == "/v1/violations" else "trust.signal",
            "occurred_at": format_time(api.clock.now),
            "event_id": new_event_id(),
            "actor": reporter.did,
        }
        body.update(
            {"severity": "high", "rule": "r/é"} if path == "/v1/violations" else {"signal": "ok"}
        )
        signature = b64encode(reporter.key.sign(rfc8785.dumps(body)))
        raw = msgspec.json.encode({"body": body, "signature": signature})
        answer = await api.client.post(path, content=raw, headers=headers)
        assert answer.status_code == 201, answer.text
        events = await api.client.get(
            "/v1/ledger/events",
            params={"after": answer.json()["position"] - 1, "limit": 1},
            headers=ADMIN,
        )
        (stored,) = events.json()["items"]
        assert stored["body"] == body
        assert stored["signature"] == signature


def _timed(route: str, status: str) -> float:
    """How many ``POST route`` answers with ``status`` the request histogram counted."""
    labels = {"method": "POST", "route": route, "status": status}
    (metric,) = REQUEST_DURATION.collect()
    found = [m.value for m in metric.samples if m.name.endswith("_count") and m.labels == labels]
    return found[0] if found else 0.0


async def test_the_lanes_answers_are_timed_by_route_template(api: Api) -> None:
    """``TelemetryMiddleware`` times every answer, the lane's and the handler's refusals
    alike, by route template — with no tracer provider configured, when it starts no
    span."""
    reporter, subject = await api.register(), await api.register()
    event = PolicyViolation(
        actor=reporter.did,
        occurred_at=format_time(api.clock.now),
        agent=subject.did,
        severity="low",
        rule="r",
    )
    body = msgspec.json.encode(signed(event, reporter.key))
    appended, refused = _timed("/v1/violations", "201"), _timed("/v1/violations", "409")
    lane = {"content-type": "application/json"}
    assert (await api.client.post("/v1/violations", content=body, headers=lane)).status_code == 201
    assert (await api.client.post("/v1/violations", content=body, headers=lane)).status_code == 409
    assert _timed("/v1/violations", "201") == appended + 1
    assert _timed("/v1/violations", "409") == refused + 1
