"""The agent registry: who is registered, with which key, capabilities and status."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from ledger.timefmt import format_time, parse_time

AgentStatus = Literal["active", "suspended"]


@dataclass(slots=True)
class AgentRecord:
    """One registered agent (mutated in place by the fold).

    ``status_reason`` is the reason of the last suspension or reinstatement;
    ``position`` is the last ledger position that changed this agent's
    projected state (registry, trust or effective capabilities).
    """

    did: str
    public_key: str
    sponsor: str | None
    capabilities: tuple[str, ...]
    metadata: dict[str, str]
    registered_at: datetime
    status: AgentStatus = "active"
    status_reason: str = ""
    position: int = 0

    @property
    def active(self) -> bool:
        return self.status == "active"

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form (sorted keys; ``sponsor`` may be null)."""
        return {
            "capabilities": list(self.capabilities),
            "did": self.did,
            "metadata": dict(sorted(self.metadata.items())),
            "position": self.position,
            "public_key": self.public_key,
            "registered_at": format_time(self.registered_at),
            "sponsor": self.sponsor,
            "status": self.status,
            "status_reason": self.status_reason,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentRecord:
        """Inverse of ``to_dict`` for data already checked against the snapshot schema."""
        return cls(
            did=data["did"],
            public_key=data["public_key"],
            sponsor=data["sponsor"],
            capabilities=tuple(data["capabilities"]),
            metadata=dict(data["metadata"]),
            registered_at=parse_time(data["registered_at"]),
            status=data["status"],
            status_reason=data["status_reason"],
            position=data["position"],
        )


def registry_size(agents: Mapping[str, AgentRecord]) -> int:
    """Number of active (not suspended) agents."""
    return sum(1 for agent in agents.values() if agent.status == "active")
