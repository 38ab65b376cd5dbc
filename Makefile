# Quick start: `make demo` and `make test` on a fresh clone; each creates its own environment.
#   .venv-demo  what `moeplace demo` needs: the package and its dependencies, CPU PyTorch (no Triton, no
#               test tools);
#   .venv       development: the same plus the test tools and Triton (kernels under TRITON_INTERPRET=1).
PYTHON ?= python3
TORCH ?= torch==2.13.0
# PyTorch's CPU-only index: a plain `pip install torch` resolves the CUDA build (GBs of nvidia-*
# packages) on Linux. An unreachable index fails within seconds (no retries) and pip falls back to its
# configured indexes, so an offline machine with a local wheel still installs.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_VENV := .venv-demo
DEMO_STAMP := $(DEMO_VENV)/.installed

.PHONY: install demo-env test demo bench-solver clean

install: $(STAMP)
demo-env: $(DEMO_STAMP)

# Strict editable mode: the install is a tree of links (build/__editable__.*) that a plain path
# entry exposes, so `moeplace.*` resolves the same way for Python, pytest and static tools. Links
# cover the files that existed at install time: adding or removing a module changes its folder's
# time stamp, which re-runs the install.
PACKAGE_DIRS := core core/data placer profiler runtime kernels
EDITABLE := --config-settings editable_mode=strict
comma := ,
# $(call ...) splits its arguments at commas: the extras' comma goes in as a variable.
TEST_EXTRAS := [dev$(comma)kernels]

define make_env
	@echo "== $(1): creating the environment"
	$(PYTHON) -m venv $(1)
	@echo "== $(1): PyTorch, CPU build ($(TORCH))"
	$(1)/bin/python -m pip install -q --timeout 5 --retries 0 --index-url $(TORCH_INDEX) "$(TORCH)" \
		|| $(1)/bin/python -m pip install -q "$(TORCH)"
	@echo "== $(1): moeplace$(2) and its dependencies"
	$(1)/bin/python -m pip install -q -e '.$(2)' $(EDITABLE)
endef

$(STAMP): pyproject.toml $(PACKAGE_DIRS)
	$(call make_env,$(VENV),$(TEST_EXTRAS))
	touch $(STAMP)

$(DEMO_STAMP): pyproject.toml $(PACKAGE_DIRS)
	$(call make_env,$(DEMO_VENV),)
	touch $(DEMO_STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(DEMO_STAMP)
	$(DEMO_VENV)/bin/moeplace demo

bench-solver: $(STAMP)
	$(BIN)/python benchmarks/solver.py

clean:
	rm -rf $(VENV) $(DEMO_VENV) build *.egg-info .pytest_cache
