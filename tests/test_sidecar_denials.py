"""Denials as evidence, not as a spiral: one penalty per window, repeats as a count,
nothing answered lost across a crash (a real process killed with SIGKILL)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentmesh.settings import ConfigError, Settings
from sidecar.denials import Denials
from sidecar.mcp import BLOCKED_CODE
from sidecar.outbox import Outbox
from sidecar.policy import Action, RateLimiter, decide, parse_policy
from tests.api_support import Api
from tests.sidecar_support import running_sidecar, running_upstream
from tests.support import Agent, ManualClock
from tests.test_sidecar_failclosed import MODERN, RawMcp, call, rpc_error

ROOT = Path(__file__).resolve().parent.parent


def test_the_denial_window_is_a_setting() -> None:
    assert Settings.from_env({}).sidecar_denial_window == 60.0
    window = Settings.from_env({"AGENTMESH_SIDECAR_DENIAL_WINDOW": "2.5"})
    assert window.sidecar_denial_window == 2.5
    for bad in ("0", "-1", "soon", "inf"):
        with pytest.raises(ConfigError, match="AGENTMESH_SIDECAR_DENIAL_WINDOW"):
            Settings.from_env({"AGENTMESH_SIDECAR_DENIAL_WINDOW": bad})


async def violations(api: Api, did: str, marker: str, expect: int) -> list[dict[str, Any]]:
    """The agent's policy.violation bodies mentioning ``marker``, once ``expect`` are in."""
    for _ in range(400):
        events = (await api.client.get(f"/v1/agents/{did}/events")).json()["items"]
        found = [
            e
            for e in events
            if e["type"] == "policy.violation" and marker in e["body"].get("detail", "")
        ]
        if len(found) >= expect:
            penalties = [e for e in found if e["body"].get("repeat_of") is None]
            if penalties:  # a repeat moves nothing, so the projection's position stays put
                await api.projected(did, penalties[-1]["position"])
            return [e["body"] for e in found]
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {expect} violations about {marker}")


async def test_a_thousand_retries_cost_one_penalty(api: Api, tmp_path: Path) -> None:
    agent = await api.register()
    start = (await api.projected(agent.did))["score"]
    async with running_upstream() as upstream:
        async with running_sidecar(api, agent, tmp_path, f"tools={upstream.url}") as sidecar:
            async with httpx.AsyncClient(timeout=10) as http:
                raw = await RawMcp.open(http, f"{sidecar.url}/mcp/tools", MODERN)
                body = call("secret_tool", "{}", era=MODERN).encode()
                for _ in range(1000):
                    answer = await raw.post(body, name="secret_tool")
                    assert rpc_error(answer)["code"] == BLOCKED_CODE
            first = await violations(api, agent.did, "secret_tool", 1)
            assert len(first) == 1  # the penalty is in the ledger while the storm goes on
        # Stopping sends the repeats counted so far as one follow-up.
        reports = await violations(api, agent.did, "secret_tool", 2)
    assert "secret_tool" not in upstream.calls
    assert len(reports) == 2
    penalty, repeats = reports
    assert penalty.get("repeat_of") is None
    assert penalty.get("count", 1) == 1
    assert (repeats["repeat_of"], repeats["count"]) == (penalty["event_id"], 999)
    assert repeats["actor"] == agent.did
    score = (await api.projected(agent.did))["score"]
    assert score == start - 10  # one low violation; the 999 repeats moved nothing


def _decision(clock: ManualClock) -> tuple[Action, Any]:
    policy = parse_policy("version: 1\nrules: []\n", "p", "strict", False)
    action = Action("tool", "secret_tool")
    return action, decide(policy, action, None, "did:mesh:x", RateLimiter(), 0.0)


def _pending(outbox: Outbox) -> list[dict[str, Any]]:
    return [json.loads(body) for body in outbox.pending_bodies()]


async def test_a_window_closes_with_one_follow_up_and_then_a_new_penalty(tmp_path: Path) -> None:
    agent, clock = Agent(), ManualClock()
    action, decision = _decision(clock)
    async with Outbox.open(tmp_path, "http://127.0.0.1:9", agent.key, clock=clock) as outbox:
        denials = Denials(outbox, agent.did, clock, window_seconds=60)
        await asyncio.gather(*(denials.record(action, decision) for _ in range(5)))
        await outbox.sync()  # the repeats are answered at once, committed by the next batch
        assert [w.repeats for w in outbox.windows()] == [4]
        clock.advance(seconds=30)
        assert await denials.sweep() == 0  # still inside the window
        await denials.record(action, decision)
        clock.advance(seconds=31)
        assert await denials.sweep() == 1
        assert outbox.windows() == []
        await denials.record(action, decision)  # a new window: a new penalty
        first, follow_up, second = _pending(outbox)
    assert first.get("repeat_of") is None
    assert second.get("repeat_of") is None
    assert (follow_up["repeat_of"], follow_up["count"]) == (first["event_id"], 5)
    assert second["event_id"] != first["event_id"]


CRASHING = """
import asyncio, sys
from pathlib import Path
from ledger.identity import SigningKey
from sidecar.denials import Denials
from sidecar.outbox import Outbox
from sidecar.policy import Action, RateLimiter, decide, parse_policy

async def main() -> None:
    key = SigningKey.from_pem(sys.stdin.read())
    outbox = Outbox.open(Path(sys.argv[1]), "http://127.0.0.1:9", key)
    denials = Denials(outbox, key.did, __import__("ledger.timefmt").timefmt.utc_now)
    policy = parse_policy("version: 1\\nrules: []\\n", "p", "strict", False)
    action = Action("tool", "secret_tool")
    decision = decide(policy, action, None, key.did, RateLimiter(), 0.0)

    answered = 0

    async def storm() -> None:
        nonlocal answered
        while True:
            await denials.record(action, decision)  # the agent would see its denial now
            answered += 1
            await asyncio.sleep(0)  # as a server would, between two requests

    async def report() -> None:
        while True:
            before = answered
            await outbox.sync()  # everything answered before this is committed now
            sys.stdout.write(f"durable {before}\\n")
            sys.stdout.flush()

    await asyncio.gather(report(), *(storm() for _ in range(16)))

asyncio.run(main())
"""


async def test_no_penalty_and_no_committed_count_is_lost_when_the_process_is_killed(
    tmp_path: Path,
) -> None:
    agent = Agent()
    directory = tmp_path / "outbox"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASHING,
        str(directory),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stdin is not None
    assert process.stdout is not None
    process.stdin.write(agent.key.private_key_pem().encode())
    process.stdin.close()
    durable = 0
    while durable < 3000:
        line = await process.stdout.readline()
        assert line.startswith(b"durable "), line
        durable = int(line.split()[1])
    process.send_signal(signal.SIGKILL)  # mid-storm: counts taken, a commit maybe in flight
    for line in (await process.stdout.read()).splitlines():
        durable = max(durable, int(line.split()[1]))
    await process.wait()
    async with Outbox.open(directory, "http://127.0.0.1:9", agent.key) as outbox:
        (window,) = outbox.windows()
        reports = _pending(outbox)
        assert len(reports) == 1  # the one penalty, signed and committed
        assert reports[0]["event_id"] == window.first_event_id
        assert 1 + window.repeats >= durable  # every denial reported durable is on disk
        # After the restart the window goes on: a denial now is a repeat, not a penalty.
        clock = ManualClock()
        denials = Denials(outbox, agent.did, lambda: clock.now.fromtimestamp(window.opened_at))
        action, decision = _decision(clock)
        await denials.record(action, decision)
        await outbox.sync()
        assert len(_pending(outbox)) == 1
        assert outbox.windows()[0].repeats == window.repeats + 1
        await denials.flush()
        follow_up = _pending(outbox)[1]
    assert (follow_up["repeat_of"], follow_up["count"]) == (
        window.first_event_id,
        window.repeats + 1,
    )
