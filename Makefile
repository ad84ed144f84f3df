# The README's two commands: `make demo` and `make test`. Both set up .venv first.
# `make benchmarks DATA=...` regenerates every number in BENCHMARKS.md (hours).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data/cifar10n
# CleanNet variants of the ablation tables (tools/benchmark_detection.py ABLATIONS).
ABLATIONS ?= all

.PHONY: install demo test benchmarks clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: install
	$(PY) -m tools.demo

# Two test processes keep both cores busy: much of a test is single-threaded
# (tracing, subprocess start-up); the slow tests go first (tests/conftest.py).
TEST_WORKERS ?= 2

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

# The `benchmark` extra: cleanlab (a detection baseline) and matplotlib (figures).
$(VENV)/.benchmark-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,benchmark]'
	touch $@

benchmarks: install $(VENV)/.benchmark-installed
	$(PY) -m tools.benchmarks --data=$(DATA) --ablations=$(ABLATIONS) --finetune_steps=300

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
