"""Typed settings, read once from ``AGENTMESH_*`` environment variables.

Every key of the deployment guide's ConfigMap is here, plus the database URL
and the secrets that come from Kubernetes Secrets. A malformed value stops
start-up with one line naming the key and the form it expects::

    AGENTMESH_TRUST_DECAY_RATE: expected a non-negative number like 2.0, got 'fast'

The signing key is never part of ``repr`` and never logged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from agentmesh.errors import AgentMeshError
from ledger.errors import SignatureError
from ledger.identity import SigningKey
from ledger.postgres.dsn import pooler_of

T = TypeVar("T")

StorageBackend = Literal["memory", "redis", "postgres"]
PolicyMode = Literal["strict", "standard", "permissive"]
LogFormat = Literal["json", "text"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class ConfigError(AgentMeshError, ValueError):
    """A setting is missing or malformed; the message is one line naming the key."""


# -- parsers: each returns the value or raises ValueError("expected …") -------


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"expected an integer from {low} to {high}") from None
        if not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}")
        return value

    return parse


def _number(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError("expected a non-negative number like 2.0") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError("expected a non-negative number like 2.0")
    return value


def _positive_number(text: str) -> float:
    value = _number(text)
    if value == 0:
        raise ValueError("expected a number above 0 like 60")
    return value


def _choice(*options: str, upper: bool = False) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().upper() if upper else text.strip().lower()
        if value not in options:
            raise ValueError("expected one of " + ", ".join(options))
        return value

    return parse


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in schemes or not rest:
            raise ValueError(f"expected a URL like {schemes[0]}://host:port")
        return value

    return parse


_PG_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg")


def _database_url(text: str) -> str:
    value = _url(*_PG_SCHEMES)(text)
    pooler_of(value)  # ValueError("expected pooler=transaction or pooler=none …")
    return value


def _direct_database_url(text: str) -> str:
    value = _database_url(text)
    if pooler_of(value) == "transaction":
        raise ValueError(
            "expected a direct URL to PostgreSQL (what needs it cannot work through a "
            "transaction pooler), not one with pooler=transaction"
        )
    return value


def _host_ports(text: str) -> tuple[tuple[str, int], ...]:
    found: list[tuple[str, int]] = []
    for item in text.split(","):
        host, sep, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65_535:
            raise ValueError("expected host:port pairs separated by commas, like s1:26379,s2:26379")
        found.append((host, int(port)))
    return tuple(found)


def _text(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("expected a non-empty value")
    return value


def _path(text: str) -> Path:
    return Path(_text(text))


# -- the settings -----------------------------------------------------------


def _env(key: str, parse: Callable[[str], Any], default: Any, doc: str) -> Any:
    return field(default=default, metadata={"env": key, "parse": parse, "doc": doc})


@dataclass(frozen=True, kw_only=True)
class Settings:
    """All configuration. Build with ``Settings.from_env()``; never a global."""

    storage_backend: StorageBackend = _env(
        "AGENTMESH_STORAGE_BACKEND",
        _choice("memory", "redis", "postgres"),
        "redis",
        "Where projections live: memory, redis or postgres.",
    )
    cache_enabled: bool = _env(
        "AGENTMESH_CACHE_ENABLED",
        _bool,
        True,
        "In-process cache of projection reads, invalidated by change notifications.",
    )
    cache_ttl: int = _env(
        "AGENTMESH_CACHE_TTL",
        _int(0, 86_400),
        300,
        "Upper bound in seconds on how long a cached projection read is kept.",
    )
    redis_host: str | None = _env(
        "AGENTMESH_REDIS_HOST", _text, None, "Redis host (redis backend)."
    )
    redis_port: int = _env("AGENTMESH_REDIS_PORT", _int(1, 65_535), 6379, "Redis port.")
    redis_password: str | None = _env(
        "AGENTMESH_REDIS_PASSWORD", _text, None, "Redis password, from a Secret when set."
    )
    redis_tls: bool = _env(
        "AGENTMESH_REDIS_TLS",
        _bool,
        False,
        "Talk TLS to Redis (and to the Sentinels), verifying the server's certificate.",
    )
    redis_tls_ca_file: Path | None = _env(
        "AGENTMESH_REDIS_TLS_CA_FILE",
        _path,
        None,
        "CA bundle (PEM) that signed Redis's certificate (default: the system's CAs).",
    )
    redis_sentinels: tuple[tuple[str, int], ...] = _env(
        "AGENTMESH_REDIS_SENTINELS",
        _host_ports,
        (),
        "Redis Sentinels as host:port,host:port: the master is asked of them, "
        "and found again after a failover (instead of AGENTMESH_REDIS_HOST).",
    )
    redis_sentinel_master: str | None = _env(
        "AGENTMESH_REDIS_SENTINEL_MASTER",
        _text,
        None,
        "Name of the master the Sentinels watch (e.g. mymaster).",
    )
    redis_sentinel_password: str | None = field(
        default=None,
        repr=False,
        metadata={
            "env": "AGENTMESH_REDIS_SENTINEL_PASSWORD",
            "parse": _text,
            "doc": "Password of the Sentinels themselves, when they have one (from a Secret).",
            "secret": True,
        },
    )
    trust_initial_score: int = _env(
        "AGENTMESH_TRUST_INITIAL_SCORE", _int(0, 1000), 800, "Score of a new agent (0-1000)."
    )
    trust_decay_rate: float = _env(
        "AGENTMESH_TRUST_DECAY_RATE",
        _number,
        2.0,
        "Points per hour a score falls without positive events.",
    )
    trust_decay_floor: int = _env(
        "AGENTMESH_TRUST_DECAY_FLOOR",
        _int(0, 1000),
        100,
        "Decay alone never takes a score below this.",
    )
    trust_min_threshold: int = _env(
        "AGENTMESH_TRUST_MIN_THRESHOLD",
        _int(0, 1000),
        300,
        "Below this an agent is untrusted: handshakes fail, the sidecar blocks.",
    )
    trust_penalty_low: int = _env(
        "AGENTMESH_TRUST_PENALTY_LOW", _int(0, 1000), 10, "Points a low-severity violation costs."
    )
    trust_penalty_medium: int = _env(
        "AGENTMESH_TRUST_PENALTY_MEDIUM", _int(0, 1000), 50, "Points a medium violation costs."
    )
    trust_penalty_high: int = _env(
        "AGENTMESH_TRUST_PENALTY_HIGH", _int(0, 1000), 100, "Points a high violation costs."
    )
    trust_penalty_critical: int = _env(
        "AGENTMESH_TRUST_PENALTY_CRITICAL", _int(0, 1000), 300, "Points a critical violation costs."
    )
    trust_reward_handshake: int = _env(
        "AGENTMESH_TRUST_REWARD_HANDSHAKE",
        _int(0, 1000),
        2,
        "Points a completed handshake adds to both agents (once per pair per 24 h).",
    )
    trust_reward_signal: int = _env(
        "AGENTMESH_TRUST_REWARD_SIGNAL", _int(0, 1000), 5, "Points a trust.signal adds."
    )
    delegation_max_depth: int = _env(
        "AGENTMESH_DELEGATION_MAX_DEPTH", _int(1, 100), 5, "Longest delegation chain."
    )
    governance_default_policy: PolicyMode = _env(
        "AGENTMESH_GOVERNANCE_DEFAULT_POLICY",
        _choice("strict", "standard", "permissive"),
        "standard",
        "Policy mode used where AGENTMESH_POLICY is not set.",
    )
    governance_shadow_mode: bool = _env(
        "AGENTMESH_GOVERNANCE_SHADOW_MODE", _bool, False, "Decide and record, but never block."
    )
    governance_audit_retention_days: int = _env(
        "AGENTMESH_GOVERNANCE_AUDIT_RETENTION_DAYS",
        _int(1, 36_500),
        90,
        "Days of ledger kept by retention.",
    )
    log_level: LogLevel = _env(
        "AGENTMESH_LOG_LEVEL",
        _choice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", upper=True),
        "INFO",
        "Log level.",
    )
    log_format: LogFormat = _env(
        "AGENTMESH_LOG_FORMAT", _choice("json", "text"), "json", "Log format: json or text."
    )
    otel_enabled: bool = _env("AGENTMESH_OTEL_ENABLED", _bool, False, "Export traces over OTLP.")
    otel_endpoint: str = _env(
        "AGENTMESH_OTEL_ENDPOINT",
        _url("http", "https"),
        "http://localhost:4317",
        "OTLP collector endpoint.",
    )
    policy: PolicyMode | None = _env(
        "AGENTMESH_POLICY",
        _choice("strict", "standard", "permissive"),
        None,
        "Sidecar policy mode: strict, standard or permissive.",
    )
    database_url: str | None = _env(
        "AGENTMESH_DATABASE_URL",
        _database_url,
        None,
        "PostgreSQL URL of the ledger, e.g. postgresql://user:pass@host:5432/agentmesh; "
        "add ?pooler=transaction when it goes through PgBouncer in transaction mode.",
    )
    database_direct_url: str | None = _env(
        "AGENTMESH_DATABASE_DIRECT_URL",
        _direct_database_url,
        None,
        "A direct PostgreSQL URL (no transaction pooler) for what needs a session of its "
        "own: the projector's leader lock and wake-ups, the postgres read store's change "
        "notifications. Required for those when AGENTMESH_DATABASE_URL has "
        "?pooler=transaction.",
    )
    database_read_url: str | None = _env(
        "AGENTMESH_DATABASE_READ_URL",
        _database_url,
        None,
        "A read replica for the API's reads that may lag (event listings, ?at=); never for "
        "appends or reads of one's own writes. Default: the ledger's URL.",
    )
    agent_private_key_pem: str | None = field(
        default=None,
        repr=False,
        metadata={
            "env": "AGENTMESH_AGENT_PRIVATE_KEY",
            "parse": _text,
            "doc": "PEM PKCS#8 Ed25519 private key (from a Secret).",
            "secret": True,
        },
    )
    agent_private_key_file: Path | None = _env(
        "AGENTMESH_AGENT_PRIVATE_KEY_FILE",
        _path,
        None,
        "Path of a PEM private key file, instead of AGENTMESH_AGENT_PRIVATE_KEY.",
    )
    admin_token: str | None = field(
        default=None,
        repr=False,
        metadata={
            "env": "AGENTMESH_ADMIN_TOKEN",
            "parse": _text,
            "doc": "Bearer token for admin calls (from a Secret).",
            "secret": True,
        },
    )
    api_host: str = _env("AGENTMESH_API_HOST", _text, "0.0.0.0", "Address the API binds.")  # noqa: S104
    api_port: int = _env("AGENTMESH_API_PORT", _int(1, 65_535), 8080, "API port.")
    metrics_port: int = _env(
        "AGENTMESH_METRICS_PORT", _int(0, 65_535), 9090, "API metrics port (0: none)."
    )
    api_workers: int = _env("AGENTMESH_API_WORKERS", _int(1, 64), 1, "API worker processes.")
    api_projector: Literal["auto", "true", "false"] = _env(
        "AGENTMESH_API_PROJECTOR",
        _choice("auto", "true", "false"),
        "auto",
        "Run a projector inside the API process (auto: only with the memory backend).",
    )
    sidecar_host: str = _env(
        "AGENTMESH_SIDECAR_HOST",
        _text,
        "0.0.0.0",  # noqa: S104 -- the kubelet's readiness probe reaches the pod IP
        "Address the sidecar binds.",
    )
    sidecar_port: int = _env("AGENTMESH_SIDECAR_PORT", _int(1, 65_535), 8081, "Sidecar port.")
    sidecar_metrics_port: int = _env(
        "AGENTMESH_SIDECAR_METRICS_PORT", _int(0, 65_535), 9091, "Sidecar metrics port (0: none)."
    )
    upstreams: str | None = _env(
        "AGENTMESH_UPSTREAMS",
        _text,
        None,
        "Sidecar upstream MCP servers: name=url[;did=DID;handshake=URL], comma-separated.",
    )
    policy_file: Path | None = _env(
        "AGENTMESH_POLICY_FILE", _path, None, "Sidecar policy rules (YAML)."
    )
    api_url: str | None = _env(
        "AGENTMESH_API_URL",
        _url("http", "https"),
        None,
        "The AgentMesh API the sidecar reports to, e.g. http://agentmesh.agentmesh:8080.",
    )
    sidecar_outbox_dir: Path = _env(
        "AGENTMESH_SIDECAR_OUTBOX_DIR",
        _path,
        Path("/tmp/agentmesh-outbox"),  # noqa: S108 -- the pod's only writable path
        "Durable outbox of the sidecar's reports (under /tmp in the pod).",
    )
    sidecar_health_file: Path = _env(
        "AGENTMESH_SIDECAR_HEALTH_FILE",
        _path,
        Path("/var/run/agentmesh/healthy"),
        "File kept while the sidecar runs (its liveness probe).",
    )
    sidecar_handshake_ttl: int = _env(
        "AGENTMESH_SIDECAR_HANDSHAKE_TTL",
        _int(1, 86_400),
        300,
        "Seconds a verified peer handshake is trusted before it is run again.",
    )
    sidecar_denial_window: float = _env(
        "AGENTMESH_SIDECAR_DENIAL_WINDOW",
        _positive_number,
        60.0,
        "Seconds in which repeated identical denials are one violation plus a repeat count.",
    )
    redis_prefix: str = _env(
        "AGENTMESH_REDIS_PREFIX", _text, "agentmesh:", "Key prefix of the projections in Redis."
    )
    projector_metrics_port: int = _env(
        "AGENTMESH_PROJECTOR_METRICS_PORT",
        _int(0, 65_535),
        9092,
        "Metrics port of `agentmesh serve projector` (0: none).",
    )
    checkpoint_every: int = _env(
        "AGENTMESH_LEDGER_CHECKPOINT_EVERY",
        _int(1, 10_000_000),
        1000,
        "Sign a checkpoint after this many events.",
    )
    checkpoint_interval: int = _env(
        "AGENTMESH_LEDGER_CHECKPOINT_INTERVAL",
        _int(1, 86_400),
        60,
        "…or after this many seconds when the head moved.",
    )
    data_dir: Path = _env(
        "AGENTMESH_DATA_DIR",
        _path,
        Path(".agentmesh"),
        "Local stack data directory (`agentmesh up`).",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Parse every key; raise ConfigError naming the first malformed one."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for item in fields(cls):
            key = item.metadata["env"]
            raw = env.get(key)
            if raw is None or (raw == "" and not item.metadata.get("secret")):
                continue
            try:
                values[item.name] = item.metadata["parse"](raw)
            except ValueError as exc:
                shown = "(hidden)" if item.metadata.get("secret") else repr(raw)
                raise ConfigError(f"{key}: {exc}, got {shown}") from None
        settings = cls(**values)
        settings._check_consistency()
        return settings

    def _check_consistency(self) -> None:
        if self.trust_decay_floor > self.trust_initial_score:
            raise ConfigError(
                "AGENTMESH_TRUST_DECAY_FLOOR: expected at most AGENTMESH_TRUST_INITIAL_SCORE "
                f"({self.trust_initial_score}), got {self.trust_decay_floor}"
            )
        if self.redis_sentinels and self.redis_sentinel_master is None:
            raise ConfigError(
                "AGENTMESH_REDIS_SENTINEL_MASTER: required with AGENTMESH_REDIS_SENTINELS, "
                "expected the name of the master the Sentinels watch, like mymaster"
            )
        if self.redis_sentinel_master is not None and not self.redis_sentinels:
            raise ConfigError(
                "AGENTMESH_REDIS_SENTINELS: required with AGENTMESH_REDIS_SENTINEL_MASTER, "
                "expected host:port pairs separated by commas, like s1:26379,s2:26379"
            )
        if self.redis_tls_ca_file is not None and not self.redis_tls:
            raise ConfigError(
                "AGENTMESH_REDIS_TLS_CA_FILE: given without AGENTMESH_REDIS_TLS=true "
                "(the CA file is only used over TLS)"
            )

    # -- required values, checked where they are needed -----------------------

    def require_database_url(self) -> str:
        if self.database_url is None:
            raise ConfigError(
                "AGENTMESH_DATABASE_URL: required, expected a URL like "
                "postgresql://user:pass@host:5432/agentmesh"
            )
        return self.database_url

    def pooled(self) -> bool:
        """Whether AGENTMESH_DATABASE_URL goes through a transaction pooler."""
        return self.database_url is not None and pooler_of(self.database_url) == "transaction"

    def direct_database_url(self) -> str | None:
        """A URL with a session of its own: the direct URL, else the ledger's URL when
        it does not go through a transaction pooler, else None."""
        if self.database_direct_url is not None:
            return self.database_direct_url
        return None if self.pooled() else self.database_url

    def require_direct_database_url(self, purpose: str) -> str:
        """The direct URL ``purpose`` needs (a session advisory lock, LISTEN)."""
        url = self.direct_database_url()
        if url is None:
            self.require_database_url()
            raise ConfigError(
                "AGENTMESH_DATABASE_DIRECT_URL: required because AGENTMESH_DATABASE_URL "
                f"goes through a transaction pooler (pooler=transaction) and {purpose} "
                "needs a session of its own, expected a direct URL like "
                "postgresql://user:pass@postgres:5432/agentmesh"
            )
        return url

    def read_database_url(self) -> str:
        """Where reads that may lag go: the replica when set, else the ledger's URL."""
        return self.database_read_url or self.require_database_url()

    def require_api_url(self) -> str:
        if self.api_url is None:
            raise ConfigError(
                "AGENTMESH_API_URL: required by the sidecar (it reports what it blocks), "
                "expected a URL like http://agentmesh.agentmesh:8080"
            )
        return self.api_url

    def require_redis_host(self) -> str:
        if self.redis_host is None:
            raise ConfigError(
                "AGENTMESH_REDIS_HOST: required when AGENTMESH_STORAGE_BACKEND=redis, "
                "expected a host name like agentmesh-redis-master"
            )
        return self.redis_host

    def signing_key(self) -> SigningKey:
        """The process's Ed25519 key, from the env var or the key file."""
        pem = self.agent_private_key_pem
        key_name = "AGENTMESH_AGENT_PRIVATE_KEY"
        if pem is None and self.agent_private_key_file is not None:
            key_name = "AGENTMESH_AGENT_PRIVATE_KEY_FILE"
            try:
                pem = self.agent_private_key_file.read_text()
            except OSError as exc:
                raise ConfigError(
                    f"{key_name}: cannot read {self.agent_private_key_file}: {exc.strerror}"
                ) from None
        if pem is None:
            raise ConfigError(
                "AGENTMESH_AGENT_PRIVATE_KEY: required, expected a PEM Ed25519 private key "
                "(agentmesh identity generate --output-key)"
            )
        try:
            return SigningKey.from_pem(pem)
        except SignatureError as exc:
            raise ConfigError(f"{key_name}: {exc}") from None

    @property
    def policy_mode(self) -> PolicyMode:
        return self.policy or self.governance_default_policy


def setting_keys() -> dict[str, str]:
    """Every environment key the code reads, with its description."""
    return {f.metadata["env"]: f.metadata["doc"] for f in fields(Settings)}


def default_of(key: str) -> object:
    for item in fields(Settings):
        if item.metadata["env"] == key:
            return cast(object, item.default)
    raise KeyError(key)
