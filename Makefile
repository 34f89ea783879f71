# One way to set up, run and test; README and CI call these targets.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# this machine kind's pip config names index folders that may not exist: drop those warnings, keep errors
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := prometheus debootstrap systemd-container shellcheck wrk nftables iproute2 zstd util-linux curl haproxy
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip $(QUIET_PIP)
	# the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install -q -c constraints.txt "torch==2.13.0" $(QUIET_PIP)
	$(BIN)/pip install -q -c constraints.txt -e ".[all,dev]" $(QUIET_PIP)
	rm -f $(VENV)/.installed-* && touch $@

demo: setup
	$(BIN)/rlfleet demo

test: setup
	$(BIN)/pytest tests -n 2

test-fast: setup
	$(BIN)/pytest tests -m "not onprem and not slow"

lint: setup
	$(BIN)/ruff check sdk agents tests bench infra_cloud
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/bench_sdk.py
	$(BIN)/python bench/bench_agents.py
	$(BIN)/python bench/bench_inference.py
	$(BIN)/python bench/bench_serving.py

clean:
	rm -rf $(VENV) build *.egg-info
