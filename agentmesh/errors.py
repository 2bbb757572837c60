"""The composition root's one exception root (the tree is drawn in ``agentmesh``)."""

from __future__ import annotations

__all__ = ["AgentMeshError"]


class AgentMeshError(Exception):
    """A failure of the composition root (settings, the CLI, the local stack, the
    embedded servers, the witness): its message is one line for the user."""
