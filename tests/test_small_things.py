"""Small things a user trips over (issue 14, item 12)."""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from api.metrics import MeshStats, MeshStatsCollector, MetricsServer

ROOT = Path(__file__).resolve().parent.parent


def test_the_mean_score_gauge_is_present_while_the_registry_is_empty() -> None:
    collector = MeshStatsCollector()
    collector.stats = MeshStats(ok=True)  # no active agent
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    line = next(x for x in text.splitlines() if x.startswith("agentmesh_trust_score_gauge "))
    assert math.isnan(float(line.split()[1]))
    collector.stats = MeshStats(ok=True, registry_size=2, mean_score=640.5)
    assert "agentmesh_trust_score_gauge 640.5" in generate_latest(registry).decode()


def test_state_metrics_refresh_every_five_seconds_and_the_docs_say_so() -> None:
    assert MetricsServer.__init__.__defaults__ is not None
    assert 5.0 in MetricsServer.__init__.__defaults__
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"refresh(ed)? every 5 ?s", readme), "README must say how fresh they are"


def test_key_files_are_ignored_by_git() -> None:
    for name in ("agent-key.pem", "alice.pem", "deploy/tls.key", "admin-token"):
        result = subprocess.run(
            ["git", "check-ignore", "-q", "--no-index", name], cwd=ROOT, check=False
        )
        assert result.returncode == 0, f"{name} would be committable"


def test_base64_examples_do_not_wrap() -> None:
    readme = (ROOT / "README.md").read_text()
    for line in readme.splitlines():
        if re.search(r"\|\s*base64\b", line):
            assert "-w0" in line or "-w 0" in line, line
