"""Where the published test vectors live: outside the repository, never copied in.

The RFC 9162 Merkle vectors and the signed-note vectors of Go's sumdb/note
package (with their sources) sit in ``shared/testdata/`` beside the checkout,
as CI lays them out; ``AGENTMESH_TEST_VECTORS`` points elsewhere. Where
neither exists (a bare clone), the modules that need them are skipped with
that reason; everything else they test is also covered by property tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

_DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"


def published_vectors() -> dict[str, Any]:
    """The parsed ``rfc6962_vectors.json``, or a module-level skip naming where to put it."""
    folder = Path(os.environ.get("AGENTMESH_TEST_VECTORS", _DEFAULT))
    path = folder / "rfc6962_vectors.json"
    if not path.is_file():
        pytest.skip(
            f"published test vectors not found at {path} (set AGENTMESH_TEST_VECTORS)",
            allow_module_level=True,
        )
    vectors: dict[str, Any] = json.loads(path.read_text())
    return vectors
