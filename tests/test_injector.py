"""The sidecar injector over real HTTPS with real AdmissionReview JSON.

Each answer's JSONPatch is applied with ``jsonpatch`` and the resulting Pod is
validated against the Kubernetes schemas (``kubernetes-validate``).
"""

from __future__ import annotations

import base64
import copy
import datetime
import http.client
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import jsonpatch
import kubernetes_validate  # ships no type information
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from agentmesh.cli import _parser
from agentmesh.injector import (
    SIDECAR_NAME,
    Injector,
    InjectorConfig,
    decide,
    running,
)

Doc = dict[str, Any]
REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"


# -- certificates ----------------------------------------------------------------


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_certificates(directory: Path, serial: int = 1) -> Path:
    """A CA and a server certificate for localhost; returns the CA file."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("agentmesh-injector-ca"))
        .issuer_name(_name("agentmesh-injector-ca"))
        .public_key(ca_key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("agentmesh-injector.agentmesh.svc"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(serial + 1000)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return directory / "ca.crt"


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("injector-tls")
    make_certificates(directory)
    return directory


class Client:
    """An HTTPS client that trusts only the test CA and checks the host name."""

    def __init__(self, port: int, ca_file: Path) -> None:
        self.context = ssl.create_default_context(cafile=str(ca_file))
        self.connection = http.client.HTTPSConnection(
            "localhost", port, context=self.context, timeout=10
        )

    def post(self, body: bytes, path: str = "/inject") -> tuple[int, Doc]:
        self.connection.request(
            "POST", path, body=body, headers={"Content-Type": "application/json"}
        )
        response = self.connection.getresponse()
        return response.status, cast(Doc, json.loads(response.read()))

    def review(self, review: Doc) -> Doc:
        status, answer = self.post(json.dumps(review).encode())
        assert status == 200
        assert answer["apiVersion"] == "admission.k8s.io/v1"
        assert answer["kind"] == "AdmissionReview"
        response = cast(Doc, answer["response"])
        assert response["uid"] == review["request"]["uid"]
        assert response["allowed"] is True
        return response

    def close(self) -> None:
        self.connection.close()


def start(config: InjectorConfig, tls_dir: Path) -> Injector:
    return Injector(
        config,
        cert_file=tls_dir / "tls.crt",
        key_file=tls_dir / "tls.key",
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        reload_seconds=0.05,
    )


@pytest.fixture
def native(tls_dir: Path) -> Iterator[Client]:
    config = InjectorConfig(native_sidecar=True, exclude_namespaces=["agentmesh", "kube-system"])
    with running(start(config, tls_dir)) as injector:
        client = Client(injector.port, tls_dir / "ca.crt")
        yield client
        client.close()


@pytest.fixture
def regular(tls_dir: Path) -> Iterator[Client]:
    with running(start(InjectorConfig(native_sidecar=False), tls_dir)) as injector:
        client = Client(injector.port, tls_dir / "ca.crt")
        yield client
        client.close()


# -- reviews ---------------------------------------------------------------------


def example_deployment(name: str) -> Doc:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    return cast(Doc, deployment)


def agent_pod() -> Doc:
    """The example agent's Pod as the API server sends it: without the sidecar."""
    template = copy.deepcopy(example_deployment("agent-with-sidecar.yaml")["spec"]["template"])
    spec = template["spec"]
    spec["containers"] = [c for c in spec["containers"] if c["name"] != SIDECAR_NAME]
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] == "tmp"]
    metadata = template["metadata"]
    metadata["generateName"] = "my-agent-5d4f8b7c9-"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def admission_review(pod: Doc, namespace: str = "my-app", operation: str = "CREATE") -> Doc:
    """An AdmissionReview as kube-apiserver sends it to a mutating webhook."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": operation,
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "groups": ["system:serviceaccounts", "system:authenticated"],
            },
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def patched(pod: Doc, response: Doc) -> Doc:
    assert response["patchType"] == "JSONPatch"
    operations = json.loads(base64.b64decode(response["patch"]))
    return cast(Doc, jsonpatch.apply_patch(pod, operations))


def all_containers(pod: Doc) -> list[Doc]:
    spec = pod["spec"]
    return list(spec.get("initContainers") or []) + list(spec["containers"])


def sidecars(pod: Doc) -> list[Doc]:
    return [c for c in all_containers(pod) if isinstance(c, dict) and c.get("name") == SIDECAR_NAME]


def schema_errors(doc: Doc, versions: list[str]) -> list[str]:
    errors = []
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{version}: {'.'.join(map(str, exc.path))}: {exc.message}")
    return errors


def volume_names(pod: Doc) -> list[str]:
    return [v["name"] for v in pod["spec"].get("volumes", [])]


# -- injection -------------------------------------------------------------------


def test_native_sidecar_injected_into_a_valid_pod(native: Client) -> None:
    pod = agent_pod()
    result = patched(pod, native.review(admission_review(pod)))
    assert schema_errors(result, ["1.29", "1.33", kubernetes_validate.latest_version()]) == []
    (sidecar,) = sidecars(result)
    assert result["spec"]["initContainers"][0] is sidecar
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/health", "port": "proxy"}
    assert [c["name"] for c in result["spec"]["containers"]] == ["agent"]
    mounted = {m["name"] for m in sidecar["volumeMounts"]}
    assert mounted <= set(volume_names(result))
    assert len(volume_names(result)) == len(set(volume_names(result)))
    assert result["metadata"]["annotations"]["agentmesh.io/sidecar"] == "injected"
    # The input is untouched apart from the additions.
    assert result["spec"]["containers"] == pod["spec"]["containers"]


def test_regular_container_where_native_sidecars_are_off(regular: Client) -> None:
    pod = agent_pod()
    result = patched(pod, regular.review(admission_review(pod)))
    # 1.25 has no native sidecars: the regular form validates there too.
    assert schema_errors(result, ["1.25", "1.33", kubernetes_validate.latest_version()]) == []
    (sidecar,) = sidecars(result)
    assert result["spec"]["containers"][-1] is sidecar
    assert "restartPolicy" not in sidecar
    assert "startupProbe" not in sidecar
    assert "initContainers" not in result["spec"]


@pytest.mark.parametrize(
    ("name", "native_sidecar"),
    [("agent-with-sidecar.yaml", False), ("agent-with-native-sidecar.yaml", True)],
)
def test_the_examples_are_what_the_injector_makes(name: str, native_sidecar: bool) -> None:
    """deploy/k8s's agent examples and the injector add the very same sidecar."""
    config = InjectorConfig(native_sidecar=native_sidecar, exclude_namespaces=[])
    pod = agent_pod()
    decision = decide(json.dumps(admission_review(pod)).encode(), config)
    assert decision.patch is not None
    result = jsonpatch.apply_patch(pod, decision.patch)
    example = example_deployment(name)["spec"]["template"]
    expected = {
        c["name"]: c
        for c in example["spec"].get("initContainers", []) + example["spec"]["containers"]
    }
    assert {c["name"]: c for c in all_containers(result)} == expected
    assert sorted(result["spec"]["volumes"], key=lambda v: v["name"]) == sorted(
        example["spec"]["volumes"], key=lambda v: v["name"]
    )


def test_reinjection_is_a_no_op(native: Client) -> None:
    pod = agent_pod()
    once = patched(pod, native.review(admission_review(pod)))
    response = native.review(admission_review(once))
    assert "patch" not in response
    assert "patchType" not in response
    assert len(sidecars(once)) == 1


def test_a_pod_with_a_regular_sidecar_already_is_not_given_a_native_one(native: Client) -> None:
    pod = agent_pod()
    example = example_deployment("agent-with-sidecar.yaml")["spec"]["template"]["spec"]
    pod["spec"]["containers"] = example["containers"]
    pod["spec"]["volumes"] = example["volumes"]
    assert "patch" not in native.review(admission_review(pod))


def test_existing_init_containers_volumes_and_annotations_are_kept(native: Client) -> None:
    pod = agent_pod()
    setup = {
        "name": "setup",
        "image": "busybox:1.36",
        "command": ["true"],
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod["spec"]["initContainers"] = [setup]
    pod["metadata"]["annotations"]["example.com/owner~team"] = "agents"
    result = patched(pod, native.review(admission_review(pod)))
    assert schema_errors(result, ["1.33"]) == []
    assert [c["name"] for c in result["spec"]["initContainers"]] == [SIDECAR_NAME, "setup"]
    assert volume_names(result)[0] == "tmp"
    annotations = result["metadata"]["annotations"]
    assert annotations["example.com/owner~team"] == "agents"
    assert annotations["prometheus.io/port"] == "9091"
    assert annotations["agentmesh.io/sidecar"] == "injected"


def test_a_pod_without_annotations_or_volumes(native: Client) -> None:
    pod: Doc = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bare"},
        "spec": {"containers": [{"name": "agent", "image": "my-company/my-agent:v1.0.0"}]},
    }
    result = patched(pod, native.review(admission_review(pod)))
    assert schema_errors(result, ["1.33"]) == []
    assert len(sidecars(result)) == 1
    assert sorted(volume_names(result)) == ["agentmesh-health", "agentmesh-policy", "agentmesh-tmp"]
    assert result["metadata"]["annotations"] == {"agentmesh.io/sidecar": "injected"}


def test_the_agent_key_comes_from_the_secret_the_pod_names(native: Client) -> None:
    pod = agent_pod()
    pod["metadata"]["annotations"]["agentmesh.io/agent-key-secret"] = "my-agent-key"
    (sidecar,) = sidecars(patched(pod, native.review(admission_review(pod))))
    env = {e["name"]: e for e in sidecar["env"]}
    key_ref = env["AGENTMESH_AGENT_PRIVATE_KEY"]["valueFrom"]["secretKeyRef"]
    assert key_ref == {"name": "my-agent-key", "key": "private-key"}


def test_an_invalid_key_annotation_is_allowed_with_a_warning_and_no_patch(native: Client) -> None:
    pod = agent_pod()
    pod["metadata"]["annotations"]["agentmesh.io/agent-key-secret"] = "Not A Name!"
    response = native.review(admission_review(pod))
    assert "patch" not in response
    assert "agentmesh.io/agent-key-secret" in response["warnings"][0]


# -- left alone ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "key", "value"),
    [
        ("annotations", "agentmesh.io/inject", "false"),
        ("annotations", "agentmesh.io/inject", "disabled"),
        ("labels", "agentmesh-inject", "disabled"),
    ],
)
def test_opt_out_is_untouched(native: Client, where: str, key: str, value: str) -> None:
    pod = agent_pod()
    pod["metadata"].setdefault(where, {})[key] = value
    response = native.review(admission_review(pod))
    assert "patch" not in response
    assert "patchType" not in response


def test_the_injectors_own_namespace_is_untouched(native: Client) -> None:
    pod = agent_pod()
    assert "patch" not in native.review(admission_review(pod, namespace="agentmesh"))
    assert "patch" not in native.review(admission_review(pod, namespace="kube-system"))


@pytest.mark.parametrize("operation", ["UPDATE", "DELETE", "CONNECT"])
def test_other_operations_are_untouched(native: Client, operation: str) -> None:
    assert "patch" not in native.review(admission_review(agent_pod(), operation=operation))


def test_other_kinds_are_untouched(native: Client) -> None:
    review = admission_review({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}})
    review["request"]["kind"] = {"group": "", "version": "v1", "kind": "ConfigMap"}
    assert "patch" not in native.review(review)


MALFORMED: list[tuple[str, bytes, str]] = [
    ("not json", b"{this is not json", ""),
    ("not utf-8", b"\xff\xfe\x00", ""),
    ("a list", b"[1, 2, 3]", ""),
    ("no request", b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', ""),
    (
        "v1beta1",
        b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",'
        b' "request": {"uid": "u-1"}}',
        "u-1",
    ),
    (
        "uid not a string",
        b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": 7}}',
        "",
    ),
]


@pytest.mark.parametrize(("label", "body", "uid"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_review_is_allowed_without_a_patch(
    native: Client, label: str, body: bytes, uid: str
) -> None:
    status, answer = native.post(body)
    assert status == 200, label
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"] == {"uid": uid, "allowed": True}


def test_a_failure_inside_the_injector_still_allows_the_pod(
    tls_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(body: bytes, config: InjectorConfig) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("agentmesh.injector.decide", broken)
    with running(start(InjectorConfig(), tls_dir)) as injector:
        client = Client(injector.port, tls_dir / "ca.crt")
        review = admission_review(agent_pod())
        response = client.review(review)  # checks allowed and the echoed uid
        client.close()
    assert "patch" not in response
    text = generate_latest(injector.metrics.registry).decode()
    assert 'agentmesh_injector_reviews_total{outcome="error"} 1.0' in text


def test_a_pod_without_a_usable_spec_is_allowed_without_a_patch(native: Client) -> None:
    for pod in (
        {"apiVersion": "v1", "kind": "Pod", "metadata": {}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": {"containers": "agent"}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": "x", "spec": {"containers": []}},
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"annotations": ["a"]},
            "spec": {"containers": []},
        },
    ):
        response = native.review(admission_review(pod))
        assert "patch" not in response, pod


# -- the server ------------------------------------------------------------------


def test_metrics_count_every_outcome(tls_dir: Path) -> None:
    with running(start(InjectorConfig(exclude_namespaces=["agentmesh"]), tls_dir)) as injector:
        client = Client(injector.port, tls_dir / "ca.crt")
        pod = agent_pod()
        client.review(admission_review(pod))
        client.review(admission_review(pod, namespace="agentmesh"))
        client.post(b"garbage")
        client.close()
        metrics = http.client.HTTPConnection("127.0.0.1", injector.metrics_port, timeout=10)
        metrics.request("GET", "/metrics")
        text = metrics.getresponse().read().decode()
        metrics.close()
    assert 'agentmesh_injector_reviews_total{outcome="injected"} 1.0' in text
    assert 'agentmesh_injector_reviews_total{outcome="excluded_namespace"} 1.0' in text
    assert 'agentmesh_injector_reviews_total{outcome="malformed"} 1.0' in text
    assert 'agentmesh_injector_reviews_total{outcome="opted_out"} 0.0' in text
    assert "agentmesh_injector_review_duration_seconds_count 3.0" in text
    assert 'agentmesh_injector_review_duration_seconds_bucket{le="0.0001"}' in text


def test_plain_http_and_wrong_paths_get_nothing(native: Client, tls_dir: Path) -> None:
    native.connection.request("POST", "/other", body=b"{}")
    response = native.connection.getresponse()
    response.read()
    assert response.status == 404
    native.connection.request("GET", "/healthz")
    health = native.connection.getresponse()
    assert (health.status, health.read()) == (200, b"ok\n")
    # Without TLS the server says nothing useful and the connection ends.
    port = native.connection.port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(b"POST /inject HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        try:
            answer = raw.recv(4096)
        except ConnectionResetError:
            answer = b""
        assert b"AdmissionReview" not in answer


def test_a_renewed_certificate_is_picked_up(tmp_path: Path) -> None:
    make_certificates(tmp_path, serial=1)
    config = InjectorConfig()
    with running(start(config, tmp_path)) as injector:
        first = ssl.get_server_certificate(("127.0.0.1", injector.port))
        time.sleep(0.05)  # a later modification time
        make_certificates(tmp_path, serial=2)
        deadline = time.monotonic() + 5
        second = first
        while second == first and time.monotonic() < deadline:
            time.sleep(0.05)
            second = ssl.get_server_certificate(("127.0.0.1", injector.port))
        assert second != first
        client = Client(injector.port, tmp_path / "ca.crt")  # the new CA verifies it
        client.review(admission_review(agent_pod()))
        client.close()


def test_a_bad_config_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("policy: lenient\n")
    with pytest.raises(ValueError, match=r"config\.yaml.*policy"):
        InjectorConfig.load(bad)
    bad.write_text("imagee: typo\n")
    with pytest.raises(ValueError, match="imagee"):
        InjectorConfig.load(bad)
    good = tmp_path / "good.yaml"
    good.write_text("image: registry.example.com/agentmesh/sidecar:0.1.0\nnativeSidecar: false\n")
    assert InjectorConfig.load(good).native_sidecar is False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_agentmesh_serve_injector_runs_and_stops_on_sigterm(tls_dir: Path, tmp_path: Path) -> None:
    assert _parser().parse_args(["serve", "injector"]).port == 8443
    config = tmp_path / "config.yaml"
    config.write_text("nativeSidecar: true\npolicy: strict\n")
    port, metrics_port = free_port(), free_port()
    env = os.environ | {"AGENTMESH_LOG_FORMAT": "json"}
    process = subprocess.Popen(
        [sys.executable, "-m", "agentmesh", "serve", "injector", "--config", str(config),
         "--tls-cert", str(tls_dir / "tls.crt"), "--tls-key", str(tls_dir / "tls.key"),
         "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port)],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                client = Client(port, tls_dir / "ca.crt")
                response = client.review(admission_review(agent_pod()))
                client.close()
                break
            except OSError:
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline, "the injector did not start"
                time.sleep(0.1)
        assert len(sidecars(patched(agent_pod(), response))) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    assert "injector_listening" in stderr


def test_agentmesh_serve_injector_names_a_missing_certificate(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agentmesh", "serve", "injector",
         "--tls-cert", str(tmp_path / "none.crt"), "--tls-key", str(tmp_path / "none.key"),
         "--port", str(free_port()), "--metrics-port", str(free_port())],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("agentmesh: error: injector:")
    assert "none.crt" in result.stderr


# -- whatever arrives, the answer allows and any patch applies -------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)
POD_KEYS = st.sampled_from(
    ["containers", "initContainers", "volumes", "annotations", "labels", "metadata", "spec"]
)


@st.composite
def mangled_pods(draw: st.DrawFn) -> Doc:
    """The example agent Pod with a few fields replaced by arbitrary JSON."""
    pod = agent_pod()
    for _ in range(draw(st.integers(0, 3))):
        key, value = draw(POD_KEYS), draw(JSON)
        if key in ("metadata", "spec"):
            pod[key] = value
        elif key in ("annotations", "labels") and isinstance(pod.get("metadata"), dict):
            pod["metadata"][key] = value
        elif isinstance(pod.get("spec"), dict):
            pod["spec"][key] = value
    return pod


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mangled_pods(), st.sampled_from(["my-app", "kube-system"]), st.booleans())
def test_any_pod_is_allowed_and_any_patch_applies(pod: Doc, namespace: str, native: bool) -> None:
    config = InjectorConfig(native_sidecar=native)
    review = admission_review(pod, namespace=namespace)
    answer = json.loads(decide(json.dumps(review).encode(), config).response())
    response = answer["response"]
    assert response["allowed"] is True
    assert response["uid"] == review["request"]["uid"]
    if "patch" in response:
        result = patched(pod, response)
        assert len(sidecars(result)) == 1


@settings(max_examples=200, deadline=None)
@given(JSON)
def test_any_json_is_answered_allowed(document: object) -> None:
    answer = json.loads(decide(json.dumps(document).encode(), InjectorConfig()).response())
    assert answer["response"]["allowed"] is True
    assert "patch" not in answer["response"]
