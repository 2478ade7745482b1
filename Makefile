# Two entry points: `make tune` (the main job on embedded defaults) and `make test`
# (everything, real Ray/MLflow services included); `make test-fast` is the quick loop.
VENV ?= .venv
PY := $(VENV)/bin/python
# Tox21 is downloaded from MoleculeNet by default; a local copy is used when one sits beside the repo.
DATA ?= $(firstword $(wildcard ../shared/data/tox21.csv) default)
CONFIG ?= quick
# Test processes: the end-to-end tests spend most of their time waiting on Ray, MLflow and
# PostgreSQL, so two share 2 CPUs well; worksteal rebalances the long tests at the end.
WORKERS ?= 2

.PHONY: install tune test test-fast lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# No GPU: take the CPU wheel first so the range below installs nothing more.
	command -v nvidia-smi >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

tune: install
	$(VENV)/bin/toxtune tune --config $(CONFIG) --data $(DATA)

test: install
	$(PY) -m pytest -n $(WORKERS) --dist worksteal

# Everything not marked slow (no Ray cluster, MLflow server, served model or full job).
test-fast: install
	$(PY) -m pytest -n $(WORKERS) --dist worksteal -m "not slow"

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
