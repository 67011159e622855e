# The README's two commands: `make run` and `make test`. Everything else builds on them.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export GATEWAY_MASTER_KEY ?= sk-gateway-dev-master-key

.PHONY: install run test demo lint bench lock clean dashboard-browser browser-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The Node SDK tests (tests/node) need the official `openai` package.
NODE_STAMP := tests/node/node_modules/.package-lock.json
$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error

# The dashboard's browser tests (tests/dashboard) drive Debian's chromium; installed once, as root.
dashboard-browser:
	tests/dashboard/install.sh

# The browser-token page's tests (tests/browser): the same chromium, and the page's npm packages (the
# openai SDK, esbuild to bundle it). Quick when present.
BROWSER_STAMP := tests/browser/node_modules/.package-lock.json
$(BROWSER_STAMP): tests/browser/package.json tests/browser/package-lock.json
	cd tests/browser && npm ci --no-audit --no-fund --loglevel=error

browser-deps: dashboard-browser $(BROWSER_STAMP)

# The banner's database comes from the gateway's own reading of DATABASE_URL, its password masked.
run: install
	@echo "llm-gateway on http://$${GATEWAY_HOST:-127.0.0.1}:$${GATEWAY_PORT:-8080}/v1 (database: $$($(PY) -m app.db.engine))"
	$(VENV)/bin/llm-gateway migrate
	$(VENV)/bin/llm-gateway serve

test: install $(NODE_STAMP) browser-deps
	$(PY) -m pytest -q

demo: install
	$(PY) -m tests.demo

lint: install
	$(VENV)/bin/ruff check app tests bench
	$(VENV)/bin/ruff format --check app tests bench
	$(VENV)/bin/mypy app

# The benchmark harness (bench/README.md): installs what it needs, stops what it starts, ~25 minutes.
# BENCH_ARGS=--quick for a short run without LiteLLM; --profile adds py-spy profiles of the gateway.
bench: install
	$(PY) bench/run.py $(BENCH_ARGS)

# The image's exact dependencies with their hashes (Dockerfile): the runtime and the `otel` extra for
# Linux x86_64 and aarch64 on CPython 3.11, and the build backend apart (it is not shipped). Run after a
# change of pyproject.toml's dependencies; uv is installed into the venv for it.
LOCK_FLAGS := --generate-hashes --python-version 3.11 --python-platform linux --no-strip-extras \
	--custom-compile-command "make lock" --quiet
lock: install
	$(PY) -m pip install --quiet 'uv>=0.5'
	$(VENV)/bin/uv pip compile pyproject.toml --extra otel $(LOCK_FLAGS) -o requirements.lock
	echo 'setuptools>=69' | $(VENV)/bin/uv pip compile - $(LOCK_FLAGS) -o requirements-build.lock

clean:
	rm -rf $(VENV) var build *.egg-info
