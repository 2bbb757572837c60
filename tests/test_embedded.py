"""The embedded PostgreSQL runs from any directory, as root or not, and never
changes the permissions of directories outside the project (issue 14, item 1).

As root (this suite's usual CI), PostgreSQL runs as an unprivileged user that
cannot enter a 0700 directory: these tests put the data directory, and a copy
of the binaries, under such a directory and start a real server from there."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from agentmesh.embedded import (
    EmbeddedPostgres,
    pg_system_user,
    postgres_bin,
    prepare_postgres,
    reachable_by,
)


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A `mktemp -d` folder: mode 0700, owned by us."""
    path = Path(tempfile.mkdtemp(prefix="agentmesh-private-"))
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def modes_up_to_root(path: Path) -> dict[Path, int]:
    return {p: stat.S_IMODE(p.stat().st_mode) for p in [path, *path.parents]}


async def query_one(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        value: int = await conn.fetchval("SELECT 41 + 1")
    finally:
        await conn.close()
    return value


def test_a_server_starts_from_a_private_directory_without_touching_its_permissions(
    private_dir: Path,
) -> None:
    before = modes_up_to_root(private_dir)
    server = EmbeddedPostgres(private_dir / "pg").start()
    try:
        assert asyncio.run(query_one(server.url)) == 42
        layout = server.layout
        assert layout is not None
        user = pg_system_user()
        if user is not None:  # root: the cluster moved where its user can reach it
            assert reachable_by(user, layout.pgdata.parent)
            assert private_dir not in layout.pgdata.parents
            assert layout.cleanup, "a throwaway relocated cluster is removed on stop"
        relocated = layout.cleanup
    finally:
        server.stop()
    assert modes_up_to_root(private_dir) == before
    assert not any(path.exists() for path in relocated)
    assert (private_dir / "pg" / "postgres.log").exists()  # the log stays in the data dir


def copy_wheel_into(private_dir: Path) -> Path:
    """The PostgreSQL wheel's files as they lie in a virtualenv inside ``private_dir``
    (a checkout under /root): the package's install and its vendored libraries."""
    install = postgres_bin().parent
    site = private_dir / "venv" / "site-packages"
    target = site / install.parent.name / install.name
    shutil.copytree(install, target, symlinks=True)
    for libs in install.parent.parent.glob(f"{install.parent.name}*.libs"):
        shutil.copytree(libs, site / libs.name, symlinks=True)
    return target / "bin"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as another user")
def test_binaries_inside_a_private_directory_are_copied_where_the_user_reaches_them(
    private_dir: Path,
) -> None:
    user = pg_system_user()
    assert user is not None
    bindir = copy_wheel_into(private_dir)
    assert not reachable_by(user, bindir)
    before = modes_up_to_root(private_dir)

    layout = prepare_postgres(private_dir / "data", bindir=bindir)

    assert reachable_by(user, layout.bindir)
    assert private_dir not in layout.bindir.parents
    shared = next(p for p in layout.bindir.parents if p.name.startswith("agentmesh-pg-"))
    assert shared.stat().st_uid == 0
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755  # nobody else may write into it
    again = prepare_postgres(private_dir / "data2", bindir=bindir)
    assert again.bindir == layout.bindir  # one copy per PostgreSQL build, reused
    for path in (*layout.cleanup, *again.cleanup):
        shutil.rmtree(path, ignore_errors=True)

    # And a real server runs from the copy (its vendored libraries found too).
    server = EmbeddedPostgres(private_dir / "pg", bindir=bindir).start()
    try:
        assert server.layout is not None
        assert server.layout.bindir == layout.bindir
        assert asyncio.run(query_one(server.url)) == 42
    finally:
        server.stop()
    assert modes_up_to_root(private_dir) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="only root relocates the cluster")
def test_a_kept_cluster_is_found_again_after_a_restart(private_dir: Path) -> None:
    first = EmbeddedPostgres(private_dir / "pg", keep=True).start()
    try:
        url = first.url
        assert asyncio.run(query_one(url)) == 42
        layout = first.layout
        assert layout is not None
        pgdata = layout.pgdata
    finally:
        first.stop()
    assert (pgdata / "PG_VERSION").exists()  # kept
    again = EmbeddedPostgres(private_dir / "pg", keep=True).start()
    try:
        assert again.layout is not None
        assert again.layout.pgdata == pgdata
    finally:
        again.stop()
    recorded = Path((private_dir / "pg" / "pgdata-location").read_text().strip())
    shutil.rmtree(recorded)
