# Everything a fresh clone needs: `make demo` and `make test` set themselves up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/lock-cpu.txt

export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled

.PHONY: install lint test test-fast demo bench lock clean gpu-wheels

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall only when the project's metadata or the lock changes: the locked dependency set
# (requirements/lock-cpu.txt, every transitive pin), then the project itself (editable, --no-deps).
# scripts/install.sh is the same script the Dockerfile and CI's wheel test run.
$(STAMP): pyproject.toml $(LOCK) scripts/install.sh | $(BIN)/python
	bash scripts/install.sh --editable --check --python $(BIN)/python
	touch $(STAMP)

install: $(STAMP)

# ruff on the code; hadolint (the dev extra's binary wheel) on the Dockerfile; the cluster configs against
# KubeRay's CRDs, Kubernetes' schemas and the cross-field rules (cluster_configs/validate.py).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile
	$(BIN)/python cluster_configs/validate.py

# The full suite (what CI runs), with its 15 slowest tests listed at the end.
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

# Everyday tier: unit tests and a small end-to-end run; no test marked `cluster` or `slow` (every test on the
# shared Ray session but the `smoke` one is `slow`, see tests/conftest.py). Under 3 minutes on 2 cores.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 -m "not cluster and not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/manifoldgd demo

bench: $(STAMP)
	$(BIN)/python bench/ops.py

# The wheels bench/gpu.py needs on the GPU machine (diffusers and its run-time dependencies at the lock's
# versions, for its Python 3.12) in .gpu-wheels/cp312, checked under the 64 MiB a device call can carry.
# docs/gpu.md: the one command that unpacks them there and runs the check. GPU_PY=3.11 to rehearse here.
GPU_PY ?= 3.12
gpu-wheels: $(STAMP)
	$(BIN)/python scripts/gpu_wheels.py --python-version $(GPU_PY)

# After changing a pin in pyproject.toml: install the new pin into .venv, then rewrite the lock from it
# (`make lock`) and commit requirements/lock-cpu.txt and lock-runtime.txt. CI checks that the locks and the
# environment agree.
lock: | $(BIN)/python
	$(BIN)/python scripts/lock.py

clean:
	rm -rf $(VENV) build *.egg-info
