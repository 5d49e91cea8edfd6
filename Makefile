# Two commands for a fresh machine:  `make serve`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The native gRPC door, router._grpcdoor (docs/grpc.md): the install below compiles it when
# gRPC C++ is installed (server.grpc_server: auto then serves gRPC on it), else leaves it out.
NATIVE := router/_grpcdoor$(shell $(if $(wildcard $(PY)),$(PY),python3) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
# The sanitizer build of `make fuzz-native`, kept apart from the regular one.
SANITIZE := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -O1 -g
FUZZ_CASES ?= 20000
FUZZ_SEED ?= 20261206

.PHONY: install native fuzz-native fuzz-grpcio serve test lint docs bench soak triton-venv clean

# torch is installed first and pinned: any other spec pulls a multi-GB CUDA build.
# The editable install builds the native door in place (setup.py).
$(STAMP): pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) native

# Rebuilds the door in place after grpcdoor.cc changes. Without gRPC C++ it warns and
# makes no file, so the next make tries again.
native: $(NATIVE)

$(NATIVE): router/native/grpcdoor.cc setup.py | $(STAMP)
	$(PY) setup.py -q build_ext --inplace

# ASan+UBSan build of the door, then its tests and a raw HTTP/2 frame fuzz run against it.
fuzz-native: $(STAMP)
	rm -rf build/asan
	GPUGATE_NATIVE=1 GPUGATE_NATIVE_FLAGS="$(SANITIZE)" $(PY) setup.py -q build_ext \
		--force --build-lib build/asan --build-temp build/asan/tmp
	$(PY) -m tests.fuzz.native_sanitized --door-dir build/asan/router \
		--cases $(FUZZ_CASES) --seed $(FUZZ_SEED)

# The same frame fuzz against the portable grpcio door, each seed in a process of its own:
# grpcio 1.85 crashes on some cases (docs/grpc.md); the target fails when any seed does.
fuzz-grpcio: $(STAMP)
	@mkdir -p build; failed=0; for seed in 1 2 3 4 5; do \
		$(PY) -m tests.fuzz.door_run grpcio --cases $(or $(CASES),2000) --seed $$seed \
			>build/fuzz-grpcio-$$seed.log 2>&1 \
			&& echo "seed $$seed: ok" || { echo "seed $$seed: exit $$? (build/fuzz-grpcio-$$seed.log)"; failed=1; }; \
	done; exit $$failed

serve: $(STAMP) native
	$(VENV)/bin/gpugate serve $(ARGS)

test: $(STAMP) native
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy router scheduler serving

# The admin API's property-based run (tests/e2e/test_admin_openapi.py) with many more
# examples per operation than `make test` takes, on SQLite and PostgreSQL; prints figures.
.PHONY: schemathesis
schemathesis: $(STAMP)
	GPUGATE_SCHEMATHESIS_EXAMPLES=$(or $(EXAMPLES),100) $(VENV)/bin/pytest -s -q \
		tests/e2e/test_admin_openapi.py $(PYTEST_ARGS)

# docs/config.md is generated from the config models; a unit test fails when it is stale.
docs: $(STAMP)
	$(PY) -m serving.config.reference docs/config.md

bench: $(STAMP)
	$(PY) loadtests/bench.py $(ARGS)

# RSS of the gateway and model replicas under 30 minutes of gRPC load (loadtests/README.md);
# fails if one grew more than 5 MB after the warm-up.
soak: $(STAMP)
	$(PY) loadtests/soak.py $(SOAK_ARGS)

# The Triton peer's own venv (PyTriton needs numpy<2); bench.py builds it on demand too.
triton-venv: $(STAMP)
	$(PY) loadtests/triton_venv.py

clean:
	rm -rf $(VENV) .venv-triton .gpugate .pytest_cache .mypy_cache .ruff_cache .schemathesis
	rm -rf router/_grpcdoor*.so build
