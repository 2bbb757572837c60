"""Offline checks of the Kubernetes manifests in deploy/k8s.

deploy/k8s is rendered from charts/agentmesh (``make k8s``); the first test
renders the chart again with Helm's engine and fails on any drift.

Every resource validates against the Kubernetes OpenAPI schemas bundled with
``kubernetes-validate`` (no cluster needed); the Prometheus Operator's CRDs are
checked by explicit assertions. The manifests are also held to the seed
deployment guide (the user's contract): each of its YAML blocks must be
contained in our file, except for the deviations listed in ``DEVIATIONS``.
"""

from __future__ import annotations

import base64
import importlib.util
import re
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import kubernetes_validate  # ships no type information
import pytest
import yaml

from agentmesh.cli import _parser
from agentmesh.settings import Settings, default_of, setting_keys
from agentmesh.sidecar_main import parse_upstreams
from sidecar.policy import Action, RateLimiter, TrustInfo, decide, parse_policy

Doc = dict[str, Any]

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
# The guide lives in shared/ beside the clone: /work/shared here, <clone>/../shared in CI.
GUIDE = Path(__file__).resolve().parents[2] / "shared" / "seed" / "kubernetes-deployment-guide.md"

# Schema versions: the oldest bundled (closest to the guide's "v1.24 or later"),
# one where native sidecars are GA, and the newest bundled.
OLDEST = "1.25"
NATIVE_SIDECAR_MIN = "1.29"
CURRENT = "1.33"

EXAMPLES = {"agent-with-sidecar.yaml", "agent-with-native-sidecar.yaml"}
NOT_IN_KUSTOMIZATION = EXAMPLES | {"secret.yaml", "kustomization.yaml"}
CRD_GROUP = "monitoring.coreos.com/v1"
# Image tags follow the package version (pyproject.toml), as the chart's appVersion does.
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
AGENTMESH_IMAGES = {f"agentmesh/server:{VERSION}", f"agentmesh/sidecar:{VERSION}"}
SECRET_LIKE = re.compile(r"PRIVATE_KEY|TOKEN|PASSWORD|DATABASE_URL")
SETTINGS_CONFIGMAP = "agentmesh-config"
POLICY_CONFIGMAP = "agentmesh-sidecar-policy"
# What only the sidecar reads: in the agent examples' ConfigMap, not the server's.
SIDECAR_ONLY = {"AGENTMESH_API_URL", "AGENTMESH_UPSTREAMS", "AGENTMESH_POLICY_FILE"}
PLACEHOLDER = base64.b64encode(b"REPLACE_ME").decode()

# Where our manifests differ from the guide's YAML on purpose, and why.
DEVIATIONS = {
    "agent-with-sidecar.yaml: Deployment/my-agent.spec.template.spec"
    ".containers[agentmesh-sidecar].image": (
        "image tags follow the package version (pyproject.toml), not the guide's 1.0.0-alpha1"
    ),
    "deployment.yaml: Deployment/agentmesh-server.spec.template.spec.containers[agentmesh].image": (
        "image tags follow the package version (pyproject.toml), not the guide's 1.0.0-alpha1"
    ),
    "agent-with-sidecar.yaml: Deployment/my-agent.spec.template.spec"
    ".containers[agentmesh-sidecar].volumeMounts[tmp]": (
        "the sidecar's /tmp is its own emptyDir (agentmesh-tmp), as the injector adds it:"
        " an injected sidecar must not share or collide with the agent's volumes"
    ),
    "secret.yaml: Secret/agentmesh-agent-keys.data.private-key": (
        "a base64 REPLACE_ME placeholder instead of the guide's <base64-encoded-private-key>"
    ),
    "prometheusrule.yaml: PrometheusRule/agentmesh-alerts.spec.groups[agentmesh]"
    ".rules[AgentMeshHighPolicyViolations].expr": (
        "fleet-wide: summed over severities, once (every API pod exposes the same ledger count)"
    ),
    "prometheusrule.yaml: PrometheusRule/agentmesh-alerts.spec.groups[agentmesh]"
    ".rules[AgentMeshPodNotReady].expr": (
        "only server and projector pods: finished Job pods are never Ready"
    ),
}

# What an AgentMesh process may write: /tmp (and below it), the sidecar's health file.
WRITABLE = ("/tmp", "/var/run/agentmesh")


def under(path: str | Path, directory: str) -> bool:
    text = str(path)
    return text == directory or text.startswith(directory.rstrip("/") + "/")


# -- loading -------------------------------------------------------------------


def manifest_files() -> list[str]:
    return sorted(path.name for path in K8S.glob("*.yaml"))


@cache
def _load(name: str) -> tuple[Doc, ...]:
    docs = yaml.safe_load_all((K8S / name).read_text())
    return tuple(cast(Doc, doc) for doc in docs if doc is not None)


def load(name: str) -> list[Doc]:
    return list(_load(name))


def resources() -> Iterator[tuple[str, Doc]]:
    for name in manifest_files():
        if name != "kustomization.yaml":
            for doc in load(name):
                yield name, doc


def find(name: str, kind: str, resource_name: str | None = None) -> Doc:
    matches = [
        doc
        for doc in load(name)
        if doc["kind"] == kind
        and (resource_name is None or doc["metadata"]["name"] == resource_name)
    ]
    assert len(matches) == 1, f"{name}: expected one {kind} {resource_name or ''}"
    return matches[0]


@cache
def guide_blocks() -> dict[str, tuple[Doc, ...]]:
    """The guide's YAML blocks that name their file (``# deployment.yaml``)."""
    assert GUIDE.is_file(), f"the deployment guide is missing: {GUIDE}"
    blocks: dict[str, tuple[Doc, ...]] = {}
    for body in re.findall(r"```yaml\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL):
        first = body.splitlines()[0]
        named = re.fullmatch(r"#\s*(\S+\.yaml)\s*", first)
        if named:
            docs = yaml.safe_load_all(body)
            blocks[named.group(1)] = tuple(cast(Doc, d) for d in docs if d is not None)
    return blocks


def guide_configmap_data() -> dict[str, str]:
    (configmap,) = guide_blocks()["configmap.yaml"]
    return cast(dict[str, str], configmap["data"])


# -- pod helpers -------------------------------------------------------------------


def pod_template(doc: Doc) -> Doc | None:
    kind = doc["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return cast(Doc, doc["spec"]["template"])
    if kind == "CronJob":
        return cast(Doc, doc["spec"]["jobTemplate"]["spec"]["template"])
    return None


def pod_spec(doc: Doc) -> Doc | None:
    template = pod_template(doc)
    return None if template is None else cast(Doc, template["spec"])


def pods() -> Iterator[tuple[str, Doc, Doc]]:
    for name, doc in resources():
        spec = pod_spec(doc)
        if spec is not None:
            yield name, doc, spec


def containers_of(spec: Doc) -> list[Doc]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def agentmesh_containers() -> Iterator[tuple[str, Doc, Doc]]:
    """(file, pod spec, container) for every container running an AgentMesh image."""
    for name, _, spec in pods():
        for container in containers_of(spec):
            if container["image"] in AGENTMESH_IMAGES:
                yield name, spec, container


def container(name: str, kind: str, container_name: str) -> Doc:
    spec = pod_spec(find(name, kind))
    assert spec is not None
    (found,) = [c for c in containers_of(spec) if c["name"] == container_name]
    return found


def ports(container_doc: Doc) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container_doc.get("ports", [])}


def probe_port(container_doc: Doc, probe: Doc) -> int:
    port = probe["httpGet"]["port"]
    return ports(container_doc)[port] if isinstance(port, str) else cast(int, port)


def literal_env(container_doc: Doc) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container_doc.get("env", []) if "value" in e}


def secret_refs(container_doc: Doc) -> dict[str, tuple[str, str]]:
    refs: dict[str, tuple[str, str]] = {}
    for entry in container_doc.get("env", []):
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            refs[entry["name"]] = (ref["name"], ref["key"])
    return refs


def environment(namespace: str, container_doc: Doc) -> dict[str, str]:
    """The container's literal environment: its ConfigMaps' data, then its own ``env``."""
    configmaps = {
        (d["metadata"]["namespace"], d["metadata"]["name"]): d["data"]
        for _, d in resources()
        if d["kind"] == "ConfigMap"
    }
    environ: dict[str, str] = {}
    for source in container_doc.get("envFrom", []):
        environ |= configmaps[(namespace, source["configMapRef"]["name"])]
    return environ | literal_env(container_doc)


def sidecar_settings(name: str) -> Settings:
    """What ``agentmesh serve sidecar`` parses in an agent example (secrets left out)."""
    sidecar = container(name, "Deployment", "agentmesh-sidecar")
    return Settings.from_env(environment("my-app", sidecar))


def mounts(container_doc: Doc) -> dict[str, Doc]:
    return {m["mountPath"]: m for m in container_doc.get("volumeMounts", [])}


# -- one source of truth: the chart --------------------------------------------------


def renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_k8s", REPO / "deploy" / "render_k8s.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deploy_k8s_is_what_the_chart_renders() -> None:
    render_k8s = renderer()
    files = render_k8s.render()
    assert render_k8s.stale(files) == [], "deploy/k8s differs from the chart: run `make k8s`"
    assert set(manifest_files()) == set(files) | EXAMPLES


def test_drift_is_detected() -> None:
    render_k8s = renderer()
    files = render_k8s.render()
    files["deployment.yaml"] = files["deployment.yaml"].replace("replicas: 3", "replicas: 4")
    files["extra.yaml"] = "kind: ConfigMap\n"
    del files["hpa.yaml"]
    assert render_k8s.stale(files) == [
        "deployment.yaml: differs from the chart",
        "extra.yaml: missing",
        "hpa.yaml: not rendered by the chart",
    ]


# -- schemas -------------------------------------------------------------------------


def schema_error(doc: Doc, version: str) -> str | None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path)
        return f"{doc['kind']} against {version}: {where}: {exc.message}"
    return None


@pytest.mark.parametrize("name", [n for n in manifest_files() if n != "kustomization.yaml"])
def test_every_resource_validates_against_the_kubernetes_schemas(name: str) -> None:
    oldest = NATIVE_SIDECAR_MIN if name == "agent-with-native-sidecar.yaml" else OLDEST
    versions = {oldest, CURRENT, kubernetes_validate.latest_version()}
    docs = load(name)
    assert docs, f"{name} holds no resource"
    errors: list[str | None] = []
    for doc in docs:
        if doc["apiVersion"] == CRD_GROUP:
            # Not in the Kubernetes schemas: checked below by explicit assertions.
            assert doc["kind"] in ("ServiceMonitor", "PrometheusRule")
            continue
        errors += [schema_error(doc, version) for version in sorted(versions)]
    assert [e for e in errors if e is not None] == []


def test_the_native_sidecar_is_rejected_where_kubernetes_has_none() -> None:
    # Shows the validation is strict: 1.25 has no initContainers[].restartPolicy.
    deployment = find("agent-with-native-sidecar.yaml", "Deployment")
    error = schema_error(deployment, OLDEST)
    assert error is not None
    assert "restartPolicy" in error


def test_kustomization_lists_every_standalone_resource() -> None:
    (kustomization,) = load("kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert set(listed) == set(manifest_files()) - NOT_IN_KUSTOMIZATION
    for name in listed:
        assert all(
            doc["metadata"].get("namespace") == "agentmesh" or doc["kind"] == "Namespace"
            for doc in load(name)
        ), name


# -- the guide's contract ------------------------------------------------------------


def _identity(item: Any, index: int) -> str:
    if isinstance(item, dict):
        for key in ("name", "alert"):
            if key in item and isinstance(item[key], str):
                return str(item[key])
    return str(index)


def differences(guide: Any, ours: Any, path: str) -> list[str]:
    """Paths where ``ours`` does not contain ``guide`` (dicts and named lists may grow)."""
    if isinstance(guide, dict):
        if not isinstance(ours, dict):
            return [path]
        found: list[str] = []
        for key, value in guide.items():
            sub = f"{path}.{key}"
            found += differences(value, ours[key], sub) if key in ours else [sub]
        return found
    if isinstance(guide, list) and guide and all(isinstance(i, dict) for i in guide):
        if not isinstance(ours, list):
            return [path]
        mine = {_identity(item, i): item for i, item in enumerate(ours)}
        found = []
        for i, item in enumerate(guide):
            ident = _identity(item, i)
            sub = f"{path}[{ident}]"
            found += differences(item, mine[ident], sub) if ident in mine else [sub]
        return found
    return [] if guide == ours else [path]


def test_manifests_contain_the_guides_yaml() -> None:
    found: list[str] = []
    for name, blocks in guide_blocks().items():
        for block in blocks:
            ours = find(name, block["kind"], block["metadata"]["name"])
            prefix = f"{name}: {block['kind']}/{block['metadata']['name']}"
            found += differences(block, ours, prefix)
    assert sorted(found) == sorted(DEVIATIONS)


def test_the_guide_names_the_files_we_ship() -> None:
    assert set(guide_blocks()) <= set(manifest_files())
    assert {"deployment.yaml", "configmap.yaml", "prometheusrule.yaml"} <= set(guide_blocks())


def test_configmap_has_every_guide_key_with_the_guides_value() -> None:
    data = find("configmap.yaml", "ConfigMap", "agentmesh-config")["data"]
    for key, value in guide_configmap_data().items():
        assert data.get(key) == value, key


def test_every_configmap_key_is_a_setting_the_code_reads() -> None:
    known = setting_keys()
    configmaps = [(n, d) for n, d in resources() if d["kind"] == "ConfigMap"]
    for name, configmap in configmaps:
        for key, value in configmap["data"].items():
            assert isinstance(value, str), f"{name}: {key} must be a string"
            if key.startswith("AGENTMESH_"):
                assert key in known, f"{name}: {key} is read by no code"
    # The server's settings and one per agent example; each example also has its policy.
    found = sorted((n, d["metadata"]["name"]) for n, d in configmaps)
    assert found == sorted(
        [("configmap.yaml", SETTINGS_CONFIGMAP)]
        + [(n, SETTINGS_CONFIGMAP) for n in EXAMPLES]
        + [(n, POLICY_CONFIGMAP) for n in EXAMPLES]
    )
    for name, configmap in configmaps:
        if configmap["metadata"]["name"] == SETTINGS_CONFIGMAP:
            keys = set(configmap["data"])
            assert keys <= set(known), f"{name}: {keys - set(known)} is read by no code"
            Settings.from_env(configmap["data"])
        else:
            assert set(configmap["data"]) == {"policy.yaml"}, name


def test_the_sidecar_settings_are_in_the_agent_examples_only() -> None:
    assert set(setting_keys()) >= SIDECAR_ONLY
    assert not SIDECAR_ONLY & set(find("configmap.yaml", "ConfigMap")["data"])
    for name in EXAMPLES:
        data = find(name, "ConfigMap", SETTINGS_CONFIGMAP)["data"]
        assert data.keys() >= SIDECAR_ONLY, name


def test_each_process_parses_its_whole_environment() -> None:
    for name, doc, spec in pods():
        namespace = doc["metadata"]["namespace"]
        for item in containers_of(spec):
            if item["image"] not in AGENTMESH_IMAGES:
                continue
            environ = environment(namespace, item)
            names = set(environ) | set(secret_refs(item))
            unknown = {k for k in names if k.startswith("AGENTMESH_")} - set(setting_keys())
            assert not unknown, f"{name}: {unknown}"
            Settings.from_env(environ)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_the_sidecar_has_what_serve_sidecar_requires(name: str) -> None:
    settings = sidecar_settings(name)
    # The API's Service, in the namespace the server runs in, on the API's port.
    service = find("service.yaml", "Service")
    api_port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["api"]
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert settings.require_api_url() == f"http://{host}:{api_port}"
    upstreams = parse_upstreams(settings.upstreams)
    assert upstreams, f"{name}: no MCP upstream"
    assert settings.policy_mode == "strict"
    assert settings.governance_shadow_mode is False
    assert settings.policy_file is not None
    sidecar = container(name, "Deployment", "agentmesh-sidecar")
    assert set(secret_refs(sidecar)) == {"AGENTMESH_AGENT_PRIVATE_KEY", "AGENTMESH_REDIS_PASSWORD"}


def test_the_sidecar_trusts_with_the_servers_parameters() -> None:
    server = find("configmap.yaml", "ConfigMap")["data"]
    for name in EXAMPLES:
        sidecar = find(name, "ConfigMap", SETTINGS_CONFIGMAP)
        assert sidecar["metadata"]["namespace"] == "my-app"
        differing = {
            k
            for k in server.keys() | sidecar["data"].keys()
            if server.get(k) != sidecar["data"].get(k)
        }
        # The Redis host, which is qualified with the server's namespace, and
        # what only the sidecar reads.
        assert differing == {"AGENTMESH_REDIS_HOST"} | SIDECAR_ONLY, name
        assert sidecar["data"]["AGENTMESH_REDIS_HOST"].startswith(
            server["AGENTMESH_REDIS_HOST"] + ".agentmesh."
        )


# -- secrets -------------------------------------------------------------------------


def test_no_secret_in_any_configmap_or_plain_env() -> None:
    for name, doc in resources():
        if doc["kind"] == "ConfigMap":
            leaked = [k for k in doc["data"] if SECRET_LIKE.search(k)]
            assert not leaked, f"{name}: secret-like keys in a ConfigMap: {leaked}"
    for name, _, spec in pods():
        for item in containers_of(spec):
            leaked = [k for k in literal_env(item) if SECRET_LIKE.search(k)]
            assert not leaked, f"{name}: secret-like env given as a literal: {leaked}"


def test_the_secret_template_holds_only_placeholders() -> None:
    secrets = {doc["metadata"]["name"]: doc for doc in load("secret.yaml")}
    assert set(secrets) == {"agentmesh-agent-keys", "agentmesh-secrets"}
    assert set(secrets["agentmesh-agent-keys"]["data"]) == {"private-key"}
    assert set(secrets["agentmesh-secrets"]["data"]) == {
        "database-url",
        "admin-token",
        "redis-password",
    }
    for secret in secrets.values():
        assert secret["type"] == "Opaque"
        assert set(secret["data"].values()) == {PLACEHOLDER}


def test_every_secret_reference_in_the_server_namespace_exists() -> None:
    available = {
        (doc["metadata"]["name"], key) for doc in load("secret.yaml") for key in doc["data"]
    }
    used: set[tuple[str, str]] = set()
    for name, doc, spec in pods():
        if doc["metadata"]["namespace"] == "agentmesh":
            for item in containers_of(spec):
                refs = set(secret_refs(item).values())
                assert refs <= available, name
                used |= refs
    assert used == available


def test_the_api_gets_its_secrets_from_secret_key_refs() -> None:
    api = container("deployment.yaml", "Deployment", "agentmesh")
    assert secret_refs(api) == {
        "AGENTMESH_AGENT_PRIVATE_KEY": ("agentmesh-agent-keys", "private-key"),
        "AGENTMESH_DATABASE_URL": ("agentmesh-secrets", "database-url"),
        "AGENTMESH_ADMIN_TOKEN": ("agentmesh-secrets", "admin-token"),
        "AGENTMESH_REDIS_PASSWORD": ("agentmesh-secrets", "redis-password"),
    }
    assert api["envFrom"] == [{"configMapRef": {"name": "agentmesh-config"}}]


# -- security ------------------------------------------------------------------------


def test_every_pod_and_container_is_locked_down() -> None:
    checked = 0
    for name, _, spec in pods():
        pod = spec["securityContext"]
        assert pod["runAsUser"] == 1000, name
        assert pod["fsGroup"] == 1000, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for item in containers_of(spec):
            where = f"{name}: {item['name']}"
            own = item["securityContext"]
            assert own.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
            assert own["readOnlyRootFilesystem"] is True, where
            assert own["allowPrivilegeEscalation"] is False, where
            assert own["capabilities"]["drop"] == ["ALL"], where
            assert "privileged" not in own, where
            assert "/tmp" in mounts(item), f"{where} does not mount /tmp"
            for path, mount in mounts(item).items():
                volume = volumes[mount["name"]]
                if mount.get("readOnly") is True:
                    # Configuration only: nothing writable hides behind it.
                    assert set(volume) == {"name", "configMap"}, f"{where}: {path}"
                    assert not any(under(path, w) for w in WRITABLE), f"{where}: {path}"
                else:
                    assert any(under(path, w) for w in WRITABLE), f"{where} writes {path}"
                    assert set(volume) == {"name", "emptyDir"}, f"{where}: {path}"
            checked += 1
    assert checked >= 8


def test_every_agentmesh_process_runs_the_cli_with_read_only_friendly_python() -> None:
    expected = {
        ("deployment.yaml", "agentmesh"): ["serve", "api"],
        ("projector-deployment.yaml", "projector"): ["serve", "projector"],
        ("migration-job.yaml", "migrate"): ["db", "upgrade"],
        ("retention-cronjob.yaml", "retention"): ["retention", "run"],
        ("agent-with-sidecar.yaml", "agentmesh-sidecar"): ["serve", "sidecar"],
        ("agent-with-native-sidecar.yaml", "agentmesh-sidecar"): ["serve", "sidecar"],
    }
    seen = {}
    for name, _, item in agentmesh_containers():
        assert item["command"] == ["agentmesh"], name
        assert literal_env(item)["PYTHONDONTWRITEBYTECODE"] == "1", name
        seen[(name, item["name"])] = item["args"]
    assert seen == expected


def test_every_command_in_the_manifests_is_a_real_cli_command() -> None:
    parser = _parser()
    checked = 0
    for name, _, spec in pods():
        for item in containers_of(spec):
            if "command" not in item and "args" not in item:
                continue  # the image's own entrypoint (the example agent)
            where = f"{name}: {item['name']}"
            assert item["image"] in AGENTMESH_IMAGES, where
            assert item["command"] == ["agentmesh"], where
            try:
                parser.parse_args(item["args"])
            except SystemExit:
                pytest.fail(f"{where}: agentmesh {' '.join(item['args'])} is no CLI command")
            checked += 1
    assert checked == 6
    with pytest.raises(SystemExit):  # the check bites
        parser.parse_args(["serve", "nothing"])


def test_the_api_keeps_its_multiprocess_metrics_under_tmp() -> None:
    api = container("deployment.yaml", "Deployment", "agentmesh")
    directory = literal_env(api)["PROMETHEUS_MULTIPROC_DIR"]
    assert directory == "/tmp/prometheus"
    assert directory in {m["mountPath"] for m in api["volumeMounts"]}


# -- ports and probes ----------------------------------------------------------------


def test_ports_match_the_guide() -> None:
    api = container("deployment.yaml", "Deployment", "agentmesh")
    assert ports(api) == {"api": 8080, "metrics": 9090}
    service = find("service.yaml", "Service")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "api": 8080,
        "metrics": 9090,
    }
    for name in EXAMPLES:
        sidecar = container(name, "Deployment", "agentmesh-sidecar")
        assert ports(sidecar) == {"proxy": 8081, "metrics": 9091}, name
        agent = container(name, "Deployment", "agent")
        assert literal_env(agent)["AGENTMESH_PROXY_URL"] == "http://localhost:8081"
    projector = container("projector-deployment.yaml", "Deployment", "projector")
    assert ports(projector) == {"metrics": 9092}
    assert literal_env(projector)["AGENTMESH_PROJECTOR_METRICS_PORT"] == "9092"


def test_the_processes_listen_on_the_ports_the_manifests_declare() -> None:
    def effective(item: Doc, key: str) -> object:
        value = literal_env(item).get(key)
        return default_of(key) if value is None else int(value)

    api = container("deployment.yaml", "Deployment", "agentmesh")
    assert effective(api, "AGENTMESH_API_PORT") == ports(api)["api"]
    assert effective(api, "AGENTMESH_METRICS_PORT") == ports(api)["metrics"]
    projector = container("projector-deployment.yaml", "Deployment", "projector")
    assert effective(projector, "AGENTMESH_PROJECTOR_METRICS_PORT") == ports(projector)["metrics"]


def test_scrape_annotations_point_at_the_metrics_port() -> None:
    for name, doc, spec in pods():
        template = pod_template(doc)
        assert template is not None
        annotations = template["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            metrics = {ports(c).get("metrics") for c in containers_of(spec)} - {None}
            assert metrics == {int(annotations["prometheus.io/port"])}, name
            assert annotations["prometheus.io/path"] == "/metrics", name


def test_api_probes_liveness_health_and_readiness_ready() -> None:
    api = container("deployment.yaml", "Deployment", "agentmesh")
    assert api["livenessProbe"]["httpGet"]["path"] == "/health"
    assert probe_port(api, api["livenessProbe"]) == 8080
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert probe_port(api, api["readinessProbe"]) == 8080


def test_the_projector_has_no_probe_that_could_ping_the_database() -> None:
    projector = container("projector-deployment.yaml", "Deployment", "projector")
    assert not {"livenessProbe", "readinessProbe", "startupProbe"} & projector.keys()
    assert find("projector-deployment.yaml", "Deployment")["spec"]["replicas"] == 2


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_sidecar_probes(name: str) -> None:
    sidecar = container(name, "Deployment", "agentmesh-sidecar")
    assert sidecar["livenessProbe"]["exec"]["command"] == ["cat", "/var/run/agentmesh/healthy"]
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/health"
    assert probe_port(sidecar, sidecar["readinessProbe"]) == 8081
    assert "/var/run/agentmesh" in mounts(sidecar)
    # The file the liveness probe reads is the one the process keeps.
    settings = sidecar_settings(name)
    assert str(settings.sidecar_health_file) == sidecar["livenessProbe"]["exec"]["command"][1]
    assert settings.sidecar_port == probe_port(sidecar, sidecar["readinessProbe"])
    assert settings.sidecar_metrics_port == ports(sidecar)["metrics"]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_the_sidecar_writes_only_to_its_emptydirs(name: str) -> None:
    sidecar = container(name, "Deployment", "agentmesh-sidecar")
    settings = sidecar_settings(name)
    writable = [p for p, m in mounts(sidecar).items() if not m.get("readOnly")]
    for path in (settings.sidecar_outbox_dir, settings.sidecar_health_file.parent):
        assert any(under(path, w) for w in writable), f"{name}: {path} is not writable"
    assert under(settings.sidecar_outbox_dir, "/tmp")


# -- the sidecar's policy ------------------------------------------------------------


def example_policy_text(name: str) -> str:
    return cast(str, find(name, "ConfigMap", POLICY_CONFIGMAP)["data"]["policy.yaml"])


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_the_policy_configmap_parses_and_is_mounted_where_the_sidecar_reads_it(
    name: str,
) -> None:
    configmap = find(name, "ConfigMap", POLICY_CONFIGMAP)
    assert configmap["metadata"]["namespace"] == "my-app"
    policy = parse_policy(example_policy_text(name), "policy.yaml", "strict", False)
    assert policy.rules
    settings = sidecar_settings(name)
    assert settings.policy_file is not None
    assert settings.policy_file.name == "policy.yaml"
    sidecar = container(name, "Deployment", "agentmesh-sidecar")
    mount = mounts(sidecar)[str(settings.policy_file.parent)]
    assert mount["readOnly"] is True
    # A subPath mount is never updated: the directory must be mounted for reloads.
    assert "subPath" not in mount
    assert "subPathExpr" not in mount
    spec = pod_spec(find(name, "Deployment"))
    assert spec is not None
    volume = {v["name"]: v for v in spec["volumes"]}[mount["name"]]
    # All keys, under their own names (no items list renaming policy.yaml).
    assert volume["configMap"] == {"name": POLICY_CONFIGMAP}


def test_the_example_policy_decides_as_documented() -> None:
    text = example_policy_text("agent-with-sidecar.yaml")
    policy = parse_policy(text, "policy.yaml", "strict", False)

    def outcome(kind: str, target: str, tier: str | None, score: int = 0) -> tuple[bool, str, str]:
        agent = "did:mesh:example"
        trust = None if tier is None else TrustInfo(agent, score, tier, "active", frozenset(), 0.0)
        action = Action("tool" if kind == "tool" else "host", target)
        decision = decide(policy, action, trust, agent, RateLimiter(), 0.0)
        return decision.allowed, decision.reason, decision.severity

    assert outcome("tool", "search", "probationary", 400)[:2] == (True, "allowed")
    assert outcome("tool", "read_file", "standard", 600)[:2] == (True, "allowed")
    assert outcome("tool", "delete_repo", "standard", 600)[:2] == (False, "below_min_tier")
    assert outcome("tool", "delete_repo", "trusted", 800)[:2] == (True, "allowed")
    assert outcome("tool", "launch_job", "verified_partner", 950)[:2] == (False, "no_rule")
    paste = (False, "rule_denied", "high")
    assert outcome("host", "pastebin.com:443", "verified_partner", 950) == paste
    assert outcome("host", "gist.PASTEBIN.com", "trusted", 800) == paste
    # Strict: without trust data (e.g. an unregistered agent), nothing passes.
    assert outcome("tool", "search", None)[:2] == (False, "trust_unavailable")


def test_the_native_sidecar_starts_before_the_agent() -> None:
    spec = pod_spec(find("agent-with-native-sidecar.yaml", "Deployment"))
    assert spec is not None
    (sidecar,) = spec["initContainers"]
    assert sidecar["name"] == "agentmesh-sidecar"
    assert sidecar["restartPolicy"] == "Always"
    # Readiness: 200 only once the policy is loaded and trust data is fresh.
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/health"
    assert probe_port(sidecar, sidecar["startupProbe"]) == 8081
    assert [c["name"] for c in spec["containers"]] == ["agent"]
    # Apart from what makes it native, it is the regular sidecar, unchanged.
    regular = container("agent-with-sidecar.yaml", "Deployment", "agentmesh-sidecar")
    native = {k: v for k, v in sidecar.items() if k not in ("restartPolicy", "startupProbe")}
    assert native == regular
    # The rest of the example is the same too: both ConfigMaps and the pod's volumes.
    for configmap in (SETTINGS_CONFIGMAP, POLICY_CONFIGMAP):
        native_map = find("agent-with-native-sidecar.yaml", "ConfigMap", configmap)
        assert native_map == find("agent-with-sidecar.yaml", "ConfigMap", configmap)
    regular_spec = pod_spec(find("agent-with-sidecar.yaml", "Deployment"))
    assert regular_spec is not None
    assert spec["volumes"] == regular_spec["volumes"]


# -- jobs ----------------------------------------------------------------------------


def test_retention_runs_daily_and_never_twice_at_once() -> None:
    cronjob = find("retention-cronjob.yaml", "CronJob")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    minute, hour, day, month, weekday = cronjob["spec"]["schedule"].split()
    assert minute.isdigit()
    assert hour.isdigit()
    assert (day, month, weekday) == ("*", "*", "*")
    retention = container("retention-cronjob.yaml", "CronJob", "retention")
    assert "AGENTMESH_AGENT_PRIVATE_KEY" in secret_refs(retention)  # it signs the cut


def test_migrations_get_the_database_url_and_nothing_more_secret() -> None:
    migrate = container("migration-job.yaml", "Job", "migrate")
    assert secret_refs(migrate) == {"AGENTMESH_DATABASE_URL": ("agentmesh-secrets", "database-url")}


# -- Prometheus Operator resources (CRDs: structure checked explicitly) ---------------


def _selected(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_servicemonitor_scrapes_the_metrics_port_of_every_agentmesh_service() -> None:
    monitor = find("servicemonitor.yaml", "ServiceMonitor")
    assert monitor["apiVersion"] == CRD_GROUP
    assert monitor["metadata"]["namespace"] == "agentmesh"
    spec = monitor["spec"]
    assert spec["namespaceSelector"]["matchNames"] == ["agentmesh"]
    assert spec["endpoints"]
    for endpoint in spec["endpoints"]:
        assert endpoint["port"] == "metrics"
        assert endpoint["path"] == "/metrics"
    selector = spec["selector"]["matchLabels"]
    services = [d for _, d in resources() if d["kind"] == "Service"]
    selected = [s for s in services if _selected(selector, s["metadata"]["labels"])]
    assert {s["metadata"]["name"] for s in selected} == {"agentmesh", "agentmesh-projector"}
    for service in selected:
        assert "metrics" in {p["name"] for p in service["spec"]["ports"]}


def test_services_select_the_pods_that_serve_their_ports() -> None:
    deployments = [d for _, d in resources() if d["kind"] == "Deployment"]
    for _, service in ((n, d) for n, d in resources() if d["kind"] == "Service"):
        targets = [
            d
            for d in deployments
            if _selected(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(targets) == 1, service["metadata"]["name"]
        spec = pod_spec(targets[0])
        assert spec is not None
        named = {p for c in containers_of(spec) for p in ports(c)}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= named


PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "by", "without",
    "on", "ignoring", "unless", "and", "or", "bool", "group_left", "group_right",
}  # fmt: skip
ALLOWED_METRICS = {
    "agentmesh_policy_violation_count",
    "agentmesh_trust_score_gauge",
    "kube_pod_status_ready",
}


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression: identifiers outside {...}, [...], by (...), strings."""
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare))
    return words - PROMQL_WORDS


def alerts() -> dict[str, Doc]:
    rule = find("prometheusrule.yaml", "PrometheusRule")
    assert rule["apiVersion"] == CRD_GROUP
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def test_prometheusrule_has_the_guides_alerts_on_series_the_product_exposes() -> None:
    rules = alerts()
    assert set(rules) == {
        "AgentMeshHighPolicyViolations",
        "AgentMeshLowTrustScore",
        "AgentMeshPodNotReady",
    }
    used = {alert: metric_names(rule["expr"]) for alert, rule in rules.items()}
    assert used == {
        "AgentMeshHighPolicyViolations": {"agentmesh_policy_violation_count"},
        "AgentMeshLowTrustScore": {"agentmesh_trust_score_gauge"},
        "AgentMeshPodNotReady": {"kube_pod_status_ready"},
    }
    assert set().union(*used.values()) <= ALLOWED_METRICS
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        assert re.fullmatch(r"\d+m", rule["for"])


def test_metric_names_sees_through_promql() -> None:
    assert metric_names('sum(rate(a_b[5m])) by (x) > 10 unless on (y) c{d="e_f"}') == {"a_b", "c"}


def test_pod_not_ready_pages_for_long_running_pods_only() -> None:
    expr = alerts()["AgentMeshPodNotReady"]["expr"]
    matcher = re.search(r'pod=~"([^"]+)"', expr)
    assert matcher is not None
    # PromQL regex matchers are anchored at both ends.
    pattern = re.compile(matcher.group(1))
    long_running = [d for _, d in resources() if d["kind"] == "Deployment"]
    for deployment in long_running:
        if deployment["metadata"]["namespace"] == "agentmesh":
            pod = deployment["metadata"]["name"] + "-5d4f8b7c9-abc12"
            assert pattern.fullmatch(pod), pod
    for kind in ("Job", "CronJob"):
        for _, doc in resources():
            if doc["kind"] == kind:
                assert not pattern.fullmatch(doc["metadata"]["name"] + "-29132130-x7k2p")
