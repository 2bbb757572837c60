"""Composition root: builds the parts from settings (no I/O at import)."""

from __future__ import annotations

from agentmesh.settings import ConfigError, Settings, StorageBackend
from ledger.postgres import PostgresLedgerReader
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
        return redis_store(settings)
    if chosen == "postgres":
        # Reads and writes through the ledger's URL (a pooler is fine); the change
        # notifications LISTEN on a direct session (None behind a pooler without
        # AGENTMESH_DATABASE_DIRECT_URL: then changes() says what is missing).
        return await PostgresProjectionStore.connect(
            settings.require_database_url(), listen_url=settings.direct_database_url()
        )
    return MemoryProjectionStore()


def redis_store(settings: Settings) -> RedisProjectionStore:
    """Redis: through the Sentinels when AGENTMESH_REDIS_SENTINELS is set, else the host;
    with the password and TLS (verified against the CA file) when configured."""
    ca_file = None if settings.redis_tls_ca_file is None else str(settings.redis_tls_ca_file)
    if settings.redis_sentinels:
        assert settings.redis_sentinel_master is not None  # Settings checks the pair
        return RedisProjectionStore.connect_sentinel(
            settings.redis_sentinels,
            settings.redis_sentinel_master,
            settings.redis_password,
            prefix=settings.redis_prefix,
            sentinel_password=settings.redis_sentinel_password,
            tls=settings.redis_tls,
            tls_ca_file=ca_file,
        )
    return RedisProjectionStore.connect(
        settings.require_redis_host(),
        settings.redis_port,
        settings.redis_password,
        prefix=settings.redis_prefix,
        tls=settings.redis_tls,
        tls_ca_file=ca_file,
    )


async def open_history_reader(settings: Settings, pool_size: int = 4) -> PostgresLedgerReader:
    """A ledger reader for reads that may lag (exports, replay, verify, listings): on
    AGENTMESH_DATABASE_READ_URL when set, else on the ledger's URL."""
    return await PostgresLedgerReader.connect(settings.read_database_url(), pool_size)
