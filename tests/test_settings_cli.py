"""Settings from the environment, and the identity / db commands of the CLI."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from agentmesh.migrate import head_revision
from agentmesh.settings import ConfigError, Settings, setting_keys
from ledger.identity import SigningKey, VerifyKey, did_for_raw_public_key

GUIDE = Path(__file__).resolve().parents[2] / "shared" / "seed" / "kubernetes-deployment-guide.md"


def cli(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
    return subprocess.run(
        [sys.executable, "-m", "agentmesh", *args],
        env={**clean, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_defaults_match_the_deployment_guide() -> None:
    settings = Settings.from_env({})
    assert settings.storage_backend == "redis"
    assert (settings.trust_initial_score, settings.trust_decay_rate) == (800, 2.0)
    assert (settings.trust_decay_floor, settings.trust_min_threshold) == (100, 300)
    assert settings.delegation_max_depth == 5
    assert settings.governance_audit_retention_days == 90
    assert settings.policy_mode == "standard"


def test_every_configmap_key_of_the_guide_is_a_setting() -> None:
    keys = set(re.findall(r"^\s+(AGENTMESH_[A-Z_]+):", GUIDE.read_text(), re.MULTILINE))
    assert len(keys) >= 18
    assert keys <= set(setting_keys())


def test_guide_values_parse() -> None:
    env = dict(re.findall(r'^\s+(AGENTMESH_[A-Z_]+): "([^"]*)"', GUIDE.read_text(), re.MULTILINE))
    settings = Settings.from_env(env)
    assert settings.policy == "strict"
    assert settings.otel_enabled
    assert settings.redis_host == "agentmesh-redis-master"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "AGENTMESH_TRUST_DECAY_RATE",
            "fast",
            "AGENTMESH_TRUST_DECAY_RATE: expected a non-negative number like 2.0, got 'fast'",
        ),
        (
            "AGENTMESH_REDIS_PORT",
            "70000",
            "AGENTMESH_REDIS_PORT: expected an integer from 1 to 65535, got '70000'",
        ),
        (
            "AGENTMESH_STORAGE_BACKEND",
            "mongo",
            "AGENTMESH_STORAGE_BACKEND: expected one of memory, redis, postgres, got 'mongo'",
        ),
        (
            "AGENTMESH_CACHE_ENABLED",
            "maybe",
            "AGENTMESH_CACHE_ENABLED: expected true or false, got 'maybe'",
        ),
        (
            "AGENTMESH_DATABASE_URL",
            "mysql://x",
            "AGENTMESH_DATABASE_URL: expected a URL like postgresql://host:port, got 'mysql://x'",
        ),
    ],
)
def test_malformed_values_name_the_key(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({key: value})
    assert str(info.value) == message


def test_malformed_value_stops_the_cli_with_one_line() -> None:
    result = cli("identity", "generate", "--output-key", env={"AGENTMESH_TRUST_DECAY_RATE": "fast"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "agentmesh: error: AGENTMESH_TRUST_DECAY_RATE: expected a non-negative number like "
        "2.0, got 'fast'"
    ]


def test_missing_database_url_is_named() -> None:
    result = cli("ledger", "head")
    assert result.returncode == 1
    assert "AGENTMESH_DATABASE_URL: required" in result.stderr


def test_secrets_are_hidden_from_repr_and_errors() -> None:
    pem = SigningKey.generate().private_key_pem()
    settings = Settings.from_env(
        {"AGENTMESH_AGENT_PRIVATE_KEY": pem, "AGENTMESH_ADMIN_TOKEN": "s3cret-token"}
    )
    assert pem.splitlines()[1] not in repr(settings)
    assert "s3cret-token" not in repr(settings)
    broken = Settings.from_env({"AGENTMESH_AGENT_PRIVATE_KEY": "garbage-secret"})
    with pytest.raises(ConfigError) as info:
        broken.signing_key()
    assert "garbage-secret" not in str(info.value)


def test_identity_generate_prints_only_the_private_key() -> None:
    result = cli("identity", "generate", "--output-key")
    assert result.returncode == 0
    assert result.stderr == ""
    assert result.stdout.startswith("-----BEGIN PRIVATE KEY-----\n")
    assert result.stdout.rstrip().endswith("-----END PRIVATE KEY-----")
    assert result.stdout.count("-----BEGIN") == 1
    SigningKey.from_pem(result.stdout)


def test_identity_show_from_file_stdin_and_env(tmp_path: Path) -> None:
    key = SigningKey.generate()
    path = tmp_path / "key.pem"
    path.write_text(key.private_key_pem())
    expected = {"did": key.did, "public_key": key.public.pem()}
    assert json.loads(cli("identity", "show", str(path)).stdout) == expected
    assert json.loads(cli("identity", "show", stdin=key.private_key_pem()).stdout) == expected
    from_env = cli("identity", "show", env={"AGENTMESH_AGENT_PRIVATE_KEY": key.private_key_pem()})
    shown = json.loads(from_env.stdout)
    assert shown == expected
    # Anyone can check that the key belongs to the DID.
    assert did_for_raw_public_key(VerifyKey.from_pem(shown["public_key"]).raw) == shown["did"]
    assert key.private_key_pem().splitlines()[1] not in from_env.stdout + from_env.stderr


def test_identity_generate_to_a_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "agent.pem"
    result = cli("identity", "generate", "--out", str(path))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(result.stdout)["did"] == SigningKey.from_pem(path.read_text()).did
    again = cli("identity", "generate", "--out", str(path))
    assert again.returncode == 1
    assert "refusing to overwrite" in again.stderr


def test_identity_show_rejects_garbage() -> None:
    result = cli("identity", "show", stdin="not a key")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "agentmesh: error: private key is not an unencrypted PEM PKCS#8 key"
    )


async def test_db_upgrade_is_idempotent(postgres: object) -> None:
    from agentmesh.embedded import EmbeddedPostgres

    assert isinstance(postgres, EmbeddedPostgres)
    conn = await asyncpg.connect(postgres.url)
    await conn.execute("CREATE DATABASE fresh_upgrade")
    await conn.close()
    url = postgres.url.rsplit("/", 1)[0] + "/fresh_upgrade"
    for _ in range(2):
        result = cli("db", "upgrade", env={"AGENTMESH_DATABASE_URL": url})
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"database at revision {head_revision()}"
    conn = await asyncpg.connect(url)
    try:
        tables = {
            r[0]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
    finally:
        await conn.close()
    assert {
        "events",
        "ledger_head",
        "streams",
        "idempotency_keys",
        "agent_keys",
        "checkpoints",
        "alembic_version",
    } <= tables
