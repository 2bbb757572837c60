# AgentMesh — the two commands a user needs are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench install clean k8s lock

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## make run: the local stack (embedded PostgreSQL with migrations applied; Ctrl-C stops it)
run: $(STAMP)
	$(BIN)/agentmesh up

## make test: everything the tests need (PostgreSQL, Redis) is started by the fixtures
test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy ledger projections api sidecar agentmesh migrations bench tests

## make k8s: render deploy/k8s from charts/agentmesh (Helm's engine from PyPI, no helm binary)
k8s: $(STAMP)
	$(BIN)/python deploy/render_k8s.py

## make lock: pin the images' dependencies (deploy/docker/constraints.txt, sidecar.txt)
lock: $(STAMP)
	$(BIN)/python deploy/docker/lock.py

bench: $(STAMP)
	$(BIN)/python bench/append.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
