"""Errors a user meets read right (issue 14, item 6)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ledger.errors import VerificationError
from ledger.identity import SigningKey
from ledger.postgres import PostgresEventStore
from ledger.timefmt import format_time, is_rfc3339, parse_time
from ledger.verify import verify_ledger
from tests.api_support import ADMIN, Api


@pytest.fixture(scope="module")
def executor() -> Iterator[ProcessPoolExecutor]:
    with ProcessPoolExecutor(1) as pool:
        yield pool


@pytest.mark.parametrize("action", ["suspend", "reinstate"])
async def test_suspend_and_reinstate_take_no_body(api: Api, action: str) -> None:
    agent = await api.register()
    if action == "reinstate":
        first = await api.client.post(f"/v1/agents/{agent.did}/suspend", headers=ADMIN)
        assert first.status_code == 200, first.text
    bodies: list[dict[str, Any]] = [
        {},
        {"content": b""},
        {"json": {}},
        {"json": {"reason": "incident 7"}},
    ]
    for kwargs in bodies:
        response = await api.client.post(
            f"/v1/agents/{agent.did}/{action}", headers=ADMIN, **kwargs
        )
        assert response.status_code == 200, (kwargs, response.text)


async def test_method_not_allowed_names_the_allowed_methods(api: Api) -> None:
    response = await api.client.delete("/v1/agents")
    assert response.status_code == 405
    assert response.headers["content-type"].startswith("application/problem+json")
    allowed = {m.strip() for m in response.headers["allow"].split(",")}
    assert {"GET", "POST"} <= allowed


async def test_capabilities_before_registration_are_404_like_trust(api: Api) -> None:
    agent = await api.register(capabilities=("tools:search",))
    before = format_time(datetime.now(UTC) - timedelta(days=1))
    for what in ("trust", "capabilities"):
        response = await api.client.get(f"/v1/agents/{agent.did}/{what}", params={"at": before})
        assert response.status_code == 404, (what, response.text)
    now = await api.client.get(f"/v1/agents/{agent.did}/capabilities")
    assert now.json()["capabilities"] == ["tools:search"]


@pytest.mark.parametrize("year", [1, 10, 999, 2026, 9999])
def test_times_of_any_year_are_rfc3339(year: int) -> None:
    moment = datetime(year, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    text = format_time(moment)
    assert text == f"{year:04d}-01-02T03:04:05.000006Z"
    assert is_rfc3339(text)
    assert parse_time(text) == moment


async def test_verify_past_the_head_names_the_position_asked_for(
    store: PostgresEventStore, ledger_key: SigningKey, executor: ProcessPoolExecutor
) -> None:
    await store.checkpoint()
    head = (await store.head()).position
    with pytest.raises(VerificationError) as info:
        await verify_ledger(store, ledger_key.public, from_position=999, executor=executor)
    assert str(info.value).startswith("position 999:"), str(info.value)
    assert f"ends at position {head}" in str(info.value)


def test_cli_verify_from_past_the_head(database_url: str, ledger_key: SigningKey) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "AGENTMESH_DATABASE_URL": database_url,
        "AGENTMESH_AGENT_PRIVATE_KEY": ledger_key.private_key_pem(),
    }
    result = subprocess.run(
        [sys.executable, "-m", "agentmesh", "ledger", "verify", "--from", "999"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("agentmesh: error: position 999: past the head")
