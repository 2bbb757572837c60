"""The shape of the code that the lint rule cannot see: what importing a pure
module drags in. The sidecar's trust client must not load the PostgreSQL driver."""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE = [
    "sidecar.trust",
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


FACES = ["ledger", "projections", "api", "sidecar"]


@pytest.mark.parametrize("package", FACES)
def test_package_face_exports_resolve_and_its_tree_names_every_exception(package: str) -> None:
    """``__all__`` names only what the package gives, and the exception tree in the
    package docstring names every public exception class its modules define."""
    import importlib
    import pkgutil

    root = importlib.import_module(package)
    for name in root.__all__:
        assert getattr(root, name) is not None, f"{package}.{name}"
    doc = root.__doc__ or ""
    missing = []
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
                and not name.startswith("_")
                and name not in doc
            ):
                missing.append(f"{module.__name__}.{name}")
    assert not missing, f"{package}'s docstring tree does not name {missing}"
