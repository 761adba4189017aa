# sflam: two commands work on a fresh machine, `make demo` and `make test`.
# Both build the environment first: a .venv with pinned dependencies, and a broker.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.sflam-installed
EXTRAS := edge,server,export,cluster,dev
PIP_QUIET ?= -q

.PHONY: all setup broker sshd netem chromium test drill demo lock clean

all: test

setup: $(STAMP) broker

$(STAMP): pyproject.toml requirements/constraints.txt
	@echo "==> creating $(VENV) with $(PYTHON)"
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else "sflam needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_QUIET) pip==26.3
	@echo "==> installing pinned dependencies (torch is the local CPU build)"
	$(PIP) install $(PIP_QUIET) --no-compile -c requirements/constraints.txt -e ".[$(EXTRAS)]"
	@echo "==> compiling the installed modules on every core"
	@# pip compiles one file at a time (75 of a fresh install's 125 s here); compileall -j 0 takes
	@# 32 s on 2 cores. Files that are not valid Python 3.11 (an example inside litert_torch) are
	@# skipped, as pip skips them, hence the ignored status.
	@$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
		> /dev/null || true
	@touch $(STAMP)

broker:
	@scripts/ensure-broker.sh

# the flash tests drive a real sshd; the demo does not need one
sshd:
	@scripts/ensure-sshd.sh

# kernel links (sflam simulate --network netem): ip, tc and iptables; the demo does not need them
netem:
	@scripts/ensure-netem.sh

# the fleet page's browser tests drive a headless Chromium; the demo does not need one
chromium:
	@scripts/ensure-chromium.sh

test: setup sshd netem chromium
	$(PY) -m pytest $(PYTEST_ARGS)

# The drills: the device on an emulated aarch64 root (scripts/arm64_drill.sh; root, ~12 min the
# first time, the root filesystem is cached after that) and a link flap under kernel links (root).
# CI runs them after `make test`.
drill: setup netem
	$(PY) -m pytest -m drill $(PYTEST_ARGS)

# The main job: a split federated run over a private broker, with a server and 10 device processes.
demo: setup
	$(VENV)/bin/sflam simulate $(DEMO_ARGS)

# Re-pin every transitive dependency after changing a pin in pyproject.toml.
lock: $(STAMP)
	@{ echo "# Every transitive pin of the full development environment (pip install -c). Regenerate with: make lock"; \
	   $(PIP) freeze --exclude-editable | sed -e 's/+cpu$$//' \
	     -e 's/^ai-edge-litert==.*/&; platform_machine != "aarch64"/'; } > requirements/constraints.txt
	@# LiteRT's pin has no Linux aarch64 wheel; the edge extra pins 1.4.0 there (pyproject.toml)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
