# Quick start: `make demo` and `make test` on a fresh clone; both create .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of PyTorch; an unpinned `torch` may pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install test demo bench-solver clean

install: $(STAMP)

# Strict editable mode: the install is a tree of links (build/__editable__.*) that a plain path
# entry exposes, so `moeplace.*` resolves the same way for Python, pytest and static tools. Links
# cover the files that existed at install time: adding or removing a module changes its folder's
# time stamp, which re-runs the install.
PACKAGE_DIRS := core core/data placer profiler runtime kernels

$(STAMP): pyproject.toml $(PACKAGE_DIRS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev,kernels]' --config-settings editable_mode=strict
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/moeplace demo

bench-solver: $(STAMP)
	$(BIN)/python benchmarks/solver.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
