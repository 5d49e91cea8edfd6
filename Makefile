# Two commands for a fresh machine:  `make serve`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve test lint bench triton-venv clean

# torch is installed first and pinned: any other spec pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/gpugate serve $(ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy router scheduler serving

bench: $(STAMP)
	$(PY) loadtests/bench.py $(ARGS)

# The Triton peer's own venv (PyTriton needs numpy<2); bench.py builds it on demand too.
triton-venv: $(STAMP)
	$(PY) loadtests/triton_venv.py

clean:
	rm -rf $(VENV) .venv-triton .gpugate .pytest_cache .mypy_cache .ruff_cache
