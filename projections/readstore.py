"""The read interface the API and the sidecar import, over any read store.

``ProjectionStore`` is the port: a few document reads, one atomic write with a
compare-and-set on (generation, position), a whole-generation swap for
rebuilds, and change notifications. ``RedisProjectionStore``,
``PostgresProjectionStore`` and ``MemoryProjectionStore`` implement it and
pass one contract suite. ``ProjectionReader`` answers every query on top of
any of them with the projections' pure functions.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from projections.config import TrustConfig
from projections.delegation import Grant, effective_capabilities
from projections.documents import (
    Batch,
    Change,
    Meta,
    PartialContext,
    TrustOnly,
    decode,
    decode_grant_links,
    decode_grants_in,
    decode_listed,
    decode_trust_only,
)
from projections.errors import ProjectionError
from projections.registry import AgentRecord
from projections.trust import TIERS, TrustView

log = logging.getLogger("agentmesh.readstore")


class ReadStoreError(ProjectionError):
    """The read store failed or could not be reached."""


class StaleWriteError(ProjectionError):
    """A write expected (generation, position) the store no longer has: another
    writer (a rebuild, a second projector) moved it, or the store was emptied."""


class ProjectionStore(Protocol):
    """Storage of projection documents (one adapter per backend)."""

    name: str

    async def meta(self) -> Meta | None: ...

    async def agent_docs(self, dids: Sequence[str]) -> list[bytes | None]: ...

    async def grant_docs(self, grant_ids: Sequence[str]) -> list[bytes | None]: ...

    async def agent_closure(self, did: str) -> Closure | None:
        """The agent's document with every document its capabilities depend on, from
        one version of the store (``Closure``); None for an unknown agent."""

    async def agent_page(self, after: str | None, limit: int) -> list[tuple[str, bytes]]: ...

    def all_agent_docs(self) -> AsyncIterator[bytes]: ...

    def all_grant_docs(self) -> AsyncIterator[bytes]: ...

    async def commit(
        self, batch: Batch, expected: tuple[str, int], change: Change | None = None
    ) -> None:
        """Write ``batch`` if the store is at ``expected`` (generation, position), else
        raise ``StaleWriteError``; with ``change``, publish it in the same step (as
        ``publish`` would, and only if the write took place)."""

    async def replace_all(self, batch: Batch) -> None: ...

    async def publish(self, change: Change) -> None: ...

    def changes(self) -> AsyncGenerator[Change, None]:
        """The changes published from the moment the subscription is in place, which
        the first one says: ``SUBSCRIBED`` (``Change(0, None)``: position unknown,
        anything may have changed), yielded again whenever a broken subscription is
        re-established. What was published before it reached no one, so a follower
        drops on it whatever it read before (a cache filled while the API started,
        or while Redis was away, would otherwise keep a stale document until its
        TTL)."""

    async def close(self) -> None: ...


SUBSCRIBED = Change(0, None)  # the first change of every subscription (``changes``)
# Seconds of silence after which a store's change subscription asks its connection for
# an answer (Redis: PING; PostgreSQL: SELECT 1 on the LISTEN session), and then gives
# it up when none comes within as long again: a server gone without a reset is noticed.
HEARTBEAT = 5.0


def read_change(data: bytes | str) -> Change:
    """A change notification as published. One that cannot be read (anyone who may
    publish on the channel can send anything) says anything may have changed,
    ``Change(0, None)``: the follower drops everything rather than miss a change or
    die on it."""
    try:
        return Change.decode(data)
    except (ValueError, KeyError, TypeError) as exc:  # msgspec's DecodeError is a ValueError
        log.warning("change_unreadable", extra={"error": str(exc)[:200]})
        return Change(0, None)


@dataclass(frozen=True, slots=True)
class Closure:
    """An agent's document and what its effective capabilities are computed from:
    the grants to it (``grants_in``) and every ancestor of them, by grant id, and the
    documents of those grants' delegators other than the agent, by DID. A grant or
    delegator the store does not hold is left out, as a read of it would answer None.
    """

    agent: bytes
    grants: dict[str, bytes] = field(default_factory=dict)
    delegators: dict[str, bytes] = field(default_factory=dict)


Reads = Callable[[Sequence[str]], Awaitable[list[bytes | None]]]


async def read_closure(did: str, agent_docs: Reads, grant_docs: Reads) -> Closure | None:
    """``agent_closure`` as separate reads (the agent, the grants to it, their
    ancestors, the delegators): for stores where a read costs no round trip."""
    (raw,) = await agent_docs([did])
    if raw is None:
        return None
    closure = Closure(raw)
    grants_in = decode_grants_in(raw)
    delegators: set[str] = set()
    wanted = grants_in
    for _ in range(2):  # the grants to the agent, then their ancestors (in their chains)
        ancestors: set[str] = set()
        for gid, doc in zip(wanted, await grant_docs(wanted) if wanted else (), strict=True):
            if doc is not None:
                closure.grants[gid] = doc
                links = decode_grant_links(doc)
                ancestors.update(links.chain)
                delegators.add(links.delegator)
        wanted = sorted(ancestors - set(grants_in) - closure.grants.keys())
    delegators.discard(did)
    ordered = sorted(delegators)
    for delegator, doc in zip(ordered, await agent_docs(ordered) if ordered else (), strict=True):
        if doc is not None:
            closure.delegators[delegator] = doc
    return closure


@dataclass(frozen=True, slots=True)
class AgentSummary:
    """One row of the registry listing."""

    record: AgentRecord
    trust: TrustView


@dataclass(frozen=True, slots=True)
class AgentPage:
    agents: list[AgentSummary]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class Standing:
    """An agent's trust, record and capabilities at one moment, from one read of its
    document (``ProjectionReader.standing``)."""

    view: TrustView
    record: AgentRecord
    capabilities: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ProjectionStatus:
    backend: str
    position: int
    head: int
    lag: int
    updated_at: str | None


class ProjectionReader:
    """Trust, registry and delegation queries; ``now`` is always the caller's."""

    def __init__(self, store: ProjectionStore, config: TrustConfig) -> None:
        self.store = store
        self.config = config

    async def agent(self, did: str) -> AgentRecord | None:
        """The agent's registry record (decoded without the peer windows, which only
        the fold reads: most of a busy agent's document)."""
        (raw,) = await self.store.agent_docs([did])
        return None if raw is None else decode_listed(raw).record()

    async def trust(self, did: str, now: datetime) -> TrustView | None:
        """The agent's trust at ``now`` (decay applied), or None if unknown."""
        (raw,) = await self.store.agent_docs([did])
        return None if raw is None else self._view(decode_trust_only(raw), now)

    def _view(self, doc: TrustOnly, now: datetime) -> TrustView:
        return doc.view(self.config, now)

    async def agents(
        self,
        now: datetime,
        *,
        after: str | None = None,
        limit: int = 50,
        tier: str | None = None,
    ) -> AgentPage:
        """Agents in DID order after ``after``; with ``tier``, only those in it at ``now``."""
        if tier is not None and tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}; tiers: {', '.join(TIERS)}")
        found: list[AgentSummary] = []
        cursor, page_size = after, max(limit, 100)
        while True:
            page = await self.store.agent_page(cursor, page_size)
            for index, (did, raw) in enumerate(page):
                cursor = did
                doc = decode_listed(raw)
                view = self._view(doc, now)
                if tier is None or view.tier == tier:
                    found.append(AgentSummary(doc.record(), view))
                if len(found) == limit:
                    # More may follow unless this was the store's last row.
                    last = index == len(page) - 1 and len(page) < page_size
                    return AgentPage(found, None if last else cursor)
            if len(page) < page_size:
                return AgentPage(found, None)

    async def registry_size(self) -> int:
        meta = await self.store.meta()
        return 0 if meta is None else meta.registry_size

    async def tier_counts(self, now: datetime) -> dict[str, int]:
        counts = dict.fromkeys(TIERS, 0)
        async for raw in self.store.all_agent_docs():
            counts[self._view(decode_trust_only(raw), now).tier] += 1
        return counts

    async def capabilities(self, did: str, now: datetime) -> tuple[str, ...] | None:
        """Registered plus delegated capabilities at ``now``; None for an unknown agent."""
        closure = await self.store.agent_closure(did)
        if closure is None:
            return None
        return self._capabilities(did, decode_listed(closure.agent).record(), closure, now)

    async def standing(self, did: str, now: datetime) -> Standing | None:
        """``trust``, ``agent`` and ``capabilities`` at ``now`` (what a sidecar decides
        on); None for an unknown agent.

        One read of the store (``agent_closure``: the agent's document, the grants to it
        with their ancestors, their delegators) instead of one for each, so the three
        answers also come from one version of the store."""
        closure = await self.store.agent_closure(did)
        if closure is None:
            return None
        doc = decode_listed(closure.agent)
        record = doc.record()
        return Standing(self._view(doc, now), record, self._capabilities(did, record, closure, now))

    def _capabilities(
        self, did: str, record: AgentRecord, closure: Closure, now: datetime
    ) -> tuple[str, ...]:
        context = PartialContext(self.config)
        context.add_record(record)
        for raw in closure.grants.values():
            context.add_grant(decode(raw))
        for raw in closure.delegators.values():
            context.add_record(decode_listed(raw).record())
        return effective_capabilities(context, did, now)

    async def context(self, dids: Sequence[str], grant_ids: Sequence[str]) -> PartialContext:
        """The agents and grants (with their whole chains and delegators) a delegation
        rule needs, as a ``DelegationContext`` for the pure validators."""
        context = PartialContext(self.config)
        grants = await self._grants(list(grant_ids))
        ancestors = {gid for g in grants for gid in g["chain"]} - set(grant_ids)
        grants += await self._grants(sorted(ancestors))
        for grant in grants:
            context.add_grant(grant)
        wanted = sorted(
            {*dids, *(g["delegator"] for g in grants), *(g["delegatee"] for g in grants)}
        )
        for raw in await self.store.agent_docs(wanted):
            if raw is not None:
                context.add_agent(decode(raw))
        return context

    async def _grants(self, grant_ids: Sequence[str]) -> list[dict[str, Any]]:
        if not grant_ids:
            return []
        return [
            decode(raw) for raw in await self.store.grant_docs(list(grant_ids)) if raw is not None
        ]

    async def delegation_chain(self, grant_id: str) -> list[Grant] | None:
        """The grant and its ancestors up to the root; None for an unknown grant."""
        (raw,) = await self.store.grant_docs([grant_id])
        if raw is None:
            return None
        chain = decode(raw)["chain"]
        docs = {d["grant_id"]: d for d in await self._grants(chain)}
        return [
            Grant.from_dict({k: v for k, v in docs[g].items() if k not in ("chain", "children")})
            for g in chain
            if g in docs
        ]

    async def subtree(self, grant_id: str) -> list[str]:
        """The grant and all its descendants (what revoking it revokes)."""
        found: list[str] = []
        frontier = [grant_id]
        while frontier:
            docs = await self._grants(frontier)
            found += [d["grant_id"] for d in docs]
            frontier = [child for d in docs for child in d.get("children", ())]
        return found

    async def status(self, head: int) -> ProjectionStatus:
        meta = await self.store.meta()
        position = 0 if meta is None else meta.position
        return ProjectionStatus(
            backend=self.store.name,
            position=position,
            head=head,
            lag=max(head - position, 0),
            updated_at=None if meta is None else meta.updated_at,
        )
