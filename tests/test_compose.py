"""compose.yaml (the Docker Compose quick start) and the images it builds.

compose.yaml is validated against the Compose Specification's JSON schema, as
vendored by the ``check-jsonschema`` package (SchemaStore's copy of
compose-spec.json); its settings are held to the Helm chart's ConfigMap. The
Dockerfiles' pins are checked against pyproject.toml, and the slim sidecar
image's package list against what the sidecar actually imports.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import helm_python
import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from agentmesh.cli import _parser
from agentmesh.settings import Settings
from agentmesh.sidecar_main import parse_upstreams
from sidecar.policy import parse_policy

Doc = dict[str, Any]
REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose.yaml"
DOCKER = REPO / "deploy" / "docker"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
AGENTMESH = {"migrate", "api", "projector", "register-demo-agent", "demo-mcp", "sidecar", "keys"}
# Where the quick start differs from the chart's defaults on purpose.
COMPOSE_ONLY = {
    "AGENTMESH_REDIS_HOST": "redis",  # the compose service (the chart: agentmesh-redis-master)
    "AGENTMESH_OTEL_ENABLED": "false",  # no collector in the quick start
}


@cache
def compose_schema() -> Doc:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return cast(Doc, json.loads((vendor / "compose-spec.json").read_text()))


def compose() -> Doc:
    return cast(Doc, yaml.safe_load(COMPOSE.read_text()))


def schema_errors(doc: Doc) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)
    checker = validator(schema, format_checker=validator.FORMAT_CHECKER)
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in checker.iter_errors(doc)]


def interpolate(value: str) -> str:
    """Compose's ${NAME:-default} with nothing set: the default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def environment(service: str) -> dict[str, str]:
    env = compose()["services"][service].get("environment", {})
    return {k: interpolate(str(v)) for k, v in env.items()}


@cache
def chart_configmap() -> dict[str, str]:
    with helm_python.Chart.load(REPO / "charts" / "agentmesh") as chart:
        rendered = chart.render({}, name="agentmesh", namespace="agentmesh")
    (configmap,) = yaml.safe_load_all(rendered["agentmesh/templates/configmap.yaml"])
    return cast(dict[str, str], configmap["data"])


# -- the Compose Specification ---------------------------------------------------


def test_compose_yaml_follows_the_compose_specification() -> None:
    assert compose_schema()["$id"] == "compose_spec.json"
    assert schema_errors(compose()) == []


@pytest.mark.parametrize(
    ("service", "key", "value"),
    [("api", "restart", 5), ("api", "ports", "8080:8080"), ("sidecar", "tmpfiles", ["/tmp"])],
)
def test_the_schema_check_bites(service: str, key: str, value: object) -> None:
    broken = compose()
    broken["services"][service][key] = value
    assert schema_errors(broken)


def test_every_variable_has_a_default() -> None:
    text = COMPOSE.read_text()
    variables = re.findall(r"(?<!\$)\$\{([^}]*)\}", text)
    assert variables
    assert [v for v in variables if ":-" not in v] == []


def test_the_services_of_the_quick_start() -> None:
    services = compose()["services"]
    assert set(services) == AGENTMESH | {"postgres", "redis"}
    api = services["api"]["depends_on"]
    assert api["migrate"] == {"condition": "service_completed_successfully"}
    assert services["migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert services["sidecar"]["depends_on"]["register-demo-agent"]["condition"] == (
        "service_completed_successfully"
    )
    for name in AGENTMESH - {"keys"}:
        service = services[name]
        assert service["image"] in {f"agentmesh/server:{VERSION}", f"agentmesh/sidecar:{VERSION}"}
        assert (REPO / service["build"]["dockerfile"]).is_file()
        assert service["user"] == "1000:1000", name
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "/tmp" in service["tmpfs"], name


def test_commands_are_real_cli_commands() -> None:
    parser = _parser()
    services = compose()["services"]
    for name in ("migrate", "api", "projector", "sidecar"):
        parser.parse_args(services[name]["command"])
    assert services["sidecar"]["command"] == ["serve", "sidecar"]


# -- the same settings as the chart ------------------------------------------------


def test_the_settings_are_the_charts() -> None:
    config = {k: str(v) for k, v in compose()["x-agentmesh-config"].items()}
    chart = chart_configmap()
    assert set(config) - {"PYTHONDONTWRITEBYTECODE"} == set(chart)
    for key, value in chart.items():
        assert config[key] == COMPOSE_ONLY.get(key, value), key


def chart_env_names(template: str, container: str) -> set[str]:
    with helm_python.Chart.load(REPO / "charts" / "agentmesh") as chart:
        rendered = chart.render({}, name="agentmesh", namespace="agentmesh")
    for doc in yaml.safe_load_all(rendered[f"agentmesh/templates/{template}"]):
        for item in doc["spec"]["template"]["spec"]["containers"]:
            if item["name"] == container:
                return {e["name"] for e in item["env"]}
    raise AssertionError(f"{template}: no container {container}")


@pytest.mark.parametrize(
    ("service", "template", "container"),
    [
        ("api", "deployment.yaml", "agentmesh"),
        ("projector", "projector-deployment.yaml", "projector"),
        ("migrate", "migration-job.yaml", "migrate"),
    ],
)
def test_each_process_gets_what_the_chart_gives_it(
    service: str, template: str, container: str
) -> None:
    env = environment(service)
    # A key file instead of the key itself: the same setting, read from the volume.
    names = {n.removesuffix("_FILE") for n in env} - set(compose()["x-agentmesh-config"])
    expected = chart_env_names(template, container) - {"PYTHONDONTWRITEBYTECODE"}
    assert names == expected
    settings = Settings.from_env(env)
    settings.require_database_url()


def test_the_sidecar_is_configured_for_the_demo() -> None:
    env = environment("sidecar")
    settings = Settings.from_env(env)
    assert settings.require_api_url() == "http://api:8080"
    assert settings.upstreams is not None
    assert list(parse_upstreams(settings.upstreams)) == ["demo"]
    policy_file = REPO / "deploy" / "compose" / "policy.yaml"
    assert (
        f"./{policy_file.relative_to(REPO)}:{settings.policy_file}:ro"
        in (compose()["services"]["sidecar"]["volumes"])
    )
    policy = parse_policy(policy_file.read_text(), "policy.yaml", "strict", False)
    assert policy.rules
    # The same rules as the Kubernetes examples' policy ConfigMap.
    docs = yaml.safe_load_all((REPO / "deploy" / "k8s" / "agent-with-sidecar.yaml").read_text())
    (configmap,) = [d for d in docs if d and d["metadata"]["name"] == "agentmesh-sidecar-policy"]
    assert yaml.safe_load(policy_file.read_text()) == yaml.safe_load(
        configmap["data"]["policy.yaml"]
    )


# -- the images --------------------------------------------------------------------


def lock() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lock", DOCKER / "lock.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("image", ["server", "sidecar"])
def test_dockerfiles_tag_the_package_version(image: str) -> None:
    text = (DOCKER / f"Dockerfile.{image}").read_text()
    assert f"ARG VERSION={VERSION}\n" in text
    assert f"-t agentmesh/{image}:{VERSION} ." in text
    assert re.search(r"^FROM python:3\.11-slim-\w+$", text, flags=re.MULTILINE)
    assert "USER 1000:1000" in text


def test_the_server_image_installs_every_dependency_pinned() -> None:
    text = (DOCKER / "Dockerfile.server").read_text()
    assert "pip install --constraint constraints.txt ." in text
    pins = lock().read_pins(DOCKER / "constraints.txt")
    for declared in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(declared)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned in constraints.txt (run make lock)"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]}"


def test_the_sidecar_image_carries_only_what_the_sidecar_imports() -> None:
    module = lock()
    text = (DOCKER / "Dockerfile.sidecar").read_text()
    assert "pip install --no-deps --requirement sidecar.txt" in text
    assert "pip install --no-deps ." in text
    pins = module.read_pins(DOCKER / "constraints.txt")
    sidecar = module.read_pins(DOCKER / "sidecar.txt")
    assert sidecar == module.sidecar_pins(pins), "sidecar.txt is stale: run make lock"
    assert {"matplotlib", "numpy", "pillow"} <= set(pins) - set(sidecar)


BLOCKER = """
import importlib.abc, sys
from importlib import metadata
allowed = set(sys.argv[1].split(","))
owners = metadata.packages_distributions()
first_party = {"agentmesh", "ledger", "projections", "api", "sidecar", "migrations"}

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in first_party or top in sys.stdlib_module_names:
            return None
        dists = {d.lower().replace("_", "-").replace(".", "-") for d in owners.get(top, [])}
        if dists and not dists & allowed:
            raise ImportError(f"{top} ({', '.join(sorted(dists))}) is not in the sidecar image")
        return None

sys.meta_path.insert(0, Blocker())
"""


def test_the_sidecar_starts_with_only_its_packages() -> None:
    module = lock()
    allowed = set(module.read_pins(DOCKER / "sidecar.txt"))
    result = subprocess.run(
        [sys.executable, "-c", BLOCKER + module.SIDECAR_IMPORTS, ",".join(sorted(allowed))],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # The check bites: without redis the sidecar cannot import.
    result = subprocess.run(
        [sys.executable, "-c", BLOCKER + module.SIDECAR_IMPORTS, ",".join(allowed - {"redis"})],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "redis" in result.stderr
