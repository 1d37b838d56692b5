# The README's two commands: `make run` (the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-tools setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, alone and pinned: pip then takes the CPU build that lies on disk.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# The embedded default: FedRA in Flower's simulation engine, offline, on CPU.
run: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python deploy/simulate.py $(if $(RUN_CONFIG),-c "$(RUN_CONFIG)")

# The deployment tests need openssl, ssh-keygen, a compose validator (Debian's docker-compose v1)
# and nginx (the Fleet API proxy; Debian puts it in /usr/sbin, outside a user's PATH).
# The Compose demo's test (tests/test_compose.py) runs containers with podman, runc, debootstrap, podman-compose.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-tools:
	@command -v openssl >/dev/null && command -v ssh-keygen >/dev/null && command -v docker-compose >/dev/null && \
	  { command -v nginx >/dev/null || test -x /usr/sbin/nginx; } || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq openssl openssh-client docker-compose nginx >/dev/null; }
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null && \
	  command -v podman-compose >/dev/null || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq podman runc debootstrap podman-compose >/dev/null; }

# Two pytest-xdist workers, each taking a whole module at a time (module fixtures run once),
# in the order tests/conftest.py gives: the slowest modules (the Compose demo, the deployments,
# the simulations) first. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
test: $(STAMP) test-tools
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .flwr outputs

# The Compose demo for real (as root): images from a debootstrap base and offline wheels, the SuperLink,
# its TLS proxy and 3 SuperNodes under podman-compose, 2 rounds, checks, everything removed.
.PHONY: compose-test
compose-test: $(STAMP) test-tools
	HF_HUB_OFFLINE=1 $(BIN)/python deploy/compose_test.py
