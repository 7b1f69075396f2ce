# One-command entry points (see README). Everything lives in a local virtual environment (.venv).
PYTHON ?= python3
VENV   ?= .venv
# torch: the CPU build unless PIP_TORCH_ARGS says otherwise. A GPU site overrides it (docs/deployment.md), e.g.
# make setup PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cu128". Without PIP_TORCH_ARGS, a torch
# that pip's own configuration offers without an index (find-links: the CPU wheel on local disk of the development
# machines) is installed as it is; otherwise PyTorch's CPU index is added, whose 2.13.0+cpu outranks PyPI's Linux
# 2.13.0 (the CUDA build, several GB).
TORCH_SPEC      ?= torch==2.13.0
PIP_TORCH_ARGS  ?=
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
BIN := $(VENV)/bin
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: setup demo test test-fast study clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if [ -n '$(PIP_TORCH_ARGS)' ] || $(BIN)/python -m pip install -q --dry-run --no-index --no-deps \
	    --ignore-installed "$(TORCH_SPEC)" >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(PIP_TORCH_ARGS); \
	else \
	  $(BIN)/python -m pip install -q "$(TORCH_SPEC)" --extra-index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/python -m pip install -q -e ".[simulation,test]"
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
