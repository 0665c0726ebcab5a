# Two commands on a fresh machine:  make demo  (the main job)   make test  (the test suite)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

export RAY_AUTH_MODE := disabled
export PYTHONUNBUFFERED := 1

.PHONY: venv demo audit search test test-fast bench bench-cifar ui clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: pip takes it from this machine's local wheel cache when present
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	# the package editable with the platform (Ray, Optuna, MLflow) and test extras
	$(BIN)/pip install -q -e '.[platform,test]'
	@touch $@

# The main job on the embedded default (bundled MNIST digits, local Ray, MLflow on a local sqlite file).
demo: venv
	$(BIN)/python -m tldr_core.cli.audit --dataset mnist-bundled --train-size 1000 --out runs/demo --overwrite

audit: demo

# Ray Tune + Optuna search, every trial in MLflow (runs/mlflow.db), champion in the registry (docs/search.md).
search: venv
	$(BIN)/python tune/search.py --dataset mnist-bundled --trials 8

# MLflow UI on the searches' database, http://127.0.0.1:5000 (loopback only).
ui: venv
	$(BIN)/python mlflow/serve.py

# Two pytest-xdist workers: many slow tests wait on processes (Ray, MLflow, PostgreSQL, pip), and tests sharing
# an expensive fixture stay on one worker (tests/xdist_groups.py). WORKERS=0: one process. ARGS: more pytest flags.
WORKERS ?= 2
XDIST = $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadgroup)

test: venv
	$(BIN)/python -m pytest -q $(XDIST) $(ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" $(XDIST) $(ARGS)

clean:
	rm -rf runs .pytest_cache

# Benchmark suite: writes docs/benchmarks.md (~35 min on 2 idle cores). Laptop: make bench ARGS=--quick
bench: venv
	$(BIN)/python bench/run.py $(ARGS)

# CIFAR-10 cost: step cost, FLOPs, scoring at 5,000/50,000, trials/hour at 1/2/4, the 200-trial projection.
bench-cifar: venv
	$(BIN)/python bench/run.py --only cifar,cifar_trials --out docs/benchmarks-cifar10.md $(ARGS)
