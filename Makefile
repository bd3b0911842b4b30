# `make test` and `make demo` set themselves up: a .venv in the repo (unless a virtual environment is
# already active), torch pinned to the CPU build FIRST (a bare `torch` requirement would pull gigabytes
# of CUDA wheels), then this package with its test extras. A second run reuses what is installed.
SHELL := /bin/bash
VENV_DIR := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),$(CURDIR)/.venv)
PY := $(VENV_DIR)/bin/python
STAMP := $(VENV_DIR)/.nemo_aligner-installed
TORCH_PIN := torch==2.13.0

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV_DIR)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $@

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) examples/nlp/gpt/train_gpt_dpo.py

bench: setup
	$(PY) benchmarks/bench_model.py

clean:
	rm -rf results .pytest_cache
