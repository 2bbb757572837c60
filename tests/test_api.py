"""The API over real HTTP, against real PostgreSQL and Redis, with a real projector."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from agentmesh.embedded import EmbeddedRedis
from api import routes
from ledger.canonical import canonical_bytes
from ledger.events import AgentKeyRotated, DelegationGranted, DelegationRevoked, PolicyViolation
from ledger.identity import SigningKey, b64encode
from ledger.timefmt import format_time
from projections.history import FoldLimits, state_at
from tests.api_support import (
    ADMIN,
    Api,
    api_settings,
    handshake_request,
    running_api,
    signed,
    signed_rotation,
)
from tests.support import Agent


@pytest.fixture
async def api(
    database_url: str, redis_server: EmbeddedRedis, ledger_key: SigningKey
) -> AsyncIterator[Api]:
    settings = api_settings(
        database_url, redis_server, ledger_key, AGENTMESH_DELEGATION_MAX_DEPTH="3"
    )
    async with running_api(settings) as running:
        yield running


def rotation_to(api: Api, agent: Agent, new_key: SigningKey) -> AgentKeyRotated:
    """The agent's key rotation to ``new_key``, now (unsigned)."""
    return AgentKeyRotated(
        actor=agent.did,
        occurred_at=format_time(api.clock.now),
        did=agent.did,
        public_key=new_key.public.pem(),
    )


def is_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert {"type", "title", "detail"} <= set(body)
    return body


async def handshake(
    api: Api,
    initiator: Agent,
    responder: Agent,
    key: SigningKey | None = None,
    min_score: int | None = None,
) -> tuple[str, dict[str, Any]]:
    request = handshake_request(initiator, responder.did, api.clock.now, min_score)
    started = await api.client.post("/v1/handshakes", json=request)
    assert started.status_code == 201, started.text
    challenge = started.json()
    message = base64.b64decode(challenge["to_sign"])
    signature = b64encode((key or responder.key).sign(message))
    answer = await api.client.post(
        f"/v1/handshakes/{challenge['handshake_id']}/response", json={"signature": signature}
    )
    assert answer.status_code == 200, answer.text
    return challenge["handshake_id"], answer.json()


# -- health, probes, openapi ---------------------------------------------------------------


async def test_health_and_ready_bodies_match_the_guide(api: Api) -> None:
    health = await api.client.get("/health")
    assert (health.status_code, health.json()) == (200, {"status": "healthy"})
    ready = await api.client.get("/ready")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    schema = await api.client.get("/schema/openapi.json")
    assert schema.status_code == 200
    assert "/v1/agents/{did}/trust" in schema.json()["paths"]


# -- auth -------------------------------------------------------------------------------------


async def test_admin_calls_need_the_token_and_append_nothing_without_it(api: Api) -> None:
    head = await api.head()
    agent = Agent()
    body = {"public_key": agent.key.public.pem()}
    await api.register()  # the registry is no longer empty: no bootstrap
    head = await api.head()
    is_problem(await api.client.post("/v1/agents", json=body), 401)
    is_problem(
        await api.client.post("/v1/agents", json=body, headers={"Authorization": "Bearer wrong"}),
        403,
    )
    is_problem(await api.client.get("/v1/ledger/events"), 401)
    assert await api.head() == head


async def test_first_agent_bootstraps_with_proof_of_possession(api: Api) -> None:
    agent = Agent()
    pem = agent.key.public.pem()
    bad = b64encode(SigningKey.generate().sign(b"x"))
    is_problem(
        await api.client.post(
            "/v1/agents", json={"public_key": pem}, headers={"X-Registration-Proof": bad}
        ),
        403,
    )
    proof = b64encode(
        agent.key.sign(canonical_bytes({"type": "agentmesh.registration", "public_key": pem}))
    )
    first = await api.client.post(
        "/v1/agents", json={"public_key": pem}, headers={"X-Registration-Proof": proof}
    )
    assert first.status_code == 201, first.text
    await api.projected(agent.did)
    second = Agent()
    pem2 = second.key.public.pem()
    proof2 = b64encode(
        second.key.sign(canonical_bytes({"type": "agentmesh.registration", "public_key": pem2}))
    )
    is_problem(
        await api.client.post(
            "/v1/agents", json={"public_key": pem2}, headers={"X-Registration-Proof": proof2}
        ),
        403,
    )


async def test_body_limit_is_413(api: Api) -> None:
    is_problem(
        await api.client.post(
            "/v1/reports:batch",
            content=b"x" * (3 * 1024 * 1024),
            headers={"content-type": "application/json"},
        ),
        413,
    )


# -- agents and trust ---------------------------------------------------------------------


async def test_registry_listing_trust_and_events(api: Api) -> None:
    alice, bob = await api.register(("tools:*",)), await api.register()
    listing = (await api.client.get("/v1/agents", params={"limit": 1})).json()
    assert len(listing["items"]) == 1
    assert listing["next_cursor"]
    rest = (await api.client.get("/v1/agents", params={"cursor": listing["next_cursor"]})).json()
    dids = {listing["items"][0]["agent"]["did"], *(i["agent"]["did"] for i in rest["items"])}
    assert dids == {alice.did, bob.did}
    trust = await api.projected(alice.did)
    assert (trust["score"], trust["tier"]) == (800, "trusted")
    assert trust["decay"]["rate_per_hour"] == 2.0
    one = (await api.client.get(f"/v1/agents/{alice.did}")).json()
    assert one["agent"]["capabilities"] == ["tools:*"]
    events = (await api.client.get(f"/v1/agents/{alice.did}/events")).json()
    assert [e["type"] for e in events["items"]] == ["agent.registered"]
    is_problem(await api.client.get("/v1/agents/did:mesh:" + "0" * 32), 404)
    is_problem(await api.client.get("/v1/agents/not-a-did/trust"), 400)
    is_problem(await api.client.get("/v1/agents", params={"tier": "legendary"}), 400)


async def test_an_agents_events_page_by_page_and_bad_pages(api: Api) -> None:
    """``GET /v1/agents/{did}/events`` needs no credential: its first page and the next
    ones (planned differently: ``ledger.postgres.reader``) give the agent's entries in
    order, once each; a malformed DID or bound is a 400 and reads nothing."""
    agent, other = await api.register(), await api.register()
    for index in range(3):
        for actor in (agent, other):
            event = PolicyViolation(
                actor=actor.did,
                occurred_at=format_time(api.clock.now),
                agent=actor.did,
                severity="low",
                rule=f"r-{index}",
            )
            response = await api.client.post(
                "/v1/violations", json=signed(event, actor.key, f"e-{actor.did}-{index}")
            )
            assert response.status_code == 201, response.text
    whole = (await api.client.get(f"/v1/agents/{agent.did}/events")).json()
    assert [e["type"] for e in whole["items"]] == ["agent.registered"] + ["policy.violation"] * 3
    assert whole["next_after"] is None
    paged, after = [], 0
    while after is not None:
        page = (
            await api.client.get(
                f"/v1/agents/{agent.did}/events", params={"after": after, "limit": 2}
            )
        ).json()
        paged += page["items"]
        after = page["next_after"]
    assert paged == whole["items"]
    head = await api.head()
    for params in ({"after": -1}, {"limit": 0}, {"limit": 1001}, {"after": "x"}):
        is_problem(await api.client.get(f"/v1/agents/{agent.did}/events", params=params), 400)
    is_problem(await api.client.get("/v1/agents/not-a-did/events"), 400)
    assert await api.head() == head


async def test_violations_lower_a_score_across_a_tier(api: Api) -> None:
    reporter, subject = await api.register(), await api.register()
    for index in range(2):  # reported by the agent's own sidecar: full weight
        event = PolicyViolation(
            actor=subject.did,
            occurred_at=format_time(api.clock.now),
            agent=subject.did,
            severity="high",
            rule="exfiltration",
        )
        response = await api.client.post(
            "/v1/violations", json=signed(event, subject.key, f"v-{index}")
        )
        assert response.status_code == 201, response.text
    position = response.json()["position"]
    trust = await api.projected(subject.did, position)
    assert (trust["score"], trust["tier"]) == (600, "standard")
    assert trust["components"]["violations"]["high"] == 2
    listed = (await api.client.get("/v1/agents", params={"tier": "standard"})).json()
    assert [i["agent"]["did"] for i in listed["items"]] == [subject.did]
    # Admin report (ledger-signed) and a forged one (rejected, nothing appended).
    admin = await api.client.post(
        "/v1/violations",
        headers=ADMIN,
        json={"agent": subject.did, "severity": "low", "rule": "noise"},
    )
    assert admin.status_code == 201
    head = await api.head()
    forged = signed(
        PolicyViolation(
            actor=reporter.did,
            occurred_at=format_time(api.clock.now),
            agent=subject.did,
            severity="critical",
            rule="x",
        ),
        SigningKey.generate(),
    )
    is_problem(await api.client.post("/v1/violations", json=forged), 422)
    is_problem(await api.client.post("/v1/violations", json={"agent": subject.did}), 401)
    assert await api.head() == head


async def test_time_travel_answers_for_past_moments(api: Api) -> None:
    reporter, subject = await api.register(), await api.register()
    before = api.clock.now
    api.clock.advance(hours=10)
    event = PolicyViolation(
        actor=subject.did,
        occurred_at=format_time(api.clock.now),
        agent=subject.did,
        severity="medium",
        rule="r",
    )
    position = (await api.client.post("/v1/violations", json=signed(event, subject.key))).json()[
        "position"
    ]
    # A peer's report counts by the peer's standing (780 after 10 h of decay): 50 x 0.78.
    peer = PolicyViolation(
        actor=reporter.did,
        occurred_at=format_time(api.clock.now),
        agent=subject.did,
        severity="medium",
        rule="r",
    )
    position = (await api.client.post("/v1/violations", json=signed(peer, reporter.key))).json()[
        "position"
    ]
    await api.projected(subject.did, position)
    past = (
        await api.client.get(
            f"/v1/agents/{subject.did}/trust",
            params={"at": format_time(before + timedelta(hours=5))},
        )
    ).json()
    assert past["score"] == 790  # 800 - 5 h x 2/h, before the violation
    now = (await api.client.get(f"/v1/agents/{subject.did}/trust")).json()
    assert now["score"] == 800 - 20 - 50 - 39
    at_now = {"at": format_time(api.clock.now)}
    folded = (await api.client.get(f"/v1/agents/{subject.did}/trust", params=at_now)).json()
    assert folded["score"] == now["score"]
    is_problem(
        await api.client.get(
            f"/v1/agents/{subject.did}/trust",
            params={"at": format_time(before - timedelta(days=1))},
        ),
        404,
    )
    is_problem(
        await api.client.get(f"/v1/agents/{subject.did}/trust", params={"at": "yesterday"}), 400
    )


async def _reported_by_four(api: Api) -> Agent:
    """An agent four peers reported on: its ``?at=`` closure holds five agents."""
    subject = await api.register()
    position = 0
    for _ in range(4):
        reporter = await api.register()
        event = reporter.violation(subject.did, "low", at=api.clock.now).event
        answer = await api.client.post("/v1/violations", json=signed(event, reporter.key))
        position = answer.json()["position"]
    await api.projected(subject.did, position)
    return subject


async def test_time_travel_is_bounded_per_request(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone may ask ``?at=``, and its fold reads the agent's reporters transitively
    (a whole ledger, in a dense mesh): past the per-request limits it is refused with
    a 422 naming the offline replay, before folding anything, and changes nothing."""
    subject = await _reported_by_four(api)
    at = {"at": format_time(api.clock.now)}
    path = f"/v1/agents/{subject.did}/trust"
    live = (await api.client.get(path)).json()
    head = await api.head()
    monkeypatch.setattr(routes, "AT_LIMITS", FoldLimits(events=10_000, agents=3))
    too_wide = is_problem(await api.client.get(path, params=at), 422)
    assert too_wide["type"].endswith("/fold-too-large")
    assert "more than 3 agents" in too_wide["detail"]
    assert f"agentmesh replay agent {subject.did}" in too_wide["detail"]
    monkeypatch.setattr(routes, "AT_LIMITS", FoldLimits(events=4, agents=100))  # it has 5
    too_long = is_problem(await api.client.get(path, params=at), 422)
    assert "ledger entries" in too_long["detail"]
    assert await api.head() == head
    monkeypatch.setattr(routes, "AT_LIMITS", FoldLimits(events=100, agents=5))  # just enough
    folded = await api.client.get(path, params=at)
    assert folded.status_code == 200, folded.text
    assert folded.json()["score"] == live["score"]


async def test_one_time_travel_fold_at_a_time_per_process(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second ``?at=`` waits for the first fold; if it waits too long it gets a 503
    with Retry-After, and the slot is free again once the first answers."""
    subject = await _reported_by_four(api)
    at = {"at": format_time(api.clock.now)}
    path = f"/v1/agents/{subject.did}/trust"
    entered, gate = asyncio.Event(), asyncio.Event()
    fold = state_at  # the real fold, which the held one calls

    async def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await gate.wait()
        return await fold(*args, **kwargs)

    monkeypatch.setattr(routes, "state_at", held)
    monkeypatch.setattr(routes, "AT_WAIT_SECONDS", 0.2)
    first = asyncio.create_task(api.client.get(path, params=at))
    await asyncio.wait_for(entered.wait(), 10)
    busy = await api.client.get(path, params=at)
    assert is_problem(busy, 503)["type"].endswith("/busy")
    assert busy.headers["retry-after"] == "1"
    gate.set()
    assert (await first).status_code == 200
    assert (await api.client.get(path, params=at)).status_code == 200


async def test_suspend_reinstate_and_key_rotation(api: Api) -> None:
    agent = await api.register()
    suspended = await api.client.post(
        f"/v1/agents/{agent.did}/suspend", headers=ADMIN, json={"reason": "incident 42"}
    )
    assert suspended.status_code == 200
    trust = await api.projected(agent.did, suspended.json()["position"])
    assert trust["tier"] == "suspended"
    back = await api.client.post(f"/v1/agents/{agent.did}/reinstate", headers=ADMIN, json={})
    assert (await api.projected(agent.did, back.json()["position"]))["tier"] == "trusted"
    new_key = SigningKey.generate()
    rotation = rotation_to(api, agent, new_key)
    forged = signed_rotation(rotation, new_key, new_key)  # not signed by the current key
    is_problem(await api.client.post(f"/v1/agents/{agent.did}/keys", json=forged), 422)
    unproven = signed(rotation, agent.key)  # no proof of the new key
    is_problem(await api.client.post(f"/v1/agents/{agent.did}/keys", json=unproven), 422)
    both = signed_rotation(rotation, agent.key, new_key)
    ok = await api.client.post(f"/v1/agents/{agent.did}/keys", json=both)
    assert ok.status_code == 200, ok.text


# -- handshakes ----------------------------------------------------------------------------


async def test_handshakes_both_ways_and_every_failure(api: Api) -> None:
    alice, bob = await api.register(), await api.register()
    _, result = await handshake(api, alice, bob)
    assert result["verified"] is True
    assert result["responder"] == {"did": bob.did, "score": 800, "tier": "trusted"}
    _, back = await handshake(api, bob, alice)
    assert back["verified"] is True
    _, bad = await handshake(api, alice, bob, key=SigningKey.generate())
    assert (bad["verified"], bad["reason"]) == (False, "bad_signature")
    # A nonce works once (an admin may start a handshake too).
    pair = {"initiator": alice.did, "responder": bob.did}
    started = (await api.client.post("/v1/handshakes", json=pair, headers=ADMIN)).json()
    signature = b64encode(bob.key.sign(base64.b64decode(started["to_sign"])))
    path = f"/v1/handshakes/{started['handshake_id']}/response"
    assert (await api.client.post(path, json={"signature": signature})).json()["verified"]
    replay = (await api.client.post(path, json={"signature": signature})).json()
    assert (replay["verified"], replay["reason"]) == (False, "nonce_reused")
    # Expired challenge.
    started = (await api.client.post("/v1/handshakes", json=pair, headers=ADMIN)).json()
    api.clock.advance(seconds=31)
    late = await api.client.post(
        f"/v1/handshakes/{started['handshake_id']}/response",
        json={"signature": b64encode(bob.key.sign(base64.b64decode(started["to_sign"])))},
    )
    assert late.json()["reason"] == "expired"
    # Score threshold and min_score.
    _, picky = await handshake(api, alice, bob, min_score=950)
    assert picky["reason"] == "score_too_low"
    # Suspended responder.
    response = await api.client.post(f"/v1/agents/{bob.did}/suspend", headers=ADMIN, json={})
    await api.projected(bob.did, response.json()["position"])
    _, suspended = await handshake(api, alice, bob)
    assert suspended["reason"] == "responder_suspended"
    events = (
        await api.client.get("/v1/ledger/events", headers=ADMIN, params={"limit": 1000})
    ).json()["items"]
    outcomes = [
        (e["type"], e["body"].get("reason")) for e in events if e["type"].startswith("handshake.")
    ]
    assert outcomes == [
        ("handshake.completed", None),
        ("handshake.completed", None),
        ("handshake.failed", "bad_signature"),
        ("handshake.completed", None),
        ("handshake.failed", "nonce_reused"),
        ("handshake.failed", "expired"),
        ("handshake.failed", "score_too_low"),
        ("handshake.failed", "responder_suspended"),
    ]
    is_problem(
        await api.client.post("/v1/handshakes/hs_nope/response", json={"signature": "AA=="}), 400
    )
    unknown = "/v1/handshakes/hs_" + "0" * 24 + "/response"
    is_problem(await api.client.post(unknown, json={"signature": "AA=="}), 404)


async def test_low_score_fails_handshakes(api: Api) -> None:
    reporter, subject = await api.register(), await api.register()
    for index in range(2):
        event = PolicyViolation(
            actor=subject.did,
            occurred_at=format_time(api.clock.now),
            agent=subject.did,
            severity="critical",
            rule="r",
            detail=str(index),
        )
        position = (
            await api.client.post("/v1/violations", json=signed(event, subject.key))
        ).json()["position"]
    assert (await api.projected(subject.did, position))["score"] == 200
    _, result = await handshake(api, reporter, subject)
    assert (result["verified"], result["reason"]) == (False, "score_too_low")


async def test_shadow_mode_answers_verified_but_records_the_failure(
    database_url: str, redis_server: EmbeddedRedis, ledger_key: SigningKey
) -> None:
    settings = api_settings(
        database_url, redis_server, ledger_key, AGENTMESH_GOVERNANCE_SHADOW_MODE="true"
    )
    async with running_api(settings) as api:
        alice, bob = await api.register(), await api.register()
        _, result = await handshake(api, alice, bob, key=SigningKey.generate())
        assert (result["verified"], result["shadow"], result["reason"]) == (
            True,
            True,
            "bad_signature",
        )
        events = (await api.client.get("/v1/ledger/events", headers=ADMIN)).json()["items"]
        assert events[-1]["type"] == "handshake.failed"
        assert events[-1]["body"]["shadow"] is True


# -- reports batch ---------------------------------------------------------------------------


async def test_report_batch_is_idempotent_per_report(api: Api) -> None:
    reporter, subject = await api.register(), await api.register()

    def report(index: int, key: SigningKey | None = None) -> dict[str, Any]:
        event = PolicyViolation(
            actor=reporter.did,
            occurred_at=format_time(api.clock.now),
            agent=subject.did,
            severity="low",
            rule="r",
            detail=str(index),
        )
        return signed(event, key or reporter.key, f"batch-{index}")

    reports = [report(i) for i in range(5)] + [report(99, SigningKey.generate())]
    first = (await api.client.post("/v1/reports:batch", json={"reports": reports})).json()
    assert (first["appended"], first["duplicates"], first["rejected"]) == (5, 0, 1)
    assert first["results"][5]["status"] == "rejected"
    head = await api.head()
    again = (await api.client.post("/v1/reports:batch", json={"reports": reports[:5]})).json()
    assert (again["appended"], again["duplicates"]) == (0, 5)
    assert [r["position"] for r in again["results"]] == [
        r["position"] for r in first["results"][:5]
    ]
    assert await api.head() == head
    no_key = dict(reports[0])
    del no_key["idempotency_key"]
    third = (await api.client.post("/v1/reports:batch", json={"reports": [no_key]})).json()
    assert third["results"][0]["error"].startswith("every report")
    is_problem(await api.client.post("/v1/reports:batch", json={"reports": []}), 400)


# -- delegations -----------------------------------------------------------------------------


async def test_delegation_chains_and_their_rejections(api: Api) -> None:
    root = await api.register(("tools:*", "http:get"))
    mid, leaf, extra = await api.register(), await api.register(), await api.register()

    def grant(
        gid: str, by: Agent, to: Agent, caps: tuple[str, ...], parent: str | None = None
    ) -> dict[str, Any]:
        event = DelegationGranted(
            actor=by.did,
            occurred_at=format_time(api.clock.now),
            grant_id=gid,
            delegator=by.did,
            delegatee=to.did,
            capabilities=caps,
            parent=parent,
        )
        return signed(event, by.key)

    one = await api.client.post(
        "/v1/delegations", json=grant("grant-0001", root, mid, ("tools:*",))
    )
    assert one.status_code == 201, one.text
    assert one.json()["depth"] == 1
    await api.projected(mid.did, one.json()["position"])
    widening = await api.client.post(
        "/v1/delegations",
        json=grant("grant-0002", mid, leaf, ("tools:*", "http:get"), parent="grant-0001"),
    )
    assert is_problem(widening, 422)["reason"] == "widening"
    two = await api.client.post(
        "/v1/delegations",
        json=grant("grant-0003", mid, leaf, ("tools:search",), parent="grant-0001"),
    )
    assert two.json()["depth"] == 2
    await api.projected(leaf.did, two.json()["position"])
    three = await api.client.post(
        "/v1/delegations",
        json=grant("grant-0004", leaf, extra, ("tools:search",), parent="grant-0003"),
    )
    assert three.json()["depth"] == 3
    await api.projected(extra.did, three.json()["position"])
    too_deep = await api.client.post(
        "/v1/delegations",
        json=grant("grant-0005", extra, mid, ("tools:search",), parent="grant-0004"),
    )
    assert is_problem(too_deep, 422)["reason"] == "too_deep"
    caps = (await api.client.get(f"/v1/agents/{extra.did}/capabilities")).json()
    assert caps["capabilities"] == ["tools:search"]
    chain = (await api.client.get("/v1/delegations/grant-0004")).json()
    assert [link["grant_id"] for link in chain["chain"]] == [
        "grant-0004",
        "grant-0003",
        "grant-0001",
    ]
    assert chain["valid"]
    assert all(link["active"] for link in chain["chain"])
    # Revoking the middle link revokes everything below it.
    revocation = DelegationRevoked(
        actor=mid.did, occurred_at=format_time(api.clock.now), grant_id="grant-0003", reason="done"
    )
    revoked = await api.client.request(
        "DELETE", "/v1/delegations/grant-0003", json=signed(revocation, mid.key)
    )
    assert revoked.status_code == 200, revoked.text
    assert sorted(revoked.json()["revoked"]) == ["grant-0003", "grant-0004"]
    await api.projected(extra.did, revoked.json()["position"])
    assert (await api.client.get(f"/v1/agents/{extra.did}/capabilities")).json()[
        "capabilities"
    ] == []
    under_revoked = await api.client.post(
        "/v1/delegations",
        json=grant("grant-0006", leaf, extra, ("tools:search",), parent="grant-0003"),
    )
    assert is_problem(under_revoked, 422)["reason"] == "revoked_parent"
    admin = await api.client.delete("/v1/delegations/grant-0001", headers=ADMIN)
    assert admin.status_code == 200
    is_problem(await api.client.delete("/v1/delegations/grant-0001"), 401)
    is_problem(await api.client.get("/v1/delegations/grant-none"), 404)
    # Each link is checked against its delegator's key when it granted (not now): after
    # mid rotates its key, grant-0003 (signed with mid's old key) still verifies.
    new_key = SigningKey.generate()
    rotation = rotation_to(api, mid, new_key)
    rotated = await api.client.post(
        f"/v1/agents/{mid.did}/keys", json=signed_rotation(rotation, mid.key, new_key)
    )
    assert rotated.status_code == 200, rotated.text
    await api.projected(mid.did, rotated.json()["position"])
    after = (await api.client.get("/v1/delegations/grant-0004")).json()
    assert after["valid"], after
    assert all(link["signature_verified"] for link in after["chain"])


# -- ledger ---------------------------------------------------------------------------------


async def test_ledger_head_checkpoint_and_events(api: Api) -> None:
    await api.register()
    head = (await api.client.get("/v1/ledger/head")).json()
    checkpoint = (await api.client.get("/v1/ledger/checkpoints/latest")).json()
    assert checkpoint["position"] <= head["position"]
    key = SigningKey.from_pem(api.settings.agent_private_key_pem or "")
    assert checkpoint["ledger_public_key"] == key.public.pem()
    assert key.public.is_valid(
        base64.b64decode(checkpoint["signature"]), base64.b64decode(checkpoint["signed_bytes"])
    )
    events = (
        await api.client.get("/v1/ledger/events", headers=ADMIN, params={"after": 0, "limit": 1})
    ).json()
    assert events["items"][0]["position"] == 1
    assert events["next_after"] == 1
