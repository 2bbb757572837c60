"""The read side of AgentMesh: pure folds of the ledger into current state.

Pure core (no I/O, no clock reads; time is always a parameter):
    config      -- ``TrustConfig``: trust-model parameters, validated
    errors      -- the exception tree (``ProjectionError`` at the root)
    trust       -- score math in integer milli-points: decay, floor, tiers, ``trust_at``
    registry    -- ``AgentRecord``: registered agents, keys, status
    delegation  -- grants, capability coverage, delegation rules and queries
    state       -- ``MeshState``: the fold, change sets, snapshots
"""

from projections.config import TrustConfig
from projections.delegation import (
    DelegationGraph,
    Grant,
    covers,
    delegation_chain,
    effective_capabilities,
    granted_capabilities,
    is_active,
    validate_grant,
    validate_revocation,
)
from projections.errors import DelegationError, ProjectionError, SnapshotError
from projections.registry import AgentRecord, registry_size
from projections.state import MeshState, fold, fold_recorded
from projections.trust import TIERS, TrustState, TrustView, tier_for, trust_at

__all__ = [
    "TIERS",
    "AgentRecord",
    "DelegationError",
    "DelegationGraph",
    "Grant",
    "MeshState",
    "ProjectionError",
    "SnapshotError",
    "TrustConfig",
    "TrustState",
    "TrustView",
    "covers",
    "delegation_chain",
    "effective_capabilities",
    "fold",
    "fold_recorded",
    "granted_capabilities",
    "is_active",
    "registry_size",
    "tier_for",
    "trust_at",
    "validate_grant",
    "validate_revocation",
]
