# One-command entry points (see README). Everything lives in a local virtual environment (.venv).
PYTHON ?= python3
VENV   ?= .venv
# CPU wheel from local disk on the development machines; a GPU site overrides TORCH_SPEC/PIP_TORCH_ARGS
# (docs/deployment.md), e.g. make setup PIP_TORCH_ARGS="--index-url <PyTorch CUDA wheel index>".
TORCH_SPEC     ?= torch==2.13.0
PIP_TORCH_ARGS ?=
BIN := $(VENV)/bin
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: setup demo test test-fast study clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(PIP_TORCH_ARGS)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# The main job: a federated simulation on the embedded synthetic default cohort.
demo: setup
	$(BIN)/strpnet simulate

# The comparison study of docs/results.md (about an hour on 2 cores; resumable).
study: setup
	$(BIN)/python benchmarks/study/run_study.py --config full --out runs/study-full --publish

# Two workers, one test file each at a time, in the order of tests/conftest.py (the long end-to-end files first).
# --no-loadscope-reorder: without it pytest-xdist (>= 3.5) hands out files with many tests first, which left the
# one-test end-to-end files (study smoke, deployments) for the end of the run.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration and not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
