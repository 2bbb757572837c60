"""The attacker's tests: nobody moves a score except as the trust model says.

Each test is one way to move a score or a record that the trust model forbids
(README, "Trust model"), tried against a real stack: PostgreSQL, Redis, the API
over HTTP and its projector. Each asserts the answer *and* that nothing moved:
the ledger head, and the scores of everyone involved.
"""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentmesh.embedded import EmbeddedRedis
from ledger.authority import single_use_day
from ledger.canonical import canonical_bytes
from ledger.events import AgentKeyRotated, DelegationGranted, PolicyViolation, TrustSignal
from ledger.identity import b64encode
from ledger.timefmt import _parse_general, format_time, parse_time
from projections.store_redis import RedisProjectionStore
from tests.api_support import ADMIN, Api, handshake_request, signed
from tests.support import FORGERY, IDENTITY, SMALL_ORDER, Agent, pem_of

PROBLEM = "application/problem+json"


async def scores(api: Api, *agents: Agent) -> list[int]:
    """Every agent's score once the projection has caught up with the ledger head,
    checked against the same moment folded straight from the ledger (``?at=``)."""
    head = await api.head()
    store = RedisProjectionStore.connect(
        api.settings.require_redis_host(), api.settings.redis_port, prefix=api.settings.redis_prefix
    )
    try:
        for _ in range(500):
            meta = await store.meta()
            if meta is not None and meta.position >= head:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"the projection never reached position {head}")
    finally:
        await store.close()
    found = []
    at = format_time(api.clock.now)
    for agent in agents:
        live = (await api.client.get(f"/v1/agents/{agent.did}/trust")).json()["score"]
        folded = await api.client.get(f"/v1/agents/{agent.did}/trust", params={"at": at})
        assert folded.json()["score"] == live, (live, folded.json())
        found.append(live)
    return found


async def unchanged(api: Api, *agents: Agent) -> tuple[int, list[int]]:
    return await api.head(), await scores(api, *agents)


def refused(response: Any, status: int, match: str = "") -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    assert match.lower() in response.json()["detail"].lower(), response.json()


def violation(reporter: Agent, about: Agent, severity: str = "critical", **extra: Any) -> Any:
    event = PolicyViolation(
        actor=reporter.did,
        occurred_at=format_time(_now()),
        agent=about.did,
        severity=severity,  # type: ignore[arg-type]
        rule="attack",
        **extra,
    )
    return signed(event, reporter.key)


def trust_signal(reporter: Agent, about: Agent) -> Any:
    event = TrustSignal(
        actor=reporter.did, occurred_at=format_time(_now()), agent=about.did, signal="good"
    )
    return signed(event, reporter.key)


_CLOCK: list[Any] = []


def _now() -> Any:
    return _CLOCK[0]()


@pytest.fixture(autouse=True)
def _bind_clock(api: Api) -> None:
    _CLOCK[:] = [lambda: api.clock.now]


# -- 1. replays ------------------------------------------------------------------------


async def test_a_replayed_report_is_refused_and_appends_nothing(api: Api) -> None:
    victim, reporter = await api.register(), await api.register()
    first = await api.client.post("/v1/violations", json=violation(reporter, victim, "low"))
    assert first.status_code == 201, first.text
    before = await unchanged(api, victim, reporter)
    # The attacker reads the signed report from the public event feed...
    feed = (await api.client.get(f"/v1/agents/{victim.did}/events")).json()["items"]
    report = next(e for e in feed if e["type"] == "policy.violation")
    replay = {"body": report["body"], "signature": report["signature"]}
    # ...and posts it again, alone, with fresh idempotency keys, and in a batch.
    for attempt in range(3):
        again = await api.client.post(
            "/v1/violations", json={**replay, "idempotency_key": f"fresh-{attempt}"}
        )
        refused(again, 409, "already in the ledger")
    batch = await api.client.post(
        "/v1/reports:batch", json={"reports": [{**replay, "idempotency_key": "fresh-batch"}]}
    )
    assert batch.status_code == 200
    assert batch.json()["results"][0]["status"] == "rejected"
    assert "already in the ledger" in batch.json()["results"][0]["error"]
    assert await unchanged(api, victim, reporter) == before


async def test_a_body_without_an_event_id_or_with_a_stale_time_is_refused(api: Api) -> None:
    victim, reporter = await api.register(), await api.register()
    before = await unchanged(api, victim, reporter)
    body = msgspec.to_builtins(
        PolicyViolation(
            actor=reporter.did,
            occurred_at=format_time(api.clock.now),
            agent=victim.did,
            severity="low",
            rule="r",
        )
    )
    body = {k: v for k, v in body.items() if v is not None}
    body["type"] = "policy.violation"
    no_id = {"body": body, "signature": b64encode(reporter.key.sign(canonical_bytes(body)))}
    refused(await api.client.post("/v1/violations", json=no_id), 422, "event_id is required")
    for moment, why in (
        (api.clock.now - timedelta(days=8), "stale"),
        (api.clock.now + timedelta(minutes=10), "ahead"),
    ):
        event = PolicyViolation(
            actor=reporter.did,
            occurred_at=format_time(moment),
            agent=victim.did,
            severity="low",
            rule="r",
        )
        refused(await api.client.post("/v1/violations", json=signed(event, reporter.key)), 422, why)
    assert await unchanged(api, victim, reporter) == before


# -- 2. handshakes: only credentials start them; unattributable outcomes cost nothing -------


async def test_anonymous_handshakes_are_refused(api: Api) -> None:
    a, b = await api.register(), await api.register()
    before = await unchanged(api, a, b)
    anonymous = {"initiator": a.did, "responder": b.did}
    refused(await api.client.post("/v1/handshakes", json=anonymous), 401)
    # B cannot start a handshake in A's name (A's signature is required).
    forged = handshake_request(a, b.did, api.clock.now)
    forged["signature"] = b64encode(b.key.sign(canonical_bytes(forged["body"])))
    refused(await api.client.post("/v1/handshakes", json=forged), 403, "initiator's key")
    # A signed request works once: replaying it is refused.
    request = handshake_request(a, b.did, api.clock.now)
    assert (await api.client.post("/v1/handshakes", json=request)).status_code == 201
    refused(await api.client.post("/v1/handshakes", json=request), 409, "was used")
    stale = handshake_request(a, b.did, api.clock.now - timedelta(minutes=6))
    refused(await api.client.post("/v1/handshakes", json=stale), 400, "within 5 minutes")
    assert await unchanged(api, a, b) == before


async def test_failed_handshakes_cost_the_responder_nothing(api: Api) -> None:
    a, b = await api.register(), await api.register()
    before = await scores(api, a, b)
    for _ in range(5):
        started = await api.client.post(
            "/v1/handshakes", json=handshake_request(a, b.did, api.clock.now)
        )
        challenge = started.json()
        answer = await api.client.post(
            f"/v1/handshakes/{challenge['handshake_id']}/response",
            json={"signature": b64encode(bytes(64))},
        )
        assert answer.json()["reason"] == "bad_signature"
    admin_started = await api.client.post(
        "/v1/handshakes", json={"initiator": a.did, "responder": b.did}, headers=ADMIN
    )
    expired_id = admin_started.json()["handshake_id"]
    api.clock.advance(seconds=31)
    late = await api.client.post(
        f"/v1/handshakes/{expired_id}/response", json={"signature": b64encode(bytes(64))}
    )
    assert late.json()["reason"] == "expired"
    assert await scores(api, a, b) == before  # six failures recorded, no point lost


# -- 3. farming ----------------------------------------------------------------------------


async def test_no_agent_raises_its_own_score(api: Api) -> None:
    a = await api.register()
    before = await unchanged(api, a)
    for _ in range(3):
        refused(await api.client.post("/v1/signals", json=trust_signal(a, a)), 403, "itself")
    assert await unchanged(api, a) == before


async def test_repeated_handshakes_between_a_pair_reward_once_per_window(api: Api) -> None:
    a, b = await api.register(), await api.register()
    start = await scores(api, a, b)
    for _ in range(5):
        started = await api.client.post(
            "/v1/handshakes", json=handshake_request(a, b.did, api.clock.now)
        )
        challenge = started.json()
        signature = b64encode(b.key.sign(base64.b64decode(challenge["to_sign"])))
        answer = await api.client.post(
            f"/v1/handshakes/{challenge['handshake_id']}/response", json={"signature": signature}
        )
        assert answer.json()["verified"] is True
    assert await scores(api, a, b) == [start[0] + 2, start[1] + 2]


async def test_peer_signals_are_weighed_and_bounded(api: Api) -> None:
    a, b = await api.register(), await api.register()
    start = await scores(api, a)
    for _ in range(20):  # 20 signals by one peer: one weighted reward a day
        assert (await api.client.post("/v1/signals", json=trust_signal(b, a))).status_code == 201
    # B stands at 800: its signal is worth 5 x 800/1000 = 4 points, once per 24 hours.
    assert await scores(api, a) == [start[0] + 4]


# -- 4. peer reports are bounded and weighed --------------------------------------------------


async def test_one_peer_cannot_take_another_to_zero(api: Api) -> None:
    victim, peer = await api.register(), await api.register()
    for _ in range(3):
        response = await api.client.post("/v1/violations", json=violation(peer, victim))
        assert response.status_code == 201  # recorded, as evidence
    # One critical penalty (300) per peer per day, weighed by the peer's 800/1000.
    assert await scores(api, victim) == [800 - 240]
    # The agent's own sidecar (its own key, about itself) and the admin count in full.
    own = await api.client.post("/v1/violations", json=violation(victim, victim, "high"))
    assert own.status_code == 201
    admin = await api.client.post(
        "/v1/violations",
        json={"agent": victim.did, "severity": "medium", "rule": "admin"},
        headers=ADMIN,
    )
    assert admin.status_code == 201
    assert await scores(api, victim) == [800 - 240 - 100 - 50]


async def test_an_untrusted_reporter_moves_nothing(api: Api) -> None:
    victim, low = await api.register(), await api.register()
    for _ in range(2):  # the admin takes `low` below the threshold (800 - 600 = 200)
        await api.client.post(
            "/v1/violations",
            json={"agent": low.did, "severity": "critical", "rule": "admin"},
            headers=ADMIN,
        )
    assert (await api.projected(low.did, await api.head()))["tier"] == "untrusted"
    before = await scores(api, victim)
    response = await api.client.post("/v1/violations", json=violation(low, victim))
    assert response.status_code == 201  # recorded as evidence...
    assert await scores(api, victim) == before  # ...moving nothing


# -- 5. suspended agents write nothing -------------------------------------------------------


async def test_a_suspended_agent_writes_nothing(api: Api) -> None:
    victim, bad = await api.register(), await api.register()
    suspend = await api.client.post(
        f"/v1/agents/{bad.did}/suspend", json={"reason": "test"}, headers=ADMIN
    )
    assert suspend.status_code == 200
    before = await unchanged(api, victim, bad)
    refused(await api.client.post("/v1/violations", json=violation(bad, victim)), 403, "suspended")
    refused(await api.client.post("/v1/signals", json=trust_signal(bad, victim)), 403, "suspended")
    grant = DelegationGranted(
        actor=bad.did,
        occurred_at=format_time(api.clock.now),
        grant_id="grant-suspended-1",
        delegator=bad.did,
        delegatee=victim.did,
        capabilities=("tools:search",),
    )
    response = await api.client.post("/v1/delegations", json=signed(grant, bad.key))
    assert response.status_code in (403, 422), response.text
    assert await unchanged(api, victim, bad) == before
    # Its own sidecar's report about it is still evidence: accepted, full weight.
    own = await api.client.post("/v1/violations", json=violation(bad, bad, "low"))
    assert own.status_code == 201, own.text
    assert await scores(api, victim, bad) == [before[1][0], before[1][1] - 10]


# -- 6. bootstrap is decided by the ledger ---------------------------------------------------


def _bootstrap(agent: Agent) -> tuple[dict[str, str], dict[str, str]]:
    pem = agent.key.public.pem()
    proof = b64encode(
        agent.key.sign(canonical_bytes({"type": "agentmesh.registration", "public_key": pem}))
    )
    return {"public_key": pem}, {"X-Registration-Proof": proof}


async def test_no_self_registration_once_the_ledger_holds_one(
    api: Api, redis_server: EmbeddedRedis
) -> None:
    first = await api.register()
    before = await api.head()
    # The read store is emptied (a FLUSHALL, a Redis restart): the projection says 0.
    client = aioredis.Redis(host=redis_server.host, port=redis_server.port)
    try:
        prefix = api.settings.redis_prefix
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
    body, headers = _bootstrap(Agent())
    refused(await api.client.post("/v1/agents", json=body, headers=headers), 403, "admin token")
    # Every agent suspended: still no bootstrap.
    await api.client.post(f"/v1/agents/{first.did}/suspend", json={"reason": "x"}, headers=ADMIN)
    suspended_head = await api.head()
    body, headers = _bootstrap(Agent())
    refused(await api.client.post("/v1/agents", json=body, headers=headers), 403, "admin token")
    assert (before + 1, suspended_head) == (suspended_head, await api.head())


# -- 7. key rotation proves the new key --------------------------------------------------------


async def test_key_rotation_needs_proof_of_the_new_key(api: Api) -> None:
    a, b = await api.register(), await api.register()
    before = await unchanged(api, a, b)
    to_b = AgentKeyRotated(
        actor=a.did,
        occurred_at=format_time(api.clock.now),
        did=a.did,
        public_key=b.key.public.pem(),
    )
    path = f"/v1/agents/{a.did}/keys"
    refused(await api.client.post(path, json=signed(to_b, a.key)), 422, "needs proof")
    forged_proof = b64encode(a.key.sign(b"anything"))
    with_forgery = msgspec.structs.replace(to_b, proof=forged_proof)
    refused(await api.client.post(path, json=signed(with_forgery, a.key)), 422, "proof")
    assert await unchanged(api, a, b) == before


async def test_a_key_anyone_could_sign_with_never_enters_the_ledger(api: Api) -> None:
    """A public key of small order verifies one forged signature for every message
    under OpenSSL's check: registered (by an admin, or as the first agent) or rotated
    to, anyone could sign as that agent, and it could disown what it signed. Every
    way in is refused, and nothing moves."""
    a, b = await api.register(), await api.register()
    before = await unchanged(api, a, b)
    for raw in SMALL_ORDER[:3]:
        body = {"public_key": pem_of(raw), "capabilities": ["tools:*"]}
        refused(await api.client.post("/v1/agents", json=body, headers=ADMIN), 400, "small order")
    rotation = AgentKeyRotated(
        actor=a.did,
        occurred_at=format_time(api.clock.now),
        did=a.did,
        public_key=pem_of(IDENTITY),
        proof=b64encode(FORGERY),  # "signed" by the new key, as the forgery goes
    )
    path = f"/v1/agents/{a.did}/keys"
    refused(await api.client.post(path, json=signed(rotation, a.key)), 422, "small order")
    assert await unchanged(api, a, b) == before


# -- 8. idempotency keys belong to their signer -------------------------------------------------


async def test_idempotency_keys_are_scoped_by_signer(api: Api) -> None:
    victim, a, b = await api.register(), await api.register(), await api.register()
    first = signed(
        PolicyViolation(
            actor=b.did,
            occurred_at=format_time(api.clock.now),
            agent=victim.did,
            severity="low",
            rule="r",
        ),
        b.key,
        idempotency_key="shared-key-1",
    )
    assert (await api.client.post("/v1/violations", json=first)).status_code == 201
    mine = {**violation(a, victim, "low"), "idempotency_key": "shared-key-1"}
    response = await api.client.post("/v1/violations", json=mine)
    assert response.status_code == 201, response.text
    assert response.json()["duplicate"] is False


# -- 9. one client's bad bytes never fail another's write ---------------------------------------


async def test_bad_bytes_fail_only_their_own_request(api: Api) -> None:
    victim, good, bad = await api.register(), await api.register(), await api.register()
    before = await api.head()
    nul = {**violation(bad, victim, "low"), "idempotency_key": "bad\x00key"}
    bad_calls = [api.client.post("/v1/violations", json=nul) for _ in range(10)]
    good_calls = [
        api.client.post("/v1/violations", json=violation(good, victim, "low")) for _ in range(40)
    ]
    answers = await asyncio.gather(*bad_calls, *good_calls)
    for answer in answers[:10]:
        refused(answer, 400, "idempotency_key")
    assert [a.status_code for a in answers[10:]] == [201] * 40
    assert await api.head() == before + 40
    batch = {
        "reports": [
            {**violation(good, victim, "low"), "idempotency_key": "ok-1"},
            {**violation(bad, victim, "low"), "idempotency_key": "bad\x00key"},
            {**violation(good, victim, "low"), "idempotency_key": "ok-2"},
        ]
    }
    result = (await api.client.post("/v1/reports:batch", json=batch)).json()
    assert [r["status"] for r in result["results"]] == ["appended", "rejected", "appended"]
    assert "idempotency_key" in result["results"][1]["error"]


# -- 10. impossible times ------------------------------------------------------------------------


async def test_impossible_times_are_4xx_and_change_nothing(api: Api) -> None:
    a, b = await api.register(("tools:*",)), await api.register()
    before = await unchanged(api, a, b)
    body = violation(a, b, "low")
    body["body"]["occurred_at"] = "2026-13-45T99:99:99Z"
    body["signature"] = b64encode(a.key.sign(canonical_bytes(body["body"])))
    refused(await api.client.post("/v1/violations", json=body), 422, "not a real time")
    grant = DelegationGranted(
        actor=a.did,
        occurred_at=format_time(api.clock.now),
        grant_id="grant-feb-30",
        delegator=a.did,
        delegatee=b.did,
        capabilities=("tools:search",),
        expires_at="2026-02-30T00:00:00Z",
    )
    response = await api.client.post("/v1/delegations", json=signed(grant, a.key))
    assert response.status_code in (400, 422), response.text
    assert await unchanged(api, a, b) == before


# -- no input gives a 5xx ------------------------------------------------------------------------


async def test_hostile_bodies_and_paths_are_4xx(api: Api) -> None:
    a = await api.register()
    before = await api.head()
    deep = ("[" * 5000 + "]" * 5000).encode()
    for path in (
        "/v1/violations",
        "/v1/signals",
        "/v1/handshakes",
        "/v1/agents",
        "/v1/delegations",
    ):
        response = await api.client.post(path, content=deep)
        assert response.status_code == 400, (path, response.text)
    for raw in (b"{", b"[1,2", b'{"body": 1}', deep, b"\xff\xfe"):
        response = await api.client.request("DELETE", "/v1/delegations/grant-xyz1", content=raw)
        assert 400 <= response.status_code < 500, (raw[:10], response.text)
    for handshake_id in ("hs_%00", "hs_%00x", "x" * 300):
        response = await api.client.post(
            f"/v1/handshakes/{handshake_id}/response", json={"signature": b64encode(bytes(64))}
        )
        assert 400 <= response.status_code < 500, response.text
    assert (await api.client.get(f"/v1/agents/{a.did}/trust")).status_code == 200
    assert await api.head() == before


# -- property: anonymous callers move nothing ------------------------------------------------------


_ANONYMOUS = st.sampled_from(
    [
        ("POST", "/v1/handshakes", "pair"),
        ("POST", "/v1/violations", "admin-violation"),
        ("POST", "/v1/signals", "admin-signal"),
        ("POST", "/v1/agents", "register"),
        ("POST", "/v1/agents/{b}/suspend", "empty"),
        ("POST", "/v1/agents/{b}/keys", "empty"),
        ("DELETE", "/v1/delegations/grant-anon-1", "empty"),
        ("POST", "/v1/reports:batch", "empty-batch"),
    ]
)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(calls=st.lists(_ANONYMOUS, min_size=1, max_size=6))
async def test_any_sequence_of_anonymous_calls_moves_no_score(
    api: Api, calls: list[tuple[str, str, str]]
) -> None:
    a, b = await api.register(), await api.register()
    before = await unchanged(api, a, b)
    bodies: dict[str, Any] = {
        "pair": {"initiator": a.did, "responder": b.did},
        "admin-violation": {"agent": b.did, "severity": "critical", "rule": "x"},
        "admin-signal": {"agent": b.did, "signal": "x"},
        "register": {"public_key": Agent().key.public.pem()},
        "empty": {},
        "empty-batch": {"reports": []},
    }
    for method, path, body in calls:
        response = await api.client.request(
            method, path.format(b=b.did), json=bodies[body] if method == "POST" else None
        )
        assert 400 <= response.status_code < 500, (path, response.text)
    assert await unchanged(api, a, b) == before


_OFFSETS = (-720, -480, -1, 1, 330, 840)


@given(
    moment=st.datetimes(
        min_value=datetime(1970, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from([UTC, *(timezone(timedelta(minutes=m)) for m in _OFFSETS)]),
    ),
    zulu=st.sampled_from(["Z", "z"]),
)
def test_the_single_use_day_is_the_utc_day_of_occurred_at(moment: datetime, zulu: str) -> None:
    """Rule 1's day, read from the text as written when it is UTC, is the UTC day of
    the parsed time, whatever the offset (what the index and verify both key on)."""
    for text in (moment.isoformat(), format_time(moment)[:-1] + zulu):
        event = PolicyViolation(
            actor="did:mesh:" + "a" * 32,
            occurred_at=text,
            agent="did:mesh:" + "b" * 32,
            severity="low",
            rule="r",
            detail="",
        )
        assert single_use_day(event) == parse_time(text).date() == moment.astimezone(UTC).date()


_CANONICAL_CHARS = st.sampled_from(list("0123456789-T:.Z+ W,٦z\x00"))


@given(
    moment=st.datetimes(timezones=st.just(UTC)),
    noise=st.lists(st.tuples(st.integers(0, 26), _CANONICAL_CHARS), max_size=3),
)
def test_parse_time_reads_the_canonical_form_as_the_general_parser_does(
    moment: datetime, noise: list[tuple[int, str]]
) -> None:
    """The fast path for ``format_time``'s form gives what the general RFC 3339 path
    gives — the same time, or a ValueError with the general path's message."""
    chars = list(format_time(moment))
    for index, char in noise:
        chars[index] = char
    text = "".join(chars)
    try:
        expected: datetime | str = _parse_general(text)
    except ValueError as exc:
        expected = str(exc)
    try:
        found: datetime | str = parse_time(text)
    except ValueError as exc:
        found = str(exc)
    assert found == expected
    assert not isinstance(found, datetime) or found.tzinfo is UTC
