"""Real servers from Debian's packages for tests/test_engines.py: PgBouncer in
transaction mode, redis-server with a password and TLS, redis-sentinel.

Each runs on a random free loopback port from a throwaway directory, dies with
the test process (PR_SET_PDEATHSIG) and is stopped by its fixture. A missing
binary skips the test with the reason, or fails it when ``CI`` is set: `make
test` installs them first (`make deps`), so a CI machine always runs them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agentmesh.embedded import free_port, pg_system_user

PACKAGES = {
    "pgbouncer": "pgbouncer",
    "redis-server": "redis-server",
    "redis-sentinel": "redis-sentinel",
}
START_TIMEOUT = 30.0  # a guard against a server that never comes up, not a measurement


def engine_binary(name: str) -> str:
    """The path of ``name``, or skip (fail under CI) saying how to get it."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin"])
    found = shutil.which(name, path=path)
    if found is not None:
        return found
    reason = (
        f"{name} is not installed (Debian package {PACKAGES.get(name, name)}; "
        "`make deps` installs it when run as root with apt-get)"
    )
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the engine tests", pytrace=False)
    pytest.skip(reason)


def _die_with_parent() -> None:
    """In the child, after any uid change: SIGTERM when the test process dies."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _scratch(prefix: str, owner_uid: int | None = None) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if owner_uid is not None:
        os.chown(path, owner_uid, -1)
    return path


@dataclass
class Server:
    """One server process; ``ready`` says when it answers."""

    argv: list[str]
    workdir: Path
    ready: Callable[[], bool]
    name: str
    uid: int | None = None
    gid: int | None = None
    _process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.workdir / f"{self.name}.out", "ab")  # noqa: SIM115 -- the child owns it
        self._process = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=log,
            cwd=self.workdir,
            start_new_session=True,
            user=self.uid,
            group=self.gid,
            extra_groups=[] if self.uid is not None else None,
            preexec_fn=_die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited during start-up:\n{self.output()}")
            if self.ready():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not start:\n{self.output()}")

    def output(self) -> str:
        texts = [p.read_text(errors="replace")[-3000:] for p in self.workdir.glob("*.out")]
        texts += [p.read_text(errors="replace")[-3000:] for p in self.workdir.glob("*.log")]
        return "\n".join(texts)

    def kill(self) -> None:
        """SIGKILL: what a crashed server looks like to its clients."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# -- PgBouncer --------------------------------------------------------------------------


@dataclass
class PgBouncer:
    """PgBouncer (``pool_mode = transaction``) in front of a PostgreSQL on loopback.

    Every database of the upstream is reachable under its own name; at most
    ``pool_size`` server connections per database and user, so a test knows how
    many there are. Authentication: ``trust`` with a generated user list."""

    upstream_port: int
    pool_size: int = 3
    port: int = field(default_factory=free_port)
    _server: Server | None = None
    _dir: Path | None = None

    def start(self) -> PgBouncer:
        binary = engine_binary("pgbouncer")
        user = pg_system_user()  # PgBouncer refuses to run as root
        uid = None if user is None else user.pw_uid
        gid = None if user is None else user.pw_gid
        workdir = self._dir = _scratch("agentmesh-pgbouncer-", uid)
        (workdir / "userlist.txt").write_text('"postgres" ""\n')
        (workdir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={self.upstream_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {workdir / 'userlist.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 500\n"
            f"logfile = {workdir / 'pgbouncer.log'}\n"
            f"pidfile = {workdir / 'pgbouncer.pid'}\n"
        )
        for path in workdir.iterdir():
            os.chmod(path, 0o644)
        server = self._server = Server(
            [binary, str(workdir / "pgbouncer.ini")],
            workdir,
            lambda: _accepts(self.port),
            "pgbouncer",
            uid,
            gid,
        )
        try:
            server.start()
        except BaseException:
            self.stop()
            raise
        return self

    def url(self, database: str, *, pooler: bool = True) -> str:
        """The URL of ``database`` through PgBouncer (with our ``pooler=transaction``
        unless told otherwise: the proof that it matters)."""
        query = "?pooler=transaction" if pooler else ""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}{query}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


# -- TLS material -----------------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path, name: str = "test") -> Tls:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost signed by it."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"agentmesh {name} CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    tls = Tls(directory / f"{name}-ca.pem", directory / f"{name}.pem", directory / f"{name}.key")
    tls.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tls.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return tls


# -- Redis ----------------------------------------------------------------------------


def redis_client(
    port: int, password: str | None, tls: Tls | None, *, decode: bool = False
) -> redis.Redis:
    """A synchronous client straight to one server (the test's own checks)."""
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        password=password,
        socket_timeout=5,
        decode_responses=decode,
        ssl=tls is not None,
        ssl_ca_certs=None if tls is None else str(tls.ca),
        ssl_cert_reqs="required",
    )


def _pings(port: int, password: str | None, tls: Tls | None) -> bool:
    try:
        with redis_client(port, password, tls) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def _tls_args(tls: Tls | None, port: int) -> list[str]:
    """A server that speaks only TLS on ``port`` (clients need not show a certificate);
    replication and Sentinel's links use TLS too."""
    if tls is None:
        return ["--port", str(port)]
    return [
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(tls.cert),
        "--tls-key-file",
        str(tls.key),
        "--tls-ca-cert-file",
        str(tls.ca),
        "--tls-auth-clients",
        "no",
        "--tls-replication",
        "yes",
    ]


@dataclass
class RedisServer:
    """redis-server from Debian (built with TLS), ``requirepass`` when ``password``."""

    workdir: Path
    password: str | None = None
    tls: Tls | None = None
    replica_of: int | None = None
    port: int = field(default_factory=free_port)
    _server: Server | None = None

    def start(self) -> RedisServer:
        binary = engine_binary("redis-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [binary, *_tls_args(self.tls, self.port)]
        argv += ["--bind", "127.0.0.1", "--dir", str(self.workdir), "--save", ""]
        argv += ["--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"]
        argv += ["--logfile", str(self.workdir / "redis.log")]
        if self.password is not None:
            # A replica (and a promoted master's replicas) authenticate with masterauth.
            argv += ["--requirepass", self.password, "--masterauth", self.password]
        if self.replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        self._server = Server(
            argv,
            self.workdir,
            lambda: _pings(self.port, self.password, self.tls),
            "redis-server",
        )
        self._server.start()
        return self

    def client(self) -> redis.Redis:
        return redis_client(self.port, self.password, self.tls, decode=True)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@dataclass
class RedisSentinel:
    """redis-sentinel watching ``master`` as ``name``; failure noticed after
    ``down_after_ms`` so a failover takes seconds, not the default minute."""

    workdir: Path
    master_port: int
    name: str = "mymaster"
    password: str | None = None
    tls: Tls | None = None
    down_after_ms: int = 1000
    port: int = field(default_factory=free_port)
    _server: Server | None = None

    def start(self) -> RedisSentinel:
        binary = engine_binary("redis-sentinel")
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            "bind 127.0.0.1",
            f"dir {self.workdir}",
            f"logfile {self.workdir / 'sentinel.log'}",
            "loglevel notice",
        ]
        if self.tls is None:
            lines.append(f"port {self.port}")
        else:
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {self.tls.cert}",
                f"tls-key-file {self.tls.key}",
                f"tls-ca-cert-file {self.tls.ca}",
                "tls-auth-clients no",
                "tls-replication yes",
            ]
        lines += [
            f"sentinel monitor {self.name} 127.0.0.1 {self.master_port} 1",
            f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}",
            f"sentinel failover-timeout {self.name} 10000",
            f"sentinel parallel-syncs {self.name} 1",
        ]
        if self.password is not None:
            lines.append(f"sentinel auth-pass {self.name} {self.password}")
        config = self.workdir / "sentinel.conf"  # Sentinel rewrites it: writable, its own
        config.write_text("\n".join(lines) + "\n")
        self._server = Server(
            [binary, str(config)],
            self.workdir,
            lambda: _pings(self.port, None, self.tls),
            "redis-sentinel",
        )
        self._server.start()
        return self

    def client(self) -> redis.Redis:
        return redis_client(self.port, None, self.tls, decode=True)

    def switched_to(self, port: int) -> bool:
        """Whether the failover to ``port`` is over, as clients discovering the master
        see it (``SENTINEL MASTER``; GET-MASTER-ADDR-BY-NAME names the promoted replica
        earlier, while the old master is still the one in the table)."""
        with self.client() as client:
            reply = client.execute_command("SENTINEL", "MASTER", self.name)
        state = dict(reply)  # redis-py parses the reply into a dict
        return int(state["port"]) == port and "failover_in_progress" not in str(state["flags"])

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``check`` until it holds; the timeout is a guard against a hang, not a
    measurement (the failure names what never happened)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"never happened: {what}")
