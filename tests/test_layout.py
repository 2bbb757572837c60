"""The shape of the code that the lint rule cannot see: what importing a pure
module drags in (the sidecar's trust client and the settings every command reads
must not load the PostgreSQL driver), and each package's face: its ``__all__``
and its one exception tree."""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE = [
    "sidecar.trust",
    "agentmesh.settings",
    "ledger.authority",
    "ledger.ports",
    "ledger.memory",
    "ledger.merkle",
    "ledger.note",
    "projections.state",
    "projections.replay",
    "projections.history",
]


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_do_not_load_the_driver(module: str) -> None:
    probe = f"import {module}, sys; print('asyncpg' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False", f"importing {module} loads asyncpg"


FACES = ["ledger", "projections", "api", "sidecar", "agentmesh"]
# The one root of each package's tree (the api defines only ProblemError).
ROOTS = {
    "ledger": "ledger.errors.LedgerError",
    "projections": "projections.errors.ProjectionError",
    "api": "api.errors.ProblemError",
    "sidecar": "sidecar.errors.SidecarError",
    "agentmesh": "agentmesh.errors.AgentMeshError",
}


def _exceptions(package: str) -> list[type[BaseException]]:
    """The public exception classes the package's modules define (``__main__`` runs
    the CLI when imported, and defines none)."""
    import importlib
    import pkgutil

    root = importlib.import_module(package)
    found = []
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        if info.name.endswith(".__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
                and not name.startswith("_")
            ):
                found.append(value)
    return found


@pytest.mark.parametrize("package", FACES)
def test_package_face_exports_resolve_and_its_tree_names_every_exception(package: str) -> None:
    """``__all__`` names only what the package gives, and the exception tree in the
    package docstring names every public exception class its modules define."""
    import importlib

    root = importlib.import_module(package)
    for name in root.__all__:
        assert getattr(root, name) is not None, f"{package}.{name}"
    doc = root.__doc__ or ""
    missing = [
        f"{e.__module__}.{e.__name__}" for e in _exceptions(package) if e.__name__ not in doc
    ]
    assert not missing, f"{package}'s docstring tree does not name {missing}"


@pytest.mark.parametrize("package", FACES)
def test_every_exception_of_a_package_is_under_its_one_root(package: str) -> None:
    import importlib

    module, _, name = ROOTS[package].rpartition(".")
    root = getattr(importlib.import_module(module), name)
    assert root.__name__ in (importlib.import_module(package).__doc__ or "")
    strays = [
        f"{e.__module__}.{e.__name__}" for e in _exceptions(package) if not issubclass(e, root)
    ]
    assert not strays, f"{package} has exceptions outside {root.__name__}: {strays}"
