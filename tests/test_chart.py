"""charts/agentmesh, rendered and linted by Helm's own engine (no helm binary).

``helm-python-sdk`` binds Helm v4's Go library: ``Chart.render`` is what
``helm install`` renders, ``lint`` is ``helm lint``, a value that breaks
``values.schema.json`` raises ``HelmValuesError`` naming its path. Every
rendered manifest is validated against the Kubernetes schemas. That secrets
survive upgrades is shown with ``lookup`` answered by a fake Kubernetes API on
loopback.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
import tomllib
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import helm_python
import kubernetes_validate  # ships no type information
import pytest
import yaml
from cryptography import x509

from agentmesh.cli import _parser
from agentmesh.injector import SIDECAR_NAME, Injector, InjectorConfig, running
from agentmesh.settings import Settings
from ledger.identity import SigningKey

Doc = dict[str, Any]
REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "agentmesh"
RELEASE = NAMESPACE = "agentmesh"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
GUIDE = Path(__file__).resolve().parents[2] / "shared" / "seed" / "kubernetes-deployment-guide.md"
CRDS = {"monitoring.coreos.com/v1", "cert-manager.io/v1"}
EXTERNAL: Doc = {
    "postgresql": {"enabled": False},
    "externalDatabase": {"url": "postgresql://agentmesh:pw@db.example.com:5432/agentmesh"},
    "redis": {"enabled": False, "auth": {"password": "redis-pw"}},
    "externalRedis": {"host": "redis.example.com", "port": 6380},
}
INJECTOR: Doc = {"sidecarInjector": {"enabled": True}}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def render(
    chart: helm_python.Chart,
    values: Doc | None = None,
    *,
    is_install: bool = True,
    is_upgrade: bool = False,
) -> dict[str, list[Doc]]:
    """Template file name -> its resources."""
    rendered = chart.render(
        values or {},
        name=RELEASE,
        namespace=NAMESPACE,
        is_install=is_install,
        is_upgrade=is_upgrade,
    )
    return {Path(p).name: parse(text) for p, text in rendered.items() if p.endswith(".yaml")}


def parse(text: str) -> list[Doc]:
    return [cast(Doc, d) for d in yaml.safe_load_all(text) if d is not None]


def resources(rendered: dict[str, list[Doc]]) -> list[Doc]:
    return [doc for name, docs in rendered.items() if name.endswith(".yaml") for doc in docs]


def one(rendered: dict[str, list[Doc]], kind: str, name: str) -> Doc:
    found = [d for d in resources(rendered) if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def secret_data(rendered: dict[str, list[Doc]], name: str) -> dict[str, str]:
    data = one(rendered, "Secret", name)["data"]
    return {k: base64.b64decode(v).decode() for k, v in data.items()}


def pod_specs(rendered: dict[str, list[Doc]]) -> Iterator[tuple[Doc, Doc]]:
    for doc in resources(rendered):
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield doc, doc["spec"]["template"]["spec"]
        elif doc["kind"] == "CronJob":
            yield doc, doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def schema_errors(docs: list[Doc], versions: list[str]) -> list[str]:
    errors = []
    for doc in docs:
        if doc["apiVersion"] in CRDS:
            continue  # not in the Kubernetes schemas
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(map(str, exc.path))
                errors.append(f"{doc['kind']}/{doc['metadata']['name']} {version}: {where}")
    return errors


VERSIONS = ["1.25", "1.33", kubernetes_validate.latest_version()]
CASES: dict[str, Doc] = {
    "defaults": {},
    "injector": INJECTOR,
    "injector-cert-manager": {
        "sidecarInjector": {"enabled": True, "certManager": {"enabled": True}}
    },
    "external": EXTERNAL,
    "monitoring": {
        "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}
    },
    "existing-secrets": {
        "secrets": {"existingSecret": "my-secrets"},
        "ledger": {"existingSecret": "my-ledger-key"},
    },
}


# -- lint and render ---------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_lint_is_clean(case: str) -> None:
    report = helm_python.lint(CHART, CASES[case], strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rendered_manifest_validates(chart: helm_python.Chart, case: str) -> None:
    docs = resources(render(chart, CASES[case]))
    assert docs
    assert schema_errors(docs, VERSIONS) == []
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names))
    for doc in docs:
        if doc["kind"] not in ("Namespace", "MutatingWebhookConfiguration"):
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "agentmesh"


def test_every_workload_of_deploy_k8s_is_in_the_chart(chart: helm_python.Chart) -> None:
    rendered = render(chart, CASES["monitoring"])
    kinds = {(d["kind"], d["metadata"]["name"]) for d in resources(rendered)}
    assert {
        ("Deployment", "agentmesh-server"),
        ("Deployment", "agentmesh-projector"),
        ("Service", "agentmesh"),
        ("Service", "agentmesh-projector"),
        ("HorizontalPodAutoscaler", "agentmesh-server"),
        ("Job", "agentmesh-migrate"),
        ("CronJob", "agentmesh-retention"),
        ("ConfigMap", "agentmesh-config"),
        ("ServiceAccount", "agentmesh"),
        ("Secret", "agentmesh-agent-keys"),
        ("Secret", "agentmesh-secrets"),
        ("ServiceMonitor", "agentmesh"),
        ("PrometheusRule", "agentmesh-alerts"),
        ("StatefulSet", "agentmesh-postgresql"),
        ("StatefulSet", "agentmesh-redis"),
        ("Service", "agentmesh-postgresql"),
        ("Service", "agentmesh-redis-master"),
    } <= kinds
    defaults = {(d["kind"], d["metadata"]["name"]) for d in resources(render(chart))}
    assert not {k for k in defaults if k[0] in ("ServiceMonitor", "PrometheusRule")}


def test_images_follow_the_package_version(chart: helm_python.Chart) -> None:
    assert chart.metadata["version"] == VERSION
    assert chart.metadata["appVersion"] == VERSION
    rendered = render(chart, INJECTOR)
    images = {c["image"] for _, spec in pod_specs(rendered) for c in spec["containers"]}
    ours = {i for i in images if i.startswith("agentmesh/")}
    assert ours == {f"agentmesh/server:{VERSION}"}
    config = yaml.safe_load(one(rendered, "ConfigMap", "agentmesh-injector")["data"]["config.yaml"])
    assert config["image"] == f"agentmesh/sidecar:{VERSION}"
    custom = render(chart, {"image": {"server": {"repository": "r.example.com/am", "tag": "x1"}}})
    (api,) = one(custom, "Deployment", "agentmesh-server")["spec"]["template"]["spec"]["containers"]
    assert api["image"] == "r.example.com/am:x1"


def test_every_pod_is_non_root_and_locked_down(chart: helm_python.Chart) -> None:
    for doc, spec in pod_specs(render(chart, INJECTOR)):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, doc["metadata"]["name"]
        assert pod["runAsUser"] != 0
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in spec["containers"]:
            own = container["securityContext"]
            assert own["readOnlyRootFilesystem"] is True
            assert own["allowPrivilegeEscalation"] is False
            assert own["capabilities"]["drop"] == ["ALL"]


def test_the_bundled_databases_keep_their_data(chart: helm_python.Chart) -> None:
    rendered = render(chart, {"postgresql": {"persistence": {"size": "20Gi"}}})
    for name, mount in (
        ("agentmesh-postgresql", "/var/lib/postgresql/data"),
        ("agentmesh-redis", "/data"),
    ):
        statefulset = one(rendered, "StatefulSet", name)
        (claim,) = statefulset["spec"]["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "data"
        (container,) = statefulset["spec"]["template"]["spec"]["containers"]
        assert {"name": "data", "mountPath": mount} in container["volumeMounts"]
    claim = one(rendered, "StatefulSet", "agentmesh-postgresql")["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"


# -- configuration -----------------------------------------------------------------


def guide_configmap() -> dict[str, str]:
    import re

    for body in re.findall(r"```yaml\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL):
        if body.startswith("# configmap.yaml"):
            return cast(dict[str, str], yaml.safe_load(body)["data"])
    raise AssertionError("the guide has no configmap.yaml")


def test_the_configmap_has_every_guide_key_and_settings_parse_it(chart: helm_python.Chart) -> None:
    data = one(render(chart), "ConfigMap", "agentmesh-config")["data"]
    guide = guide_configmap()
    assert set(guide) <= set(data)
    for key, value in guide.items():
        if key != "AGENTMESH_REDIS_HOST":  # the bundled Redis: agentmesh-redis-master as well
            assert data[key] == value, key
    assert data["AGENTMESH_REDIS_HOST"] == "agentmesh-redis-master"
    Settings.from_env(data)  # every value parses


def test_the_guides_helm_command(chart: helm_python.Chart) -> None:
    # helm install ... --set redis.auth.password=your-secure-password --set storage.backend=redis
    values = helm_python.parse_set_string(
        "redis.auth.password=your-secure-password,storage.backend=redis"
    )
    rendered = render(chart, values)
    assert secret_data(rendered, "agentmesh-secrets")["redis-password"] == "your-secure-password"
    assert one(rendered, "ConfigMap", "agentmesh-config")["data"]["AGENTMESH_STORAGE_BACKEND"] == (
        "redis"
    )


def test_config_values_from_set_become_strings(chart: helm_python.Chart) -> None:
    values = helm_python.parse_set_string(
        "config.AGENTMESH_CACHE_TTL=600,config.AGENTMESH_CACHE_ENABLED=false,"
        "config.AGENTMESH_TRUST_DECAY_RATE=1.5"
    )
    data = one(render(chart, values), "ConfigMap", "agentmesh-config")["data"]
    assert (data["AGENTMESH_CACHE_TTL"], data["AGENTMESH_CACHE_ENABLED"]) == ("600", "false")
    assert data["AGENTMESH_TRUST_DECAY_RATE"] == "1.5"
    settings = Settings.from_env(data)
    assert (settings.cache_ttl, settings.cache_enabled) == (600, False)


def test_external_postgresql_and_redis(chart: helm_python.Chart) -> None:
    rendered = render(chart, EXTERNAL)
    assert not [d for d in resources(rendered) if d["kind"] == "StatefulSet"]
    secrets = secret_data(rendered, "agentmesh-secrets")
    assert secrets["database-url"] == EXTERNAL["externalDatabase"]["url"]
    assert secrets["redis-password"] == "redis-pw"
    assert "postgres-password" not in secrets
    data = one(rendered, "ConfigMap", "agentmesh-config")["data"]
    assert (data["AGENTMESH_REDIS_HOST"], data["AGENTMESH_REDIS_PORT"]) == (
        "redis.example.com",
        "6380",
    )


def test_external_postgresql_needs_a_url(chart: helm_python.Chart) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=r"externalDatabase\.url"):
        render(chart, {"postgresql": {"enabled": False}})
    with pytest.raises(helm_python.HelmRenderError, match=r"externalRedis\.host"):
        render(chart, {"redis": {"enabled": False}})


@pytest.mark.parametrize(
    ("values", "path"),
    [
        ({"api": {"replicas": "three"}}, "/api/replicas"),
        ({"storage": {"backend": "mysql"}}, "/storage/backend"),
        ({"sidecarInjector": {"failurePolicy": "Sometimes"}}, "/sidecarInjector/failurePolicy"),
        ({"sidecarInjector": {"nativeSidecar": "maybe"}}, "/sidecarInjector/nativeSidecar"),
        ({"config": {"AGENTMESH_LOG_LEVEL": "LOUD"}}, "/config/AGENTMESH_LOG_LEVEL"),
        ({"config": {"AGENTMESH_ADMIN_TOKEN": "x"}}, "/config/AGENTMESH_ADMIN_TOKEN"),
        ({"config": {"AGENTMESH_REDIS_HOST": "x"}}, "/config/AGENTMESH_REDIS_HOST"),
        ({"config": {"LOG_LEVEL": "INFO"}}, "LOG_LEVEL"),
        ({"replicaCount": 3}, "replicaCount"),
        ({"externalDatabase": {"url": "mysql://x"}}, "/externalDatabase/url"),
        ({"redis": {"port": 70000}}, "/redis/port"),
        ({"config": {"AGENTMESH_CACHE_TTL": -5}}, "/config/AGENTMESH_CACHE_TTL"),
        ({"config": {"AGENTMESH_CACHE_ENABLED": "yes"}}, "/config/AGENTMESH_CACHE_ENABLED"),
    ],
)
def test_a_wrong_value_fails_with_its_path(
    chart: helm_python.Chart, values: Doc, path: str
) -> None:
    with pytest.raises(helm_python.HelmValuesError) as failure:
        render(chart, values)
    assert path in str(failure.value)


def test_the_migrations_run_as_a_hook_on_upgrade(chart: helm_python.Chart) -> None:
    install = one(render(chart), "Job", "agentmesh-migrate")
    assert "helm.sh/hook" not in install["metadata"].get("annotations", {})
    upgrade = one(render(chart, is_install=False, is_upgrade=True), "Job", "agentmesh-migrate")
    annotations = upgrade["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]


def test_notes_tell_how_to_reach_the_api_and_get_the_token(chart: helm_python.Chart) -> None:
    notes = chart.render({}, name=RELEASE, namespace=NAMESPACE)["agentmesh/templates/NOTES.txt"]
    assert "port-forward svc/agentmesh 8080:8080" in notes
    assert "get secret agentmesh-secrets" in notes
    assert "{.data.admin-token}" in notes
    injector = chart.render(INJECTOR, name=RELEASE, namespace=NAMESPACE)
    assert "agentmesh-inject=enabled" in injector["agentmesh/templates/NOTES.txt"]


# -- secrets -----------------------------------------------------------------------


def test_secrets_are_generated_when_not_given(chart: helm_python.Chart) -> None:
    first, second = render(chart), render(chart)
    keys = secret_data(first, "agentmesh-agent-keys")
    SigningKey.from_pem(keys["private-key"])  # a real Ed25519 key the processes accept
    secrets = secret_data(first, "agentmesh-secrets")
    assert len(secrets["admin-token"]) == 48
    assert secrets["admin-token"].isalnum()
    password = secrets["postgres-password"]
    assert len(password) == 32
    assert secrets["database-url"] == (
        f"postgresql://agentmesh:{password}@agentmesh-postgresql:5432/agentmesh"
    )
    assert len(secrets["redis-password"]) == 32
    Settings.from_env({"AGENTMESH_DATABASE_URL": secrets["database-url"]})
    # Random each time: only lookup (below) keeps them across upgrades.
    assert secret_data(second, "agentmesh-secrets")["admin-token"] != secrets["admin-token"]
    for name in ("agentmesh-agent-keys", "agentmesh-secrets"):
        secret = one(first, "Secret", name)
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_given_secrets_are_used_verbatim(chart: helm_python.Chart) -> None:
    pem = SigningKey.generate().private_key_pem()
    values: Doc = {
        "secrets": {"adminToken": "t0ken"},
        "postgresql": {"auth": {"password": "pgpw"}},
        "ledger": {"privateKey": pem},
    }
    rendered = render(chart, values)
    secrets = secret_data(rendered, "agentmesh-secrets")
    assert secrets["admin-token"] == "t0ken"
    assert secrets["postgres-password"] == "pgpw"
    assert ":pgpw@" in secrets["database-url"]
    assert secret_data(rendered, "agentmesh-agent-keys")["private-key"] == pem


def test_existing_secrets_are_referenced_and_nothing_is_generated(chart: helm_python.Chart) -> None:
    rendered = render(chart, CASES["existing-secrets"])
    assert not [d for d in resources(rendered) if d["kind"] == "Secret"]
    refs = set()
    for _, spec in pod_specs(rendered):
        for container in spec["containers"]:
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
    assert ("my-ledger-key", "private-key") in refs
    assert {("my-secrets", k) for k in ("database-url", "admin-token", "redis-password")} <= refs
    assert not {name for name, _ in refs} - {"my-secrets", "my-ledger-key"}


class FakeKubernetes:
    """Enough of the Kubernetes API for Helm's ``lookup`` of Secrets."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], Doc] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0].strip("/").split("/")
                status, body = 404, {"kind": "Status", "status": "Failure", "code": 404}
                if path == ["api"]:
                    status, body = 200, {"kind": "APIVersions", "versions": ["v1"]}
                elif path == ["api", "v1"]:
                    resource = {"name": "secrets", "singularName": "secret", "namespaced": True,
                                "kind": "Secret", "verbs": ["get", "list"]}  # fmt: skip
                    status, body = 200, {"kind": "APIResourceList", "groupVersion": "v1",
                                         "resources": [resource]}  # fmt: skip
                elif len(path) == 6 and path[:3] == ["api", "v1", "namespaces"]:
                    found = fake.secrets.get((path[3], path[5]))
                    if path[4] == "secrets" and found is not None:
                        status, body = 200, found
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def kubeconfig(self) -> str:
        server = f"http://127.0.0.1:{self.server.server_address[1]}"
        return yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": server}}],
                "users": [{"name": "helm", "user": {"token": "fake"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "helm"}}],
                "current-context": "fake",
            }
        )

    def apply(self, rendered: dict[str, list[Doc]]) -> None:
        for doc in resources(rendered):
            if doc["kind"] == "Secret":
                self.secrets[(doc["metadata"]["namespace"], doc["metadata"]["name"])] = doc

    def __enter__(self) -> FakeKubernetes:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def test_secrets_and_certificates_are_kept_across_upgrades(chart: helm_python.Chart) -> None:
    with (
        FakeKubernetes() as cluster,
        helm_python.Config(kubeconfig_content=cluster.kubeconfig(), namespace=NAMESPACE) as config,
    ):

        def live(values: Doc, *, install: bool) -> dict[str, list[Doc]]:
            rendered = config.render(chart, values, name=RELEASE, namespace=NAMESPACE,
                                     is_install=install, is_upgrade=not install)  # fmt: skip
            return {Path(p).name: parse(t) for p, t in rendered.items() if p.endswith(".yaml")}

        installed = live(INJECTOR, install=True)
        cluster.apply(installed)
        upgraded = live(INJECTOR | {"api": {"replicas": 5}}, install=False)
        for name in ("agentmesh-agent-keys", "agentmesh-secrets", "agentmesh-injector-tls"):
            assert one(upgraded, "Secret", name)["data"] == one(installed, "Secret", name)["data"]
        webhook = "agentmesh-injector-agentmesh"
        bundle = [one(r, "MutatingWebhookConfiguration", webhook)["webhooks"][0]["clientConfig"]
                  ["caBundle"] for r in (installed, upgraded)]  # fmt: skip
        assert bundle[0] == bundle[1]
        # An explicitly given value still wins over the kept one.
        changed = live({"secrets": {"adminToken": "rotated"}}, install=False)
        assert secret_data(changed, "agentmesh-secrets")["admin-token"] == "rotated"
        # Without the live Secret (a fresh cluster), new ones would be generated.
        cluster.secrets.clear()
        fresh = live(INJECTOR, install=True)
        assert (one(fresh, "Secret", "agentmesh-agent-keys")["data"]
                != one(installed, "Secret", "agentmesh-agent-keys")["data"])  # fmt: skip


# -- the injector ------------------------------------------------------------------


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector, evaluated as the API server does."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def webhook_of(rendered: dict[str, list[Doc]]) -> Doc:
    configuration = one(rendered, "MutatingWebhookConfiguration", "agentmesh-injector-agentmesh")
    (webhook,) = configuration["webhooks"]
    return cast(Doc, webhook)


def test_the_webhook_selects_only_labelled_namespaces(chart: helm_python.Chart) -> None:
    webhook = webhook_of(render(chart, INJECTOR))
    selector = webhook["namespaceSelector"]

    def namespace(name: str, **labels: str) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": name} | labels

    assert selects(selector, namespace("my-app", **{"agentmesh-inject": "enabled"}))
    assert not selects(selector, namespace("my-app"))  # unlabelled: never sent
    assert not selects(selector, namespace("other", **{"agentmesh-inject": "disabled"}))
    # The injector's own namespace, even if labelled.
    assert not selects(selector, namespace(NAMESPACE, **{"agentmesh-inject": "enabled"}))
    assert not selects(selector, namespace("kube-system", **{"agentmesh-inject": "enabled"}))
    objects = webhook["objectSelector"]
    assert selects(objects, {"app": "x"})
    assert not selects(objects, {"agentmesh-inject": "disabled"})
    assert webhook["admissionReviewVersions"] == ["v1"]
    assert webhook["sideEffects"] == "None"
    assert webhook["failurePolicy"] == "Ignore"
    assert webhook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                 "resources": ["pods"], "scope": "Namespaced"}]  # fmt: skip
    assert webhook["clientConfig"]["service"] == {
        "name": "agentmesh-injector", "namespace": NAMESPACE, "path": "/inject", "port": 443
    }  # fmt: skip
    failing = webhook_of(
        render(chart, {"sidecarInjector": {"enabled": True, "failurePolicy": "Fail"}})
    )
    assert failing["failurePolicy"] == "Fail"


def test_cert_manager_mode_injects_the_ca_from_its_certificate(chart: helm_python.Chart) -> None:
    rendered = render(chart, CASES["injector-cert-manager"])
    configuration = one(rendered, "MutatingWebhookConfiguration", "agentmesh-injector-agentmesh")
    annotation = configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    assert annotation == f"{NAMESPACE}/agentmesh-injector"
    assert "caBundle" not in configuration["webhooks"][0]["clientConfig"]
    certificate = one(rendered, "Certificate", "agentmesh-injector")
    assert certificate["spec"]["secretName"] == "agentmesh-injector-tls"
    assert "agentmesh-injector.agentmesh.svc" in certificate["spec"]["dnsNames"]
    assert one(rendered, "Issuer", "agentmesh-injector-selfsigned")["spec"] == {"selfSigned": {}}
    assert not [
        d for d in resources(rendered) if d["kind"] == "Secret" and "tls" in d["metadata"]["name"]
    ]


def test_native_sidecars_follow_the_cluster_version_unless_set(chart: helm_python.Chart) -> None:
    def native(setting: object) -> bool:
        values = {"sidecarInjector": {"enabled": True, "nativeSidecar": setting}}
        configmap = one(render(chart, values), "ConfigMap", "agentmesh-injector")
        return bool(yaml.safe_load(configmap["data"]["config.yaml"])["nativeSidecar"])

    assert native("auto") is True  # Helm's default cluster version is past 1.29
    assert native(False) is False
    assert native(True) is True


def exchange(port: int, ca: bytes, server_name: str, body: bytes) -> Doc:
    context = ssl.create_default_context(cadata=ca.decode())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        tls.sendall(
            b"POST /inject HTTP/1.1\r\nHost: " + server_name.encode() + b"\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    return cast(Doc, json.loads(payload))


def test_the_rendered_injector_serves_with_its_rendered_tls_and_config(
    chart: helm_python.Chart, tmp_path: Path
) -> None:
    """What the chart installs works together: certificate, caBundle, config, args."""
    rendered = render(chart, INJECTOR)
    tls = secret_data(rendered, "agentmesh-injector-tls")
    ca_bundle = base64.b64decode(webhook_of(rendered)["clientConfig"]["caBundle"])
    assert ca_bundle.decode() == tls["ca.crt"]
    certificate = x509.load_pem_x509_certificate(tls["tls.crt"].encode())
    ca = x509.load_pem_x509_certificate(ca_bundle)
    certificate.verify_directly_issued_by(ca)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "agentmesh-injector.agentmesh.svc" in names.get_values_for_type(x509.DNSName)

    deployment = one(rendered, "Deployment", "agentmesh-injector")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = _parser().parse_args(container["args"])
    assert (args.port, args.metrics_port) == (8443, 9093)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "agentmesh-injector-tls"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert str(args.tls_cert.parent) == mounts["tls"]
    assert str(args.config.parent) == mounts["config"]

    (tmp_path / "tls.crt").write_text(tls["tls.crt"])
    (tmp_path / "tls.key").write_text(tls["tls.key"])
    config_file = tmp_path / "config.yaml"
    config_file.write_text(one(rendered, "ConfigMap", "agentmesh-injector")["data"]["config.yaml"])
    config = InjectorConfig.load(config_file)
    assert NAMESPACE in config.exclude_namespaces
    injector = Injector(config, cert_file=tmp_path / "tls.crt", key_file=tmp_path / "tls.key",
                        host="127.0.0.1", port=0, metrics_port=0)  # fmt: skip
    agent = {"name": "agent", "image": "my-company/my-agent:v1.0.0"}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "agent"},
           "spec": {"containers": [agent]}}  # fmt: skip
    request = {"uid": str(uuid.uuid4()), "kind": {"group": "", "version": "v1", "kind": "Pod"},
               "namespace": "my-app", "operation": "CREATE", "object": pod}  # fmt: skip
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    with running(injector):
        answer = exchange(injector.port, ca_bundle, "agentmesh-injector.agentmesh.svc",
                          json.dumps(review).encode())  # fmt: skip
    response = answer["response"]
    assert response["allowed"] is True
    patch = json.loads(base64.b64decode(response["patch"]))
    added = [op["value"] for op in patch if op["path"].startswith("/spec/initContainers")]
    assert added[0][0]["name"] == SIDECAR_NAME
    assert added[0][0]["image"] == f"agentmesh/sidecar:{VERSION}"
