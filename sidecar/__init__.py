"""The enforcing sidecar: beside an agent, every MCP tool call and HTTP request
it makes is decided against a policy and its trust, and reported to the ledger.

Modules::

    errors      ``SidecarError``, the root of the tree below
    policy      the decision engine: may this agent call this tool, reach this host
    trust       the agent's own trust, cached and invalidated on change
    mcp         MCP over Streamable HTTP, relayed and gated, failing closed
    egress      plain HTTP egress: the sidecar as the agent's HTTP proxy
    upstream    a pooled HTTP/1.1 client for the upstream MCP servers
    httpserver  the small HTTP/1.1 server the sidecar listens with
    outbox      a durable outbox of signed reports, delivered exactly once
    denials     denials as evidence: one penalty per window, repeats counted
    service     ``Sidecar``: routes, decisions, reports, peer handshakes, health
    demo        a small MCP server for demos and tests

Exceptions::

    SidecarError
    ├── PolicyError    (policy) a policy file is unreadable or invalid (``file:line: what``)
    ├── UpstreamError  (upstream) the upstream could not be reached or broke the exchange
    │   └── StaleConnection  a reused connection closed before any answer: retried
    ├── OutboxError    (outbox) its local storage failed, is closed, or is held elsewhere
    └── Unparseable    (mcp) a body is not one JSON-RPC message (also a ``ValueError``)

The names in ``__all__`` are loaded on first use, so importing one module
(``sidecar.trust``) does not import the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.errors import SidecarError
    from sidecar.mcp import Unparseable
    from sidecar.outbox import Outbox, OutboxError
    from sidecar.policy import PolicyError
    from sidecar.service import Sidecar
    from sidecar.trust import TrustSource
    from sidecar.upstream import UpstreamError

_EXPORTS = {
    "Outbox": "sidecar.outbox",
    "OutboxError": "sidecar.outbox",
    "PolicyError": "sidecar.policy",
    "Sidecar": "sidecar.service",
    "SidecarError": "sidecar.errors",
    "TrustSource": "sidecar.trust",
    "Unparseable": "sidecar.mcp",
    "UpstreamError": "sidecar.upstream",
}

__all__ = [
    "Outbox",
    "OutboxError",
    "PolicyError",
    "Sidecar",
    "SidecarError",
    "TrustSource",
    "Unparseable",
    "UpstreamError",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sidecar' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
