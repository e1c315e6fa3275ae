# dermal-fn: `make serve` (demo model on http://localhost:8080) and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8080
SERVE_STAMP := $(VENV)/.serve-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: serve test lint typecheck pytest demo-model bench bench-smoke browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(SERVE_STAMP): requirements.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(DEV_STAMP): requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(SERVE_STAMP) $@

## serve the bundled synthetic demo model exactly as render.yaml starts it
serve: $(SERVE_STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" functions-framework --target=dermal --source=main.py --port=$(PORT)

## lint, type-check and run every test (Chromium is installed when missing)
test: $(DEV_STAMP) browser lint typecheck pytest

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(DEV_STAMP)
	$(VENV)/bin/mypy dermal_fn model_fetch main.py

pytest: $(DEV_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

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
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache artifacts
