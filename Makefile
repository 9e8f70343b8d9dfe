# `make demo` and `make test` work on a fresh machine with Python 3.11+ and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch that lies on this disk; installed before the project so
# that the project's `torch>=2.4` is already satisfied and no CUDA build is pulled.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test typecheck bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PIN)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pqc_kv_cache demo

test: $(STAMP)
	$(PY) -m pytest -q

# mypy over the public surface (configured in pyproject.toml, [tool.mypy])
typecheck: $(STAMP)
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks/bench_audit.py benchmarks/bench_cache.py --benchmark-only --benchmark-group-by=group
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
