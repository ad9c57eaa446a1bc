# The two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
HOST   ?= 127.0.0.1
PORT   ?= 8000
DATA_DIR ?= .gateway
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: run test unit lint bench soak check venv clean router

# The gateway's own dependencies at the versions the images install (deploy/constraints.txt), so
# that the tests run what ships and a new release on PyPI cannot change a CI run's outcome.
$(STAMP): pyproject.toml deploy/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c deploy/constraints.txt -e '.[test,bench,embedded-redis,simulator]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(PY) -m gateway serve --policies policies.yaml --simulate-missing --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR)

# Two pytest-xdist workers, one test file each at a time (module fixtures start once): the e2e
# tests mostly wait on processes, so on 2 cores the suite takes ~6 instead of ~10 minutes.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The in-process tests alone (seconds): tests/unit, no processes, no Redis.
unit: $(STAMP)
	$(PY) -m pytest -q -m "not e2e"

# The gate CI runs first: ruff's rules, ruff format, and mypy --strict over [tool.mypy] files.
lint: $(STAMP)
	$(VENV)/bin/ruff check gateway tests router_models
	$(VENV)/bin/ruff format --check gateway tests router_models
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m tests.bench.gateway_bench

# 10 minutes of load with 10 % faulty requests, loopback only (SOAK_ARGS="--duration 60" for less).
soak: $(STAMP)
	$(PY) -m tests.bench.soak $(SOAK_ARGS)

# Rebuild the router's artifacts (gateway/classifier/artifacts/, package data) from ../shared/data/routing
# (about 20 minutes on 2 cores).
router: $(STAMP)
	$(PY) -m pip install -q -e '.[train]'
	HF_HUB_OFFLINE=1 nice -n 19 $(PY) -m router_models.train --layers 3 --max-tokens 96 --families 2 --epochs 2 --distill 1.0 --out router_models/build/ckpt_ft_l3_t96_fam2
	$(PY) -m router_models.export --ckpt router_models/build/ckpt_ft_l3_t96_fam2 --artifacts gateway/classifier/artifacts
	$(PY) -m router_models.evaluate --artifacts gateway/classifier/artifacts --teacher --text-selection
	$(PY) -m router_models.head_train --artifacts gateway/classifier/artifacts

check: $(STAMP)
	$(PY) -m gateway check policies.yaml

clean:
	rm -rf $(VENV) .gateway
