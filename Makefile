# Every target sets itself up: .venv is created on first use and refreshed only
# when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench notebooks reproduce clean

$(STAMP): pyproject.toml setup.py softshare_jax/hostprox.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m benchmarks.demo

# Two workers, a test file per worker at a time: most of the suite's time is
# XLA compiling on one core, and a file's module-level fixtures stay in one process.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile

bench: $(STAMP)
	$(PY) -m benchmarks.prox_speed

# Rebuilds the executed notebooks from their jupytext sources (notebooks/*.py).
notebooks: $(STAMP)
	$(PY) notebooks/build.py

# The heavy runs whose output is committed under benchmarks/results/ (not in CI).
reproduce: $(STAMP)
	$(PY) -m benchmarks.prox_speed --full
	$(PY) -m benchmarks.prior_overhead
	$(PY) -m benchmarks.tying
	$(PY) -m benchmarks.shift_detection
	$(PY) -m benchmarks.compress_mnist
	$(PY) -m benchmarks.shuffled_filters
	$(PY) -m benchmarks.recipe
	$(PY) -m benchmarks.prox_strength
	$(PY) -m benchmarks.generalization
	$(PY) -m benchmarks.compressed_apply
	$(PY) -m benchmarks.compress_channels
	$(PY) -m benchmarks.compress_algorithms
	$(PY) -m benchmarks.prox_leaves
	$(PY) -m benchmarks.scale

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
