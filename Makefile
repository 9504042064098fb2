# rankside: `make test` and `make demo` work on a fresh machine.
VENV    ?= .venv
IMAGE   ?= rankside:0.1.0
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: test lint typecheck pytest demo image system-deps bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	# torch for the torch tests: the CPU build where one is on hand at this
	# exact version, else PyPI's default build with CUDA (README, Set-up).
	$(PY) -m pip install -q 'torch==2.13.0'
	touch $(STAMP)

# Programs the tests drive for real, as COMMAND:DEBIAN_PACKAGE: promtool and a
# Prometheus server, chromium for the web page, tmux for `rankside top`;
# podman, runc and mmdebstrap build and run the container image.
SYSTEM_TOOLS := promtool:prometheus prometheus:prometheus chromium:chromium tmux:tmux \
	podman:podman runc:runc mmdebstrap:mmdebstrap

system-deps:
	@missing=$$(for tool in $(SYSTEM_TOOLS); do \
	  command -v $${tool%%:*} >/dev/null || echo $${tool#*:}; done | sort -u); \
	[ -z "$$missing" ] || { \
	  echo "installing Debian packages:" $$missing; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# The layers and the absence of import cycles: contracts in pyproject.toml.
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Most tests wait on real processes rather than compute, so two pytest
# processes (whole files each: module fixtures and in-file order stay) take the
# suite from about 3m20s to 2m on 2 cores.
pytest: $(STAMP) system-deps
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

test: lint typecheck pytest

# The container image (deploy/Dockerfile), with podman or docker.
image:
	deploy/build-image.sh $(IMAGE)

demo: $(STAMP)
	$(PY) examples/demo.py

bench: $(STAMP) system-deps
	for script in bench/bench_*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
