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
# Apache Beam's environment (requirements-batch.txt: apache-beam pins pillow<13): the batch tests run here
BATCH_VENV := .venv-batch
BPY := $(BATCH_VENV)/bin/python
BATCH_STAMP := $(BATCH_VENV)/.batch-installed

.PHONY: serve test lock lint typecheck pytest pytest-serving pytest-tensorflow pytest-batch test-models demo-model bench bench-smoke browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# every environment installs from its lock file: all transitive versions pinned, every file's hash checked
$(SERVE_STAMP): requirements.lock | $(PY)
	$(PY) -m pip install --quiet --require-hashes -r requirements.lock
	touch $@

$(DEV_STAMP): requirements-dev.lock requirements-tfkeras.lock | $(PY)
	$(PY) -m pip install --quiet --require-hashes -r requirements-dev.lock
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements-tfkeras.lock
	touch $(SERVE_STAMP) $@

$(TEST_STAMP): requirements-test.lock
	$(PYTHON) -m venv $(TEST_VENV)
	$(TPY) -m pip install --quiet --upgrade pip
	$(TPY) -m pip install --quiet --require-hashes -r requirements-test.lock
	touch $@

$(BATCH_STAMP): requirements-batch.lock
	$(PYTHON) -m venv $(BATCH_VENV)
	$(BPY) -m pip install --quiet --upgrade pip
	$(BPY) -m pip install --quiet --require-hashes -r requirements-batch.lock
	touch $@

## re-lock requirements*.txt into requirements*.lock (hashes; Linux x86-64, Python 3.11.7 as on Render)
lock: | $(PY)
	$(PY) -m pip install --quiet uv==0.13.9
	for name in requirements requirements-test requirements-dev requirements-batch; do \
	  $(VENV)/bin/uv pip compile $$name.txt --generate-hashes --python-version 3.11.7 \
	    --python-platform x86_64-unknown-linux-gnu --no-header --quiet -o $$name.lock; done
	$(VENV)/bin/uv pip compile requirements-tfkeras.txt --no-deps --generate-hashes --python-version 3.11.7 \
	  --python-platform x86_64-unknown-linux-gnu --no-header --quiet -o requirements-tfkeras.lock

## serve the bundled synthetic demo model exactly as render.yaml starts it
serve: $(SERVE_STAMP)
	@echo "dermal-fn: serving $${MODEL_URI:-the synthetic demo model} on http://localhost:$(PORT)/ (the upload page; Ctrl-C stops)"
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" functions-framework --target=dermal --source=main.py --port=$(PORT)

## lint, type-check and run every test: the serving half without TensorFlow installed, then the rest
test: $(DEV_STAMP) $(TEST_STAMP) $(BATCH_STAMP) browser lint typecheck pytest-serving pytest-tensorflow pytest-batch

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(DEV_STAMP)
	$(VENV)/bin/mypy dermal_fn model_fetch bench tests main.py

## every test in the dev environment
pytest: $(DEV_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

## the tests that need no TensorFlow, in an environment that has none (requirements-test.txt)
pytest-serving: $(TEST_STAMP)
	$(TPY) -m pytest -m "not tensorflow and not batch" $(PYTEST_ARGS)

## the tests that need TensorFlow (export, the reference backend, oracles)
pytest-tensorflow: $(DEV_STAMP)
	$(PY) -m pytest -m tensorflow $(PYTEST_ARGS)

## the Apache Beam tests, in Beam's environment (requirements-batch.txt)
pytest-batch: $(BATCH_STAMP)
	$(BPY) -m pytest -m batch tests/test_batch.py $(PYTEST_ARGS)

## rebuild the small bundles committed for tests (tests/data)
test-models: $(DEV_STAMP)
	$(PY) -m tests.models

browser:
	@bash scripts/ensure_chromium.sh

## retrain and re-export the committed demo bundle (seeded, reproducible)
demo-model: $(DEV_STAMP)
	$(PY) -m dermal_fn.tools.build_demo

## the full benchmark beside TensorFlow and inside a 512 MiB cgroup, cold starts and a 12 MP request at Render free's 0.1 CPU, quantization on a trained model (about 50 min from a fresh clone; bench/README.md)
bench: $(DEV_STAMP)
	$(PY) -m bench.run --plot docs/benchmark-rss.png
	$(PY) -m bench.hostile --json bench/out/hostile.json
	$(PY) -m bench.trust_cost
	$(PY) -m bench.coldstart --model bench/out/effnetv2s_384_none.dermal --runs 3 --sources local --restart --warmed --render-free --guard
	$(PY) -m bench.trained
	$(PY) -m bench.quota
	$(PY) -m bench.isa

## the same in seconds, on a tiny model
bench-smoke: $(DEV_STAMP)
	$(PY) -m bench.run --quick --allow-no-cgroup --out bench/out/smoke

clean:
	rm -rf $(VENV) $(TEST_VENV) $(BATCH_VENV) .pytest_cache .mypy_cache .ruff_cache artifacts
