# dermal-fn: `make serve` (demo model on http://localhost:8080) and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8080
SERVE_STAMP := $(VENV)/.serve-installed
DEV_STAMP := $(VENV)/.dev-installed
# the test environment without TensorFlow (requirements-test.txt): the serving half of the tests runs here
TEST_VENV := .venv-test
TPY := $(TEST_VENV)/bin/python
TEST_STAMP := $(TEST_VENV)/.test-installed

.PHONY: serve test lint typecheck pytest pytest-serving pytest-tensorflow test-models demo-model bench bench-smoke browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(SERVE_STAMP): requirements.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(DEV_STAMP): requirements.txt requirements-test.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(SERVE_STAMP) $@

$(TEST_STAMP): requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(TEST_VENV)
	$(TPY) -m pip install --quiet --upgrade pip
	$(TPY) -m pip install --quiet -r requirements-test.txt
	touch $@

## serve the bundled synthetic demo model exactly as render.yaml starts it
serve: $(SERVE_STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" functions-framework --target=dermal --source=main.py --port=$(PORT)

## lint, type-check and run every test: the serving half without TensorFlow installed, then the rest
test: $(DEV_STAMP) $(TEST_STAMP) browser lint typecheck pytest-serving pytest-tensorflow

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(DEV_STAMP)
	$(VENV)/bin/mypy dermal_fn model_fetch main.py

## every test in the dev environment
pytest: $(DEV_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

## the tests that need no TensorFlow, in an environment that has none (requirements-test.txt)
pytest-serving: $(TEST_STAMP)
	$(TPY) -m pytest -m "not tensorflow" $(PYTEST_ARGS)

## the tests that need TensorFlow (export, the reference backend, oracles)
pytest-tensorflow: $(DEV_STAMP)
	$(PY) -m pytest -m tensorflow $(PYTEST_ARGS)

## rebuild the small bundles committed for tests (tests/data)
test-models: $(DEV_STAMP)
	$(PY) -m tests.models

browser:
	@bash scripts/ensure_chromium.sh

## retrain and re-export the committed demo bundle (seeded, reproducible)
demo-model: $(DEV_STAMP)
	$(PY) -m dermal_fn.demo.build

## the full benchmark beside TensorFlow and inside a 512 MiB cgroup (~15 min; docs/benchmark.md)
bench: $(DEV_STAMP)
	$(PY) -m bench.run --plot docs/benchmark-rss.png

## the same in seconds, on a tiny model
bench-smoke: $(DEV_STAMP)
	$(PY) -m bench.run --quick --allow-no-cgroup --out bench/out/smoke

clean:
	rm -rf $(VENV) $(TEST_VENV) .pytest_cache .mypy_cache .ruff_cache artifacts
