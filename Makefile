# Two commands for a fresh machine:  `make serve`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The native gRPC door (router/native/build.sh; server.grpc_server: auto uses it when built).
NATIVE := router/_grpcdoor$(shell python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')

.PHONY: install native serve test lint bench triton-venv clean

# torch is installed first and pinned: any other spec pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) native

# Installs Debian's libgrpc++-dev first when missing and run as root; else says what to
# install and leaves the gRPC port to grpcio.
# (Without the libraries no file is made, so the next make tries again.)
native: $(NATIVE)

$(NATIVE): router/native/grpcdoor.cc router/native/build.sh | $(STAMP)
	PYTHON=$(PY) bash router/native/build.sh

serve: $(STAMP) native
	$(VENV)/bin/gpugate serve $(ARGS)

test: $(STAMP) native
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
	rm -f router/_grpcdoor*.so
