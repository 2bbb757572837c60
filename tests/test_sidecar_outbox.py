"""The sidecar's outbox against the real API over real HTTP (real PostgreSQL and Redis):
reports survive the API being down, a restart and a crash, and the ledger holds
each exactly once, even when an answer is lost."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from agentmesh.embedded import EmbeddedRedis, free_port
from agentmesh.settings import Settings
from ledger.errors import IdempotencyConflictError
from ledger.events import PolicyViolation
from ledger.identity import SigningKey
from ledger.timefmt import format_time
from sidecar.outbox import Outbox, OutboxError
from tests.api_support import ADMIN, Api, api_settings, running_api
from tests.support import Agent

ROOT = Path(__file__).resolve().parent.parent
_JSON = {"content-type": "application/json"}


@pytest.fixture
def settings(database_url: str, redis_server: EmbeddedRedis, ledger_key: SigningKey) -> Settings:
    return api_settings(database_url, redis_server, ledger_key)


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with running_api(settings) as running:
        yield running


@pytest.fixture
def marker() -> str:
    """A prefix for this test's violation details, to find them in the ledger."""
    return "outbox-" + uuid.uuid4().hex[:8]


def violation(agent: Agent, detail: str, subject: str | None = None) -> PolicyViolation:
    return PolicyViolation(
        actor=agent.did,
        occurred_at=format_time(datetime.now(UTC)),
        agent=subject or agent.did,
        severity="medium",
        rule="tool-deny",
        detail=detail,
    )


async def in_ledger(api: Api, marker: str) -> Counter[str]:
    """How often each violation detail starting with ``marker`` is in the ledger."""
    counts: Counter[str] = Counter()
    after = 0
    while True:
        response = await api.client.get(
            "/v1/ledger/events", params={"after": after, "limit": 1000}, headers=ADMIN
        )
        assert response.status_code == 200, response.text
        page = response.json()
        for item in page["items"]:
            detail = item["body"].get("detail", "")
            if item["type"] == "policy.violation" and detail.startswith(marker):
                counts[detail] += 1
        if page["next_after"] is None:
            return counts
        after = page["next_after"]


async def eventually(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, f"not true within {seconds} s"
        await asyncio.sleep(0.02)


async def register(api: Api, agent: Agent) -> None:
    """Register an existing agent (``Api.register`` always makes a new one)."""
    response = await api.client.post(
        "/v1/agents", headers=ADMIN, json={"public_key": agent.key.public.pem()}
    )
    assert response.status_code == 201, response.text
    await api.projected(agent.did)


async def test_reports_put_while_the_api_is_down_are_delivered_once_it_is_up(
    settings: Settings, tmp_path: Path, marker: str
) -> None:
    port = free_port()
    async with running_api(settings, port=port) as api:
        reporter = await api.register()
    details = [f"{marker}-{i}" for i in range(25)]
    late = f"{marker}-late"
    url = f"http://127.0.0.1:{port}"
    async with Outbox.open(tmp_path / "outbox", url, reporter.key, batch_size=10) as outbox:
        keys = [outbox.put(violation(reporter, detail)) for detail in details]
        assert len(set(keys)) == 25
        assert all(key.startswith("sidecar:") for key in keys)
        assert await outbox.deliver_once() == 0  # nothing listens on the port
        assert (outbox.depth(), outbox.failures) == (25, 1)
        assert outbox.last_error is not None
        assert "ConnectError" in outbox.last_error
        stop = asyncio.Event()
        runner = asyncio.create_task(outbox.run(stop, interval=30))
        try:
            async with running_api(settings, port=port) as api:
                await eventually(lambda: outbox.depth() == 0)
                assert outbox.last_error is None
                await outbox.put_async(violation(reporter, late))
                # Woken by the put, not by the 30 s interval.
                await eventually(lambda: outbox.depth() == 0, seconds=5)
                counts = await in_ledger(api, marker)
        finally:
            stop.set()
            await runner
        assert (outbox.delivered, outbox.duplicates, outbox.rejected) == (26, 0, 0)
    assert counts == Counter([*details, late])


async def test_reports_survive_a_restart_of_the_outbox(
    api: Api, tmp_path: Path, marker: str
) -> None:
    reporter = await api.register()
    directory = tmp_path / "outbox"
    details = [f"{marker}-{i}" for i in range(10)]
    first = Outbox.open(directory, api.url, reporter.key)
    try:
        for detail in details:
            await first.put_async(violation(reporter, detail))
        with pytest.raises(OutboxError, match="locked"):  # one process owns an outbox
            Outbox.open(directory, api.url, reporter.key)
    finally:
        first.close()
    second = Outbox.open(directory, api.url, reporter.key)
    try:
        assert second.depth() == 10
        assert await second.deliver_once() == 10
        assert second.depth() == 0
        assert await second.deliver_once() == 0  # nothing left to send
    finally:
        second.close()  # synchronous, after real requests: no socket left open
    gc.collect()  # an unclosed socket would surface here as a ResourceWarning
    assert await in_ledger(api, marker) == Counter(details)


CRASHING_SIDECAR = """
import os, sys
from datetime import UTC, datetime
from pathlib import Path
from ledger.events import PolicyViolation
from ledger.identity import SigningKey
from ledger.timefmt import format_time
from sidecar.outbox import Outbox

key = SigningKey.from_pem(sys.stdin.read())
outbox = Outbox.open(Path(sys.argv[1]), "http://127.0.0.1:9", key)
for detail in sys.argv[2:]:
    outbox.put(PolicyViolation(actor=key.did, occurred_at=format_time(datetime.now(UTC)),
                               agent=key.did, severity="high", rule="tool-deny", detail=detail))
os._exit(3)  # crash right after put() returned: no close, no cleanup
"""


async def test_a_put_survives_a_crash_right_after_it_returns(
    api: Api, tmp_path: Path, marker: str
) -> None:
    reporter = await api.register()
    directory = tmp_path / "outbox"
    details = [f"{marker}-{i}" for i in range(3)]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASHING_SIDECAR,
        str(directory),
        *details,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate(reporter.key.private_key_pem().encode())
    assert process.returncode == 3, stderr.decode()
    async with Outbox.open(directory, api.url, reporter.key) as outbox:  # the lock died with it
        assert outbox.depth() == 3
        assert await outbox.deliver_once() == 3
    assert await in_ledger(api, marker) == Counter(details)


async def test_a_batch_whose_answer_was_lost_is_answered_duplicate_on_retry(
    api: Api, tmp_path: Path, marker: str
) -> None:
    reporter = await api.register()
    losses = 1

    async def lossy(request: httpx.Request) -> httpx.Response:
        """Forward to the real API; lose the first answer after the API committed."""
        nonlocal losses
        forwarded = await api.client.post(request.url.path, content=request.content, headers=_JSON)
        if losses:
            losses -= 1
            raise httpx.ReadError("connection reset before the answer arrived", request=request)
        return httpx.Response(forwarded.status_code, content=forwarded.content, headers=_JSON)

    details = [f"{marker}-{i}" for i in range(8)]
    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(lossy)) as http,
        Outbox.open(tmp_path / "outbox", api.url, reporter.key, http=http) as outbox,
    ):
        keys = [outbox.put(violation(reporter, detail)) for detail in details]
        assert await outbox.deliver_once() == 0
        assert (outbox.depth(), outbox.failures) == (8, 1)
        assert await in_ledger(api, marker) == Counter(details)  # committed all the same
        head = await api.head()
        assert await outbox.deliver_once() == 8
        assert (outbox.delivered, outbox.duplicates, outbox.depth()) == (8, 8, 0)
        assert outbox.last_error is None
    assert await api.head() == head
    assert await in_ledger(api, marker) == Counter(details)
    assert len(set(keys)) == 8


async def test_a_rejected_report_is_dead_lettered_and_does_not_block_the_others(
    api: Api, tmp_path: Path, marker: str
) -> None:
    reporter, stranger = await api.register(), Agent()  # the stranger is not registered
    good = [f"{marker}-{i}" for i in range(3)]
    async with Outbox.open(tmp_path / "outbox", api.url, reporter.key) as outbox:
        outbox.put(violation(reporter, good[0]))
        outbox.put(violation(reporter, good[1]))
        bad = outbox.put(violation(reporter, f"{marker}-stranger", subject=stranger.did))
        outbox.put(violation(reporter, good[2]))
        assert await outbox.deliver_once() == 3
        assert (outbox.depth(), outbox.dead_letters(), outbox.rejected) == (0, 1, 1)
        [letter] = outbox.dead_letter_items()
        assert letter.idempotency_key == bad
        assert "not registered" in letter.error
        assert letter.attempts == 1
        assert await in_ledger(api, marker) == Counter(good)
        # An operator registers the stranger and sends the dead letter again.
        await register(api, stranger)
        assert outbox.requeue_dead_letters() == 1
        assert (outbox.depth(), outbox.dead_letters()) == (1, 0)
        assert await outbox.deliver_once() == 1
    assert await in_ledger(api, marker) == Counter([*good, f"{marker}-stranger"])


async def test_a_batch_refused_whole_is_split_until_the_offending_report_is_alone(
    api: Api, tmp_path: Path, marker: str
) -> None:
    reporter = await api.register()
    poison = "sidecar-test:poison"

    async def picky(request: httpx.Request) -> httpx.Response:
        """The real API behind a gateway that refuses big batches and one report."""
        reports = json.loads(request.content)["reports"]
        if any(report["idempotency_key"] == poison for report in reports):
            return httpx.Response(400, json={"status": 400, "detail": "poisoned"})
        if len(reports) > 2:
            return httpx.Response(413, json={"status": 413, "detail": "too large"})
        forwarded = await api.client.post(request.url.path, content=request.content, headers=_JSON)
        return httpx.Response(forwarded.status_code, content=forwarded.content, headers=_JSON)

    details = [f"{marker}-{i}" for i in range(5)]
    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(picky)) as http,
        Outbox.open(tmp_path / "outbox", api.url, reporter.key, http=http) as outbox,
    ):
        for index, detail in enumerate(details):
            outbox.put(violation(reporter, detail))
            if index == 1:
                outbox.put(violation(reporter, f"{marker}-poison"), idempotency_key=poison)
        for _ in range(30):
            await outbox.deliver_once()
            if outbox.depth() == 0:
                break
        assert (outbox.depth(), outbox.dead_letters(), outbox.delivered) == (0, 1, 5)
        [letter] = outbox.dead_letter_items()
        assert (letter.idempotency_key, letter.error) == (poison, "HTTP 400: poisoned")
    assert await in_ledger(api, marker) == Counter(details)


async def test_a_deterministic_key_is_put_once(tmp_path: Path) -> None:
    agent = Agent()
    event = violation(agent, "same")
    async with Outbox.open(tmp_path / "outbox", "http://127.0.0.1:9", agent.key) as outbox:
        assert outbox.put(event, idempotency_key="denial-1") == "denial-1"
        assert outbox.put(event, idempotency_key="denial-1") == "denial-1"
        assert outbox.depth() == 1
        with pytest.raises(IdempotencyConflictError):
            outbox.put(violation(agent, "other"), idempotency_key="denial-1")
        with pytest.raises(ValueError, match="idempotency key"):
            outbox.put(event, idempotency_key="k" * 201)
        assert outbox.depth() == 1
    with pytest.raises(OutboxError, match="closed"):
        outbox.put(event)
