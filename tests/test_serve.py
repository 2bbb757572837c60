"""The real processes: `agentmesh serve api` with several workers, and `agentmesh up`."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from agentmesh.embedded import EmbeddedRedis, free_port
from ledger.canonical import canonical_bytes
from ledger.events import PolicyViolation, body_of, new_event_id
from ledger.identity import SigningKey, b64encode
from ledger.timefmt import format_time, utc_now
from tests.api_support import ADMIN, ADMIN_TOKEN

FIVE = (
    "agentmesh_handshake_total",
    "agentmesh_trust_score_gauge",
    "agentmesh_policy_violation_count",
    "agentmesh_registry_size",
    "agentmesh_api_request_duration_seconds",
)


def wait_http(url: str, seconds: float = 60) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while True:
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code < 500:
                return response
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} never answered"
        time.sleep(0.1)


def metric_values(text: str, name: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        match = re.match(rf"^{name}(\{{[^}}]*\}})? (\S+)$", line)
        if match:
            found[match.group(1) or ""] = float(match.group(2))
    return found


@pytest.fixture
def env(database_url: str, redis_server: EmbeddedRedis, ledger_key: SigningKey) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTMESH_", "PROMETHEUS"))}
    return {
        **base,
        "AGENTMESH_DATABASE_URL": database_url,
        "AGENTMESH_STORAGE_BACKEND": "redis",
        "AGENTMESH_REDIS_HOST": redis_server.host,
        "AGENTMESH_REDIS_PORT": str(redis_server.port),
        "AGENTMESH_REDIS_PREFIX": f"s{uuid.uuid4().hex[:8]}:",
        "AGENTMESH_AGENT_PRIVATE_KEY": ledger_key.private_key_pem(),
        "AGENTMESH_ADMIN_TOKEN": ADMIN_TOKEN,
        "AGENTMESH_API_HOST": "127.0.0.1",
        "AGENTMESH_API_PORT": str(free_port()),
        "AGENTMESH_METRICS_PORT": str(free_port()),
        "AGENTMESH_PROJECTOR_METRICS_PORT": "0",
        "AGENTMESH_LOG_LEVEL": "WARNING",
    }


def test_serve_api_with_two_workers_and_a_projector(env: dict[str, str], tmp_path: Path) -> None:
    # The workers' metric files go to a directory of the process's own making, under
    # TMPDIR; it is removed when the API stops (nothing accumulates across restarts).
    api = subprocess.Popen(
        [sys.executable, "-m", "agentmesh", "serve", "api", "--workers", "2"],
        env={**env, "TMPDIR": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    projector = subprocess.Popen(
        [sys.executable, "-m", "agentmesh", "serve", "projector"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{env['AGENTMESH_API_PORT']}"
    metrics_url = f"http://127.0.0.1:{env['AGENTMESH_METRICS_PORT']}/metrics"
    try:
        # The guide's curl lines.
        assert wait_http(f"{base}/health").json() == {"status": "healthy"}
        assert wait_http(f"{base}/ready").json() == {"status": "ready"}
        with httpx.Client(base_url=base, timeout=10) as client:
            agents = [SigningKey.generate() for _ in range(2)]
            for key in agents:
                response = client.post(
                    "/v1/agents", headers=ADMIN, json={"public_key": key.public.pem()}
                )
                assert response.status_code == 201, response.text
            wait_for(lambda: client.get(f"/v1/agents/{agents[1].did}/trust").status_code == 200)
            for _ in range(6):  # spread over both workers
                handshake(client, agents[0], agents[1])
            violation = PolicyViolation(
                actor=agents[0].did,
                occurred_at=format_time(utc_now()),
                agent=agents[1].did,
                severity="high",
                rule="r",
                event_id=new_event_id(),  # single use: the ledger refuses it a second time
            )
            body = body_of(violation)
            sent = client.post(
                "/v1/violations",
                json={"body": body, "signature": b64encode(agents[0].sign(canonical_bytes(body)))},
            )
            assert sent.status_code == 201, sent.text

        def scraped() -> str:
            return httpx.get(metrics_url, timeout=5).text

        wait_for(
            lambda: (
                metric_values(scraped(), "agentmesh_policy_violation_count").get(
                    '{severity="high"}'
                )
                == 1.0
            ),
            seconds=30,
        )
        text = scraped()
        for name in FIVE:
            assert re.search(rf"^{name}", text, re.MULTILINE), name
        handshakes = metric_values(text, "agentmesh_handshake_total")
        assert sum(handshakes.values()) == 6.0  # summed over both worker processes
        assert metric_values(text, "agentmesh_registry_size") == {"": 2.0}
        mean = metric_values(text, "agentmesh_trust_score_gauge")[""]
        assert 700 < mean <= 820
        assert 'route="/v1/agents/{did}/trust"' in text  # the template, not the raw path
        assert agents[1].did not in text  # no per-agent labels
        # The guide's alert expressions select series that exist.
        assert "# TYPE agentmesh_policy_violation_count untyped" in text
        (metric_files,) = tmp_path.glob("agentmesh-prom-*")
        assert any(metric_files.iterdir())  # the workers' files, while they run
    finally:
        for process in (projector, api):
            process.send_signal(signal.SIGTERM)
        assert projector.wait(timeout=30) == 0
        assert api.wait(timeout=60) == 0
        assert api.stderr is not None
        api.stderr.close()
    assert list(tmp_path.glob("agentmesh-prom-*")) == []


def test_serve_api_wipes_the_metric_files_a_restart_finds(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A container restarted in its pod finds its emptyDir as it left it: the files of
    workers that died with it are not summed into the new workers' counts."""
    directory = tmp_path / "prometheus"  # the operator's, as the chart sets it
    directory.mkdir()
    env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    stale = (
        "from prometheus_client import Counter\n"
        "Counter('agentmesh_handshake', '', ['outcome', 'reason', 'shadow'])"
        ".labels('verified', '', 'false').inc(100)"
    )
    subprocess.run([sys.executable, "-c", stale], env=env, check=True)
    (left,) = directory.glob("counter_*.db")
    other = directory / "notes.txt"  # not prometheus-client's: kept
    other.write_text("kept")
    api = subprocess.Popen(
        [sys.executable, "-m", "agentmesh", "serve", "api", "--workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{env['AGENTMESH_API_PORT']}"
        assert wait_http(f"{base}/health").json() == {"status": "healthy"}
        text = httpx.get(f"http://127.0.0.1:{env['AGENTMESH_METRICS_PORT']}/metrics").text
        assert "agentmesh_api_request_duration_seconds" in text  # the workers' own files
        assert sum(metric_values(text, "agentmesh_handshake_total").values()) == 0.0
        assert not left.exists()
    finally:
        api.send_signal(signal.SIGTERM)
        assert api.wait(timeout=60) == 0
    assert other.read_text() == "kept"
    assert directory.is_dir()  # the operator's directory stays


def handshake(client: httpx.Client, initiator: SigningKey, responder: SigningKey) -> None:
    challenge = client.post(
        "/v1/handshakes",
        headers=ADMIN,  # an admin start; an agent's own start is signed (docs/API.md)
        json={"initiator": initiator.did, "responder": responder.did},
    ).json()
    signature = b64encode(responder.sign(base64.b64decode(challenge["to_sign"])))
    answer = client.post(
        f"/v1/handshakes/{challenge['handshake_id']}/response", json={"signature": signature}
    )
    assert answer.json()["verified"] is True, answer.text


def wait_for(probe: object, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not probe():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def test_agentmesh_up_runs_the_stack_and_restarts_on_its_data(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
    env = {
        **base,
        "AGENTMESH_DATA_DIR": str(tmp_path / "data"),
        "AGENTMESH_API_HOST": "127.0.0.1",
        "AGENTMESH_API_PORT": str(free_port()),
        "AGENTMESH_METRICS_PORT": str(free_port()),
        "AGENTMESH_SIDECAR_PORT": str(free_port()),
        "AGENTMESH_SIDECAR_METRICS_PORT": str(free_port()),
    }
    outputs = []
    for _ in range(2):
        up = subprocess.Popen(
            [sys.executable, "-m", "agentmesh", "up"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            url = f"http://127.0.0.1:{env['AGENTMESH_API_PORT']}"
            assert wait_http(f"{url}/ready", 120).json() == {"status": "ready"}
            metrics = httpx.get(f"http://127.0.0.1:{env['AGENTMESH_METRICS_PORT']}/metrics").text
            assert "agentmesh_api_request_duration_seconds" in metrics
        finally:
            up.send_signal(signal.SIGINT)
            out, _ = up.communicate(timeout=60)
        assert up.returncode == 0
        outputs.append(out)
    assert "admin token (shown once" in outputs[0]
    assert "admin token" not in outputs[1]  # printed once; the second start reuses the data
    assert outputs[1].strip().endswith("agentmesh: stopped")
    token_file = tmp_path / "data" / "admin-token"
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
