"""The delegation graph: grants, their chains, and the rules a grant must keep.

Capabilities are ``:``-separated segments. A pattern ending in ``:*`` covers
every capability that starts with the part before the ``*`` (``tools:*``
covers ``tools:search`` and ``tools:x:y``, not ``tools``); otherwise a pattern
covers only itself. A ``*`` anywhere else is an ordinary character.

A grant confers its capabilities at time ``now`` only while every link of
its chain (the grant and each ancestor up to the root) is unrevoked and
unexpired (``expires_at > now``) and every delegator on the chain is active.
Suspending an agent therefore also silences what it delegated, until it is
reinstated: authority that flows from a suspended agent fails closed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Never, Protocol

from ledger.events import DelegationGranted
from ledger.timefmt import format_time, parse_time
from projections.config import TrustConfig
from projections.errors import DelegationError
from projections.registry import AgentRecord

DelegationReason = Literal[
    "self_delegation",
    "duplicate_grant",
    "unknown_delegator",
    "unknown_delegatee",
    "suspended_delegator",
    "no_capabilities",
    "already_expired",
    "unknown_parent",
    "not_parent_delegatee",
    "revoked_parent",
    "expired_parent",
    "inactive_parent",
    "too_deep",
    "widening",
    "outlives_parent",
    "unknown_grant",
    "already_revoked",
    "not_delegator",
]
"""The ``reason`` codes of ``DelegationError``."""


@dataclass(frozen=True, slots=True)
class Grant:
    """One delegation link. Revocation replaces it with a revoked copy."""

    grant_id: str
    delegator: str
    delegatee: str
    capabilities: tuple[str, ...]
    expires_at: datetime | None
    parent: str | None
    depth: int
    granted_at: datetime
    granted_position: int
    revoked_at: datetime | None = None
    revoked_position: int | None = None
    revoked_reason: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_position is not None

    def expired(self, now: datetime) -> bool:
        """True when the grant has expired at ``now`` (``expires_at <= now``)."""
        return self.expires_at is not None and self.expires_at <= now

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form (sorted keys; absent times and ids are null)."""
        return {
            "capabilities": list(self.capabilities),
            "delegatee": self.delegatee,
            "delegator": self.delegator,
            "depth": self.depth,
            "expires_at": _time_text(self.expires_at),
            "grant_id": self.grant_id,
            "granted_at": format_time(self.granted_at),
            "granted_position": self.granted_position,
            "parent": self.parent,
            "revoked_at": _time_text(self.revoked_at),
            "revoked_position": self.revoked_position,
            "revoked_reason": self.revoked_reason,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Grant:
        """Inverse of ``to_dict`` for data already checked against the snapshot schema."""
        return cls(
            grant_id=data["grant_id"],
            delegator=data["delegator"],
            delegatee=data["delegatee"],
            capabilities=tuple(data["capabilities"]),
            expires_at=_time_value(data["expires_at"]),
            parent=data["parent"],
            depth=data["depth"],
            granted_at=parse_time(data["granted_at"]),
            granted_position=data["granted_position"],
            revoked_at=_time_value(data["revoked_at"]),
            revoked_position=data["revoked_position"],
            revoked_reason=data["revoked_reason"],
        )


class DelegationGraph:
    """Grants by id, with the indexes the rules and queries need."""

    __slots__ = ("by_delegatee", "by_delegator", "children", "grants")

    def __init__(self) -> None:
        self.grants: dict[str, Grant] = {}
        self.children: dict[str, list[str]] = {}
        self.by_delegatee: dict[str, list[str]] = {}
        self.by_delegator: dict[str, list[str]] = {}

    def add(self, grant: Grant) -> None:
        """Record a new grant (validated by the caller)."""
        self.grants[grant.grant_id] = grant
        if grant.parent is not None:
            self.children.setdefault(grant.parent, []).append(grant.grant_id)
        self.by_delegatee.setdefault(grant.delegatee, []).append(grant.grant_id)
        self.by_delegator.setdefault(grant.delegator, []).append(grant.grant_id)

    def revoke(self, grant_id: str, at: datetime, position: int, reason: str) -> Grant:
        """Mark a grant revoked; its descendants fall with it (see ``is_active``)."""
        grant = dataclasses.replace(
            self.grants[grant_id], revoked_at=at, revoked_position=position, revoked_reason=reason
        )
        self.grants[grant_id] = grant
        return grant

    def subtree(self, grant_id: str) -> Iterator[Grant]:
        """The grant and all its descendants, parents before children."""
        pending = [grant_id]
        while pending:
            current = pending.pop()
            yield self.grants[current]
            pending.extend(self.children.get(current, ()))

    def chain(self, grant_id: str) -> Iterator[Grant]:
        """The grant, its parent, … up to its root."""
        current: str | None = grant_id
        while current is not None:
            grant = self.grants[current]
            yield grant
            current = grant.parent

    def downstream_of(self, did: str) -> set[str]:
        """Delegatees of every grant in the subtrees of grants ``did`` made."""
        return {g.delegatee for root in self.by_delegator.get(did, ()) for g in self.subtree(root)}


class DelegationContext(Protocol):
    """What the delegation rules read: the registry, the graph and the config."""

    @property
    def agents(self) -> Mapping[str, AgentRecord]: ...

    @property
    def delegations(self) -> DelegationGraph: ...

    @property
    def config(self) -> TrustConfig: ...


# -- capabilities -------------------------------------------------------------


def covers(pattern: str, capability: str) -> bool:
    """True when ``pattern`` covers ``capability`` (equal, or a ``:*`` prefix)."""
    if pattern == capability:
        return True
    return pattern.endswith(":*") and capability.startswith(pattern[:-1])


def covered_by_any(capability: str, patterns: Iterable[str]) -> bool:
    """True when some pattern covers ``capability``; nothing covers anything from ``()``."""
    return any(covers(pattern, capability) for pattern in patterns)


def _widened(capabilities: Iterable[str], allowed: tuple[str, ...]) -> list[str]:
    return [c for c in capabilities if not covered_by_any(c, allowed)]


# -- rules --------------------------------------------------------------------


def validate_grant(state: DelegationContext, event: DelegationGranted, now: datetime) -> None:
    """Return None if ``event`` may be granted at ``now``; raise ``DelegationError`` otherwise."""
    _check_parties(state, event)
    if not event.capabilities:
        _reject("no_capabilities", f"grant {event.grant_id} names no capabilities")
    expires_at = _time_value(event.expires_at)
    if expires_at is not None and expires_at <= now:
        _reject("already_expired", f"grant {event.grant_id} expires at or before now")
    if event.parent is None:
        _check_root(state, event)
    else:
        _check_child(state, event, expires_at, now)


def _check_parties(state: DelegationContext, event: DelegationGranted) -> None:
    if event.delegator == event.delegatee:
        _reject("self_delegation", f"{event.delegator} cannot delegate to itself")
    if event.grant_id in state.delegations.grants:
        _reject("duplicate_grant", f"grant {event.grant_id} already exists")
    delegator = state.agents.get(event.delegator)
    if delegator is None:
        _reject("unknown_delegator", f"delegator {event.delegator} is not registered")
    if event.delegatee not in state.agents:
        _reject("unknown_delegatee", f"delegatee {event.delegatee} is not registered")
    if not delegator.active:
        _reject("suspended_delegator", f"delegator {event.delegator} is suspended")


def _check_root(state: DelegationContext, event: DelegationGranted) -> None:
    own = state.agents[event.delegator].capabilities
    widened = _widened(event.capabilities, own)
    if widened:
        _reject("widening", f"{event.delegator} does not hold {', '.join(widened)}")


def _check_child(
    state: DelegationContext,
    event: DelegationGranted,
    expires_at: datetime | None,
    now: datetime,
) -> None:
    """The rules for a grant under ``event.parent``, in the order they are reported."""
    assert event.parent is not None  # only called for child grants
    parent = state.delegations.grants.get(event.parent)
    if parent is None:
        _reject("unknown_parent", f"parent grant {event.parent} does not exist")
    if parent.delegatee != event.delegator:
        _reject(
            "not_parent_delegatee", f"{event.delegator} is not the delegatee of {parent.grant_id}"
        )
    _check_parent_chain(state, parent, now)
    if parent.depth + 1 > state.config.max_delegation_depth:
        limit = state.config.max_delegation_depth
        _reject("too_deep", f"a chain may have at most {limit} links")
    widened = _widened(event.capabilities, parent.capabilities)
    if widened:
        _reject("widening", f"parent grant {parent.grant_id} does not cover {', '.join(widened)}")
    if parent.expires_at is not None and (expires_at is None or expires_at > parent.expires_at):
        _reject("outlives_parent", f"grant must expire no later than {parent.grant_id}")


def _check_parent_chain(state: DelegationContext, parent: Grant, now: datetime) -> None:
    for link in state.delegations.chain(parent.grant_id):
        if link.revoked:
            _reject("revoked_parent", f"grant {link.grant_id} above this one is revoked")
        if link.expired(now):
            _reject("expired_parent", f"grant {link.grant_id} above this one has expired")
        if not _agent_active(state, link.delegator):
            _reject("inactive_parent", f"{link.delegator} above this grant is suspended")


def validate_revocation(
    state: DelegationContext, grant_id: str, actor: str, ledger_did: str
) -> None:
    """Return None if ``actor`` may revoke ``grant_id``; raise ``DelegationError`` otherwise.

    Only the grant's delegator, or the ledger itself (the admin), may revoke.
    """
    grant = state.delegations.grants.get(grant_id)
    if grant is None:
        _reject("unknown_grant", f"grant {grant_id} does not exist")
    if actor not in (grant.delegator, ledger_did):
        _reject("not_delegator", f"only {grant.delegator} or an admin may revoke {grant_id}")
    if grant.revoked:
        _reject("already_revoked", f"grant {grant_id} is already revoked")


# -- queries ------------------------------------------------------------------


def is_active(state: DelegationContext, grant: Grant, now: datetime) -> bool:
    """True when ``grant`` confers its capabilities at ``now`` (see the module docstring)."""
    for link in state.delegations.chain(grant.grant_id):
        if link.revoked or link.expired(now) or not _agent_active(state, link.delegator):
            return False
    return True


def granted_capabilities(state: DelegationContext, did: str, now: datetime) -> tuple[str, ...]:
    """Capabilities ``did`` holds through active grants at ``now`` (sorted, unique)."""
    if not _agent_active(state, did):
        return ()
    graph = state.delegations
    found: set[str] = set()
    for grant_id in graph.by_delegatee.get(did, ()):
        grant = graph.grants[grant_id]
        if is_active(state, grant, now):
            found.update(grant.capabilities)
    return tuple(sorted(found))


def effective_capabilities(state: DelegationContext, did: str, now: datetime) -> tuple[str, ...]:
    """Registered plus granted capabilities of ``did`` at ``now``; none while suspended."""
    agent = state.agents.get(did)
    if agent is None or not agent.active:
        return ()
    granted = granted_capabilities(state, did, now)
    return tuple(sorted({*agent.capabilities, *granted}))


def delegation_chain(state: DelegationContext, grant_id: str) -> list[Grant]:
    """The grant and its ancestors, from the grant up to its root."""
    if grant_id not in state.delegations.grants:
        _reject("unknown_grant", f"grant {grant_id} does not exist")
    return list(state.delegations.chain(grant_id))


def grant_from_event(
    state: DelegationContext, event: DelegationGranted, at: datetime, position: int
) -> Grant:
    """The ``Grant`` a validated ``delegation.granted`` event records at ``at``."""
    parent = None if event.parent is None else state.delegations.grants[event.parent]
    depth = 1 if parent is None else parent.depth + 1
    return Grant(
        grant_id=event.grant_id,
        delegator=event.delegator,
        delegatee=event.delegatee,
        capabilities=tuple(event.capabilities),
        expires_at=_time_value(event.expires_at),
        parent=event.parent,
        depth=depth,
        granted_at=at,
        granted_position=position,
    )


def _agent_active(state: DelegationContext, did: str) -> bool:
    agent = state.agents.get(did)
    return agent is not None and agent.active


def _reject(reason: DelegationReason, message: str) -> Never:
    raise DelegationError(reason, message)


def _time_text(moment: datetime | None) -> str | None:
    return None if moment is None else format_time(moment)


def _time_value(text: str | None) -> datetime | None:
    return None if text is None else parse_time(text)
