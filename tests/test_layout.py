"""The shape of the code that the lint rule cannot see: what importing a pure
module drags in. The sidecar's trust client must not load the PostgreSQL driver."""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE = [
    "sidecar.trust",
    "ledger.authority",
    "ledger.ports",
    "ledger.memory",
    "ledger.merkle",
    "ledger.note",
    "projections.state",
    "projections.replay",
    "projections.history",
]


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_do_not_load_the_driver(module: str) -> None:
    probe = f"import {module}, sys; print('asyncpg' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False", f"importing {module} loads asyncpg"
