"""The read side of AgentMesh: folds of the ledger into current state, and the
read stores that serve it.

Pure core (no I/O, no clock reads; time is always a parameter)::

    config      ``TrustConfig``: trust-model parameters, validated
    errors      the exception tree below (``ProjectionError`` at the root)
    trust       score math in integer milli-points: decay, floor, tiers, ``trust_at``
    registry    ``AgentRecord``: registered agents, keys, status
    delegation  grants, capability coverage, delegation rules and queries
    state       ``MeshState``: the fold, change sets, snapshots
    bodies      stored event bodies decoded into the fields the fold reads
    documents   how folded state is laid out as read-store documents
    replay      the mesh at any moment, for incident review (``agentmesh replay``)

Folds over the ledger port (``ledger.ports.LedgerReader``)::

    start       ``ledger_start`` (the retention snapshot or the beginning) and
                ``state_at_position``: where every fold of the stored ledger starts
    history     one agent's state at a past moment (the API's ``?at=``)
    projector   tails the ledger into a read store, exactly once, one leader

Read stores (``readstore.ProjectionStore`` and its adapters)::

    readstore       the Protocol and ``ProjectionReader``, what the API and sidecar read
    store_memory    in this process
    store_redis     Redis (TLS, Sentinel), shared by API replicas and sidecars
    store_postgres  tables beside the ledger
    cache           a read-through cache invalidated by change notifications

Exceptions::

    ProjectionError
    ├── DelegationError   a grant or revocation breaks a delegation rule (has ``reason``)
    ├── SnapshotError     a snapshot is malformed or was folded under another config
    ├── ReadStoreError    (readstore) the read store failed or could not be reached
    ├── StaleWriteError   (readstore) the store moved past the (generation, position) expected
    ├── ReplayError       (replay) a question the source cannot answer truthfully
    └── FoldTooLargeError (history) a past moment's fold exceeds its limits
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
from projections.start import Start, ledger_start, state_at_position
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
    "Start",
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
    "ledger_start",
    "registry_size",
    "state_at_position",
    "tier_for",
    "trust_at",
    "validate_grant",
    "validate_revocation",
]
