# AgentMesh — the two commands a user needs are `make run` and `make test`.
# Paths are anchored at this file, so `make -C path test` and `make -f path/Makefile test` work
# from any directory.
ROOT   := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
PYTHON ?= python3
VENV   := $(ROOT)/.venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test deps lint bench install clean k8s lock

$(STAMP): $(ROOT)/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '$(ROOT)[dev]'
	touch $(STAMP)

install: $(STAMP)

## make run: the local stack (embedded PostgreSQL with migrations applied; Ctrl-C stops it)
run: $(STAMP)
	cd $(ROOT) && $(BIN)/agentmesh up

## make deps: the servers tests/test_engines.py runs against, from Debian's packages:
## PgBouncer (transaction pooling), redis-server with TLS, redis-sentinel. Installed only
## when missing and we are root with apt-get; otherwise those tests skip with the reason
## (and fail instead when CI is set, so a CI machine never skips them silently).
ENGINE_BINS := pgbouncer redis-server redis-sentinel
deps:
	@missing=""; for b in $(ENGINE_BINS); do \
	  PATH="$$PATH:/usr/sbin:/usr/bin" command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "make deps: installing$$missing from Debian's packages"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends pgbouncer redis-server redis-sentinel >/dev/null; } \
	  || echo "make deps: apt-get could not install$$missing: the engine tests will skip"; \
	else \
	  echo "make deps:$$missing not installed and cannot install (needs root and apt-get):" \
	       "the engine tests will skip"; \
	fi

## make test: everything the tests need (PostgreSQL, Redis) is started by the fixtures
test: $(STAMP) deps
	cd $(ROOT) && $(BIN)/pytest -q

lint: $(STAMP)
	cd $(ROOT) && $(BIN)/ruff check .
	cd $(ROOT) && $(BIN)/ruff format --check .
	cd $(ROOT) && $(BIN)/mypy ledger projections api sidecar agentmesh migrations bench tests

## make k8s: render deploy/k8s from charts/agentmesh (Helm's engine from PyPI, no helm binary)
k8s: $(STAMP)
	cd $(ROOT) && $(BIN)/python deploy/render_k8s.py

## make lock: pin the images' dependencies (deploy/docker/constraints.txt, sidecar.txt)
lock: $(STAMP)
	cd $(ROOT) && $(BIN)/python deploy/docker/lock.py

bench: $(STAMP)
	cd $(ROOT) && $(BIN)/python bench/append.py

clean:
	cd $(ROOT) && rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
