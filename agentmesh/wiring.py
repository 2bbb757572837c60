"""Composition root: builds the parts from settings (no I/O at import)."""

from __future__ import annotations

from agentmesh.settings import ConfigError, Settings, StorageBackend
from projections.config import TrustConfig
from projections.readstore import ProjectionStore
from projections.store_memory import MemoryProjectionStore
from projections.store_postgres import PostgresProjectionStore
from projections.store_redis import RedisProjectionStore


def trust_config(settings: Settings) -> TrustConfig:
    try:
        return TrustConfig(
            initial_score=settings.trust_initial_score,
            decay_rate=settings.trust_decay_rate,
            decay_floor=settings.trust_decay_floor,
            min_threshold=settings.trust_min_threshold,
            penalties={
                "low": settings.trust_penalty_low,
                "medium": settings.trust_penalty_medium,
                "high": settings.trust_penalty_high,
                "critical": settings.trust_penalty_critical,
            },
            reward_handshake=settings.trust_reward_handshake,
            reward_signal=settings.trust_reward_signal,
            max_delegation_depth=settings.delegation_max_depth,
        )
    except ValueError as exc:
        raise ConfigError(f"trust settings: {exc}") from None


async def open_projection_store(
    settings: Settings, backend: StorageBackend | None = None
) -> ProjectionStore:
    """The read store named by ``backend`` (default AGENTMESH_STORAGE_BACKEND)."""
    chosen = backend or settings.storage_backend
    if chosen == "redis":
        return RedisProjectionStore.connect(
            settings.require_redis_host(),
            settings.redis_port,
            settings.redis_password,
            prefix=settings.redis_prefix,
        )
    if chosen == "postgres":
        return await PostgresProjectionStore.connect(settings.require_database_url())
    return MemoryProjectionStore()
