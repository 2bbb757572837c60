"""The README's code blocks (and docs/API.md's) run, verbatim, against a live
local stack (issue 14).

Every fenced block tagged ``bash``/``sh``/``shell`` runs with ``bash -e -o
pipefail``, every ``python`` block with the virtualenv's Python, in README
order, in one scratch directory that looks like a checkout next to `make run`:
``.venv`` (a link to this checkout's), and the ``.agentmesh/`` of an
`agentmesh up` started there on the default ports (8080, 9090, 8081, …), which
the README's examples use. ``PATH`` starts with ``.venv/bin``, as after
``. .venv/bin/activate``. A block fails the test on a non-zero exit.

A block that is not meant to run here says so on the line before its fence::

    <!-- not-run: why -->

(`make run` itself, a long-running server, a benchmark). Such blocks are
listed, and their number is kept small by ``MAX_NOT_RUN``. Untagged blocks
(sample output) and YAML are not commands and are not run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
API_DOC = ROOT / "docs" / "API.md"
RUN = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python"}
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(?P<reason>\S.*?)\s*-->$")
MAX_NOT_RUN = 7  # make run/test, a long-running server, a benchmark, helm, docker compose, the
# ledger key rotation (it would retire the key of the stack the blocks run against)


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    code: str
    not_run: str | None

    source: str = "README.md"

    @property
    def name(self) -> str:
        return f"{self.source}:{self.line}:{self.lang}"


def readme_blocks(text: str, source: str = "README.md") -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        match = re.match(r"^```(\w*)\s*$", lines[index])
        if not match:
            index += 1
            continue
        start, lang = index, match.group(1)
        end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
        previous = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        marker = NOT_RUN.match(previous.strip())
        blocks.append(
            Block(
                start + 1,
                lang,
                "\n".join(lines[start + 1 : end]) + "\n",
                marker.group("reason") if marker else None,
                source,
            )
        )
        index = end + 1
    return blocks


# The README first, then the API reference (it uses files the README made).
BLOCKS = readme_blocks(README.read_text()) + readme_blocks(API_DOC.read_text(), "docs/API.md")
RUNNABLE = [b for b in BLOCKS if b.lang in RUN and b.not_run is None]


def test_not_run_blocks_are_few_and_give_a_reason() -> None:
    skipped = [b for b in BLOCKS if b.not_run is not None]
    assert len(skipped) <= MAX_NOT_RUN, [b.name for b in skipped]
    for block in skipped:
        assert block.lang in RUN, f"{block.name}: only commands need a not-run marker"
    assert len(RUNNABLE) >= 8


def test_the_parser_sees_markers_and_languages() -> None:
    sample = "x\n<!-- not-run: a server -->\n```bash\nserve\n```\n\n```python\nprint(1)\n```\n"
    first, second = readme_blocks(sample)
    assert (first.lang, first.not_run, first.code) == ("bash", "a server", "serve\n")
    assert (second.lang, second.not_run, second.line) == ("python", None, 7)


@dataclass
class Stack:
    cwd: Path
    env: dict[str, str]


def _ready() -> bool:
    try:
        return httpx.get("http://127.0.0.1:8080/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # A `mktemp -d` folder (0700): the stack must start from one, as root too.
    cwd = Path(tempfile.mkdtemp(prefix="agentmesh-readme-"))
    (cwd / ".venv").symlink_to(ROOT / ".venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTMESH_", "PROMETHEUS"))}
    env["PATH"] = f"{cwd / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["VIRTUAL_ENV"] = str(cwd / ".venv")
    env["AGENTMESH_LOG_LEVEL"] = "WARNING"
    up = subprocess.Popen(
        [sys.executable, "-m", "agentmesh", "up"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not _ready():
            if up.poll() is not None:
                pytest.fail(f"agentmesh up exited: {up.communicate()[0]}")
            assert time.monotonic() < deadline, "the stack never became ready"
            time.sleep(0.2)
        yield Stack(cwd, {k: v for k, v in env.items() if k != "AGENTMESH_LOG_LEVEL"})
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            up.kill()
            up.communicate()
        shutil.rmtree(cwd, ignore_errors=True)


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_readme_block_runs(stack: Stack, block: Block) -> None:
    if RUN[block.lang] == "bash":
        argv = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    else:
        argv = [str(stack.cwd / ".venv" / "bin" / "python"), "-c", block.code]
    result = subprocess.run(
        argv, cwd=stack.cwd, env=stack.env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, (
        f"{block.name} exited {result.returncode}\n--- block\n{block.code}"
        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )
