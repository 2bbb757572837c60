"""Sidecar injection: a mutating admission webhook (``agentmesh serve injector``).

The Kubernetes API server sends an ``admission.k8s.io/v1`` AdmissionReview for
every Pod created in a namespace labelled ``agentmesh-inject: enabled`` (the
chart's MutatingWebhookConfiguration selects them); the answer carries a
base64 JSONPatch that adds the AgentMesh sidecar — the same container, volumes,
probes and security context as ``deploy/k8s/agent-with-sidecar.yaml`` — as a
native sidecar (an init container with ``restartPolicy: Always``) where the
cluster has them, otherwise as a regular container.

It never rejects anything: a review it cannot read, or that is not a Pod
CREATE, is answered ``allowed`` without a patch and logged. A Pod that already
carries the sidecar, that opts out (annotation ``agentmesh.io/inject: "false"``
or label ``agentmesh-inject: disabled``), or that lives in an excluded
namespace is left as it is. The agent's own key comes from the Secret named by
the annotation ``agentmesh.io/agent-key-secret`` (default from the config).

Served over HTTPS (the API server accepts nothing else); the certificate files
are re-read when they change (cert-manager renews them in place). Metrics are
on a separate plain-HTTP port.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import logging
import os
import re
import signal
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

logger = logging.getLogger("agentmesh.injector")

SIDECAR_NAME = "agentmesh-sidecar"
INJECT_LABEL = "agentmesh-inject"
OPT_OUT_ANNOTATION = "agentmesh.io/inject"
KEY_SECRET_ANNOTATION = "agentmesh.io/agent-key-secret"  # noqa: S105 -- a name, not a secret
STATUS_ANNOTATION = "agentmesh.io/sidecar"
HEALTH_VOLUME = "agentmesh-health"
TMP_VOLUME = "agentmesh-tmp"
POLICY_VOLUME = "agentmesh-policy"
POLICY_DIR = "/etc/agentmesh"
HEALTH_DIR = "/var/run/agentmesh"
MAX_REVIEW_BYTES = 4 * 1024 * 1024  # the API server caps requests at 3 MiB

# RFC 1123 subdomain: what Kubernetes accepts as a Secret name.
_SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

Outcome = Literal[
    "injected",
    "already_injected",
    "opted_out",
    "excluded_namespace",
    "invalid_annotation",
    "not_a_pod_create",
    "malformed",
    "error",
]
OUTCOMES: tuple[Outcome, ...] = (
    "injected",
    "already_injected",
    "opted_out",
    "excluded_namespace",
    "invalid_annotation",
    "not_a_pod_create",
    "malformed",
    "error",
)


def _version() -> str:
    """The package version: image tags follow it."""
    try:
        return importlib.metadata.version("agentmesh")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0.0.0"


class Resources(msgspec.Struct, forbid_unknown_fields=True):
    requests: dict[str, str] = msgspec.field(
        default_factory=lambda: {"cpu": "100m", "memory": "128Mi"}
    )
    limits: dict[str, str] = msgspec.field(
        default_factory=lambda: {"cpu": "500m", "memory": "512Mi"}
    )


class InjectorConfig(msgspec.Struct, forbid_unknown_fields=True, rename="camel"):
    """What the injector adds; the chart writes it into the injector's ConfigMap."""

    image: str = f"agentmesh/sidecar:{_version()}"
    image_pull_policy: str | None = None
    # Native sidecar (init container with restartPolicy: Always, Kubernetes 1.29+).
    native_sidecar: bool = True
    # AGENTMESH_POLICY of the sidecar: strict, standard or permissive.
    policy: str = "strict"
    # In the Pod's namespace: the sidecar's settings and its policy rules.
    config_map: str = "agentmesh-config"
    policy_config_map: str = "agentmesh-sidecar-policy"
    # The agent's private key: this Secret unless the Pod names another.
    key_secret: str = "agentmesh-agent-keys"  # noqa: S105 -- a name, not a secret
    key_secret_key: str = "private-key"  # noqa: S105 -- a name, not a secret
    # The shared Redis password ("" for none).
    redis_password_secret: str = "agentmesh-secrets"  # noqa: S105 -- a name, not a secret
    redis_password_key: str = "redis-password"  # noqa: S105 -- a name, not a secret
    user_id: int = 1000
    proxy_port: int = 8081
    metrics_port: int = 9091
    resources: Resources = msgspec.field(default_factory=Resources)
    # Never touched, whatever the API server sends (the injector's own namespace).
    exclude_namespaces: list[str] = msgspec.field(default_factory=lambda: ["kube-system"])

    def __post_init__(self) -> None:
        if self.policy not in ("strict", "standard", "permissive"):
            raise ValueError(
                f"policy: expected strict, standard or permissive, got {self.policy!r}"
            )
        for name in ("key_secret", "config_map", "policy_config_map"):
            value = getattr(self, name)
            if not _SECRET_NAME.fullmatch(value):
                raise ValueError(f"{name}: not a Kubernetes object name: {value!r}")

    @classmethod
    def load(cls, path: Path) -> InjectorConfig:
        """Parse the config file; ``ValueError`` names the file and the problem."""
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: {exc}") from None
        try:
            return msgspec.convert(data or {}, cls)
        except msgspec.ValidationError as exc:
            raise ValueError(f"{path}: {exc}") from None


# -- the sidecar -------------------------------------------------------------------


def sidecar_container(config: InjectorConfig, key_secret: str) -> dict[str, Any]:
    """The sidecar container, as in deploy/k8s/agent-with-sidecar.yaml."""
    env: list[dict[str, Any]] = [
        {
            "name": "AGENTMESH_AGENT_PRIVATE_KEY",
            "valueFrom": {"secretKeyRef": {"name": key_secret, "key": config.key_secret_key}},
        },
        {"name": "AGENTMESH_POLICY", "value": config.policy},
    ]
    if config.redis_password_secret:
        ref = {"name": config.redis_password_secret, "key": config.redis_password_key}
        env.append({"name": "AGENTMESH_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": ref}})
    env.append({"name": "PYTHONDONTWRITEBYTECODE", "value": "1"})
    container: dict[str, Any] = {"name": SIDECAR_NAME, "image": config.image}
    if config.image_pull_policy:
        container["imagePullPolicy"] = config.image_pull_policy
    if config.native_sidecar:
        container["restartPolicy"] = "Always"
    container |= {
        "command": ["agentmesh"],
        "args": ["serve", "sidecar"],
        "ports": [
            {"name": "proxy", "containerPort": config.proxy_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": config.metrics_port, "protocol": "TCP"},
        ],
        "envFrom": [{"configMapRef": {"name": config.config_map}}],
        "env": env,
        "resources": {
            "requests": dict(config.resources.requests),
            "limits": dict(config.resources.limits),
        },
        "securityContext": {
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "runAsNonRoot": True,
            "runAsUser": config.user_id,
            "runAsGroup": config.user_id,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if config.native_sidecar:
        # The agent's containers start only once the proxy answers (up to 60 s).
        container["startupProbe"] = {
            "httpGet": {"path": "/health", "port": "proxy"},
            "periodSeconds": 2,
            "failureThreshold": 30,
        }
    container |= {
        "livenessProbe": {
            "exec": {"command": ["cat", f"{HEALTH_DIR}/healthy"]},
            "initialDelaySeconds": 10,
            "periodSeconds": 15,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": "proxy"},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "volumeMounts": [
            {"name": HEALTH_VOLUME, "mountPath": HEALTH_DIR},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},  # noqa: S108 -- an emptyDir
            {"name": POLICY_VOLUME, "mountPath": POLICY_DIR, "readOnly": True},
        ],
    }
    return container


def sidecar_volumes(config: InjectorConfig) -> list[dict[str, Any]]:
    return [
        {"name": HEALTH_VOLUME, "emptyDir": {}},
        {"name": TMP_VOLUME, "emptyDir": {}},
        {"name": POLICY_VOLUME, "configMap": {"name": config.policy_config_map}},
    ]


# -- the decision ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    uid: str
    patch: list[dict[str, Any]] | None = None
    warning: str | None = None

    def response(self) -> bytes:
        answer: dict[str, Any] = {"uid": self.uid, "allowed": True}
        if self.patch is not None:
            answer["patchType"] = "JSONPatch"
            answer["patch"] = base64.b64encode(json.dumps(self.patch).encode()).decode()
        if self.warning is not None:
            answer["warnings"] = [self.warning]
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}
        return json.dumps(review | {"response": answer}).encode()


def _uid_of(body: bytes) -> str:
    """The review's uid if there is one to echo (the API server checks it), else ""."""
    try:
        uid = json.loads(body)["request"]["uid"]
    except (ValueError, TypeError, KeyError):
        return ""
    return uid if isinstance(uid, str) else ""


def _pointer(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _opted_out(metadata: dict[str, Any]) -> bool:
    annotations = metadata.get("annotations") or {}
    labels = metadata.get("labels") or {}
    flag = str(annotations.get(OPT_OUT_ANNOTATION, "")).strip().lower()
    return flag in ("false", "disabled", "no", "off") or labels.get(INJECT_LABEL) == "disabled"


def decide(body: bytes, config: InjectorConfig) -> Decision:
    """The answer to one AdmissionReview; never raises, never denies."""
    try:
        review = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return Decision("malformed", "")
    request = review.get("request") if isinstance(review, dict) else None
    uid = request.get("uid") if isinstance(request, dict) else None
    if (
        not isinstance(request, dict)
        or not isinstance(uid, str)
        or review.get("apiVersion") != "admission.k8s.io/v1"
        or review.get("kind") != "AdmissionReview"
    ):
        return Decision("malformed", uid if isinstance(uid, str) else "")
    pod = request.get("object")
    spec = pod.get("spec") if isinstance(pod, dict) else None
    if (
        request.get("kind") != {"group": "", "version": "v1", "kind": "Pod"}
        or request.get("operation") != "CREATE"
        or request.get("subResource")
        or not isinstance(pod, dict)
        or not isinstance(spec, dict)
        or not isinstance(spec.get("containers"), list)
    ):
        return Decision("not_a_pod_create", uid)
    if not all(isinstance(spec.get(key) or [], list) for key in ("initContainers", "volumes")):
        return Decision("malformed", uid)
    metadata = pod.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(metadata.get(key) or {}, dict) for key in ("annotations", "labels")
    ):
        return Decision("malformed", uid)
    namespace = request.get("namespace") or metadata.get("namespace") or ""
    if namespace in config.exclude_namespaces:
        return Decision("excluded_namespace", uid)
    if _opted_out(metadata):
        return Decision("opted_out", uid)
    containers = list(spec.get("initContainers") or []) + list(spec["containers"])
    if any(isinstance(c, dict) and c.get("name") == SIDECAR_NAME for c in containers):
        return Decision("already_injected", uid)
    annotations = metadata.get("annotations") or {}
    key_secret = annotations.get(KEY_SECRET_ANNOTATION, config.key_secret)
    if not isinstance(key_secret, str) or not _SECRET_NAME.fullmatch(key_secret):
        warning = (
            f"agentmesh: sidecar not injected: annotation {KEY_SECRET_ANNOTATION} "
            f"is not a Secret name: {key_secret!r}"
        )
        return Decision("invalid_annotation", uid, warning=warning)
    patch = _patch(spec, metadata, config, key_secret)
    if not isinstance(pod.get("metadata"), dict):  # absent or null: the annotation needs it
        patch[-1] = {"op": "add", "path": "/metadata", "value": {"annotations": patch[-1]["value"]}}
    return Decision("injected", uid, patch)


def _patch(
    spec: dict[str, Any], metadata: dict[str, Any], config: InjectorConfig, key_secret: str
) -> list[dict[str, Any]]:
    container = sidecar_container(config, key_secret)
    patch: list[dict[str, Any]] = []
    if config.native_sidecar:
        # First among the init containers: later ones may already use the proxy.
        if spec.get("initContainers"):
            patch.append({"op": "add", "path": "/spec/initContainers/0", "value": container})
        else:
            patch.append({"op": "add", "path": "/spec/initContainers", "value": [container]})
    else:
        patch.append({"op": "add", "path": "/spec/containers/-", "value": container})
    existing = {v.get("name") for v in spec.get("volumes") or [] if isinstance(v, dict)}
    volumes = [v for v in sidecar_volumes(config) if v["name"] not in existing]
    if not spec.get("volumes"):
        patch.append({"op": "add", "path": "/spec/volumes", "value": volumes})
    else:
        patch += [{"op": "add", "path": "/spec/volumes/-", "value": v} for v in volumes]
    if not metadata.get("annotations"):
        value = {STATUS_ANNOTATION: "injected"}
        patch.append({"op": "add", "path": "/metadata/annotations", "value": value})
    else:
        path = "/metadata/annotations/" + _pointer(STATUS_ANNOTATION)
        patch.append({"op": "add", "path": path, "value": "injected"})
    return patch


# -- the servers -------------------------------------------------------------------


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reviews = Counter(
            "agentmesh_injector_reviews",
            "AdmissionReviews answered, by outcome (every answer allows the Pod).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.reviews.labels(outcome)
        self.duration = Histogram(
            "agentmesh_injector_review_duration_seconds",
            "Time to read, decide and answer one AdmissionReview.",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=self.registry,
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs in the connection's own thread, never in accept().
        try:
            if self.tls is not None:
                request = self.tls.wrap_socket(request, server_side=True)
            self.finish_request(request, client_address)
        except (ssl.SSLError, OSError) as exc:
            logger.debug("connection_failed", extra={"reason": str(exc)})
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def shutdown_request(self, request: Any) -> None:
        with suppress(OSError):
            super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60
    # One write per response (headers and body buffered, flushed after each
    # request) and no Nagle delay: otherwise the body waits for the client's
    # delayed ACK of the headers, ~40 ms per review.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    server_version = "agentmesh-injector"
    sys_version = ""
    injector: Injector

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _WebhookHandler(_Handler):
    def do_POST(self) -> None:
        started = time.perf_counter()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_REVIEW_BYTES:
            self.close_connection = True
            self._send(HTTPStatus.BAD_REQUEST, b"expected an AdmissionReview\n", "text/plain")
            return
        body = self.rfile.read(length)
        if self.path.split("?", 1)[0] != "/inject":
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
            return
        decision = self.injector.review(body)
        self._send(HTTPStatus.OK, decision.response(), "application/json")
        self.injector.metrics.duration.observe(time.perf_counter() - started)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(HTTPStatus.OK, b"ok\n", "text/plain")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")


class _MetricsHandler(_Handler):
    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/metrics":
            body = generate_latest(self.injector.metrics.registry)
            self._send(HTTPStatus.OK, body, CONTENT_TYPE_LATEST)
        elif self.path == "/healthz":
            self._send(HTTPStatus.OK, b"ok\n", "text/plain")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")


class Injector:
    """The webhook (HTTPS) and its metrics (HTTP), each on its own port."""

    def __init__(
        self,
        config: InjectorConfig,
        *,
        cert_file: Path,
        key_file: Path,
        host: str = "0.0.0.0",  # noqa: S104 -- the API server connects from outside the pod
        port: int = 8443,
        metrics_port: int = 9093,
        reload_seconds: float = 10.0,
    ) -> None:
        self.config = config
        self.metrics = Metrics()
        self.cert_file, self.key_file = cert_file, key_file
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.minimum_version = ssl.TLSVersion.TLSv1_2
        self._cert_stamp = self._stamp()
        self.tls.load_cert_chain(cert_file, key_file)
        self._reload_seconds = reload_seconds
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        webhook_handler = type("WebhookHandler", (_WebhookHandler,), {"injector": self})
        metrics_handler = type("MetricsHandler", (_MetricsHandler,), {"injector": self})
        self.webhook = _Server((host, port), webhook_handler)
        self.webhook.tls = self.tls
        self.metrics_server = _Server((host, metrics_port), metrics_handler)

    @property
    def port(self) -> int:
        return int(self.webhook.server_address[1])

    @property
    def metrics_port(self) -> int:
        return int(self.metrics_server.server_address[1])

    def review(self, body: bytes) -> Decision:
        try:
            decision = decide(body, self.config)
        except Exception:  # a bug must not block Pod creation: allow, unchanged, and say so
            logger.exception("review_failed", extra={"bytes": len(body)})
            decision = Decision("error", _uid_of(body))
        self.metrics.reviews.labels(decision.outcome).inc()
        if decision.outcome == "malformed":
            logger.warning("review_malformed", extra={"uid": decision.uid, "bytes": len(body)})
        elif decision.outcome == "invalid_annotation":
            logger.warning("review_not_injected", extra={"uid": decision.uid})
        else:
            logger.debug("review", extra={"uid": decision.uid, "outcome": decision.outcome})
        return decision

    def _stamp(self) -> tuple[float, float]:
        return (os.stat(self.cert_file).st_mtime, os.stat(self.key_file).st_mtime)

    def _watch_certificate(self) -> None:
        while not self._stop.wait(self._reload_seconds):
            try:
                stamp = self._stamp()
                if stamp != self._cert_stamp:
                    self.tls.load_cert_chain(self.cert_file, self.key_file)
                    self._cert_stamp = stamp
                    logger.info("certificate_reloaded", extra={"file": str(self.cert_file)})
            except (OSError, ssl.SSLError) as exc:  # half-written: try again next round
                logger.warning("certificate_reload_failed", extra={"reason": str(exc)})

    def start(self) -> Injector:
        for target in (
            self.webhook.serve_forever,
            self.metrics_server.serve_forever,
            self._watch_certificate,
        ):
            thread = threading.Thread(target=target, name="agentmesh-injector", daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info(
            "injector_listening",
            extra={"port": self.port, "metrics_port": self.metrics_port},
        )
        return self

    def stop(self) -> None:
        self._stop.set()
        for server in (self.webhook, self.metrics_server):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()


@contextmanager
def running(injector: Injector) -> Iterator[Injector]:
    injector.start()
    try:
        yield injector
    finally:
        injector.stop()


def serve(
    config_file: Path | None,
    cert_file: Path,
    key_file: Path,
    host: str,
    port: int,
    metrics_port: int,
) -> int:
    """Run until SIGTERM or SIGINT (``agentmesh serve injector``)."""
    config = InjectorConfig() if config_file is None else InjectorConfig.load(config_file)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with running(
        Injector(
            config,
            cert_file=cert_file,
            key_file=key_file,
            host=host,
            port=port,
            metrics_port=metrics_port,
        )
    ):
        stop.wait()
    return 0
