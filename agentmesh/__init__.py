"""AgentMesh composition root: settings, the ``agentmesh`` CLI, wiring, the local stack.

The only package that chooses adapters (``ledger.postgres``, the read stores,
the handshake store) and connects them::

    settings       every ``AGENTMESH_*`` key, read once (no driver loaded)
    errors         ``AgentMeshError``, the root of the tree below
    cli/           the ``agentmesh`` command, one module per command group
    wiring         read stores, history readers, the trust config from settings
    services       ``serve …``: the API, the projector
    sidecar_main   ``serve sidecar``
    retention_job  ``retention run``: the ledger's retention with the projections' snapshot
    witness        ``agentmesh witness``: follows, checks and cosigns tree heads
    local          ``agentmesh up``: the local stack
    embedded       PostgreSQL and Redis from PyPI wheels
    injector       ``serve injector``: the Kubernetes admission webhook
    migrate        Alembic, programmatically
    nodelay        TCP_NODELAY for the multi-worker HTTP server (httptools or h11)
    logs           one log style: an event name with fields
    asgi           ``uvicorn --factory agentmesh.asgi:create``

Exceptions (all under ``AgentMeshError``; each is a one-line message for the user)::

    AgentMeshError
    ├── ConfigError     (settings) a setting is missing or malformed; also a ValueError
    ├── CliError        (cli.common) a command failed: one line, exit 1
    ├── EmbeddedError   (embedded) an embedded server could not start; also a RuntimeError
    ├── StackError      (local) ``agentmesh up`` cannot start or keep running
    ├── StateError      (witness) a witness state file cannot be read back
    └── WitnessError    (witness) an operational failure of the witness (not an alarm)

The names in ``__all__`` are loaded on first use, so importing ``agentmesh.settings``
loads neither the CLI nor a driver.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentmesh.cli import main
    from agentmesh.cli.common import CliError
    from agentmesh.embedded import EmbeddedError
    from agentmesh.errors import AgentMeshError
    from agentmesh.local import StackError
    from agentmesh.settings import ConfigError, Settings
    from agentmesh.witness import StateError, WitnessError

_EXPORTS = {
    "AgentMeshError": "agentmesh.errors",
    "CliError": "agentmesh.cli.common",
    "ConfigError": "agentmesh.settings",
    "EmbeddedError": "agentmesh.embedded",
    "Settings": "agentmesh.settings",
    "StackError": "agentmesh.local",
    "StateError": "agentmesh.witness",
    "WitnessError": "agentmesh.witness",
    "main": "agentmesh.cli",
}

__all__ = [
    "AgentMeshError",
    "CliError",
    "ConfigError",
    "EmbeddedError",
    "Settings",
    "StackError",
    "StateError",
    "WitnessError",
    "main",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'agentmesh' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
