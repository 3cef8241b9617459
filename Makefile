# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

.PHONY: demo test bench integration test-tools
demo: $(VENV)/.installed   ## the simulator with autosleepd in front: a sleep and a wake in seconds
	$(VENV)/bin/autosleepd demo

# Twice: with one process, and with two worker processes (AUTOSLEEPD_WORKERS=2) for every
# autosleepd the tests start (tests marked single_process, and hosts of several engines, keep one).
test: $(VENV)/.installed test-tools   ## the whole test suite, with 1 and with 2 workers
	$(VENV)/bin/python -m pytest
	AUTOSLEEPD_TEST_WORKERS=2 $(VENV)/bin/python -m pytest

# Two tests need Debian packages: the live page's browser test (chromium) and the alert rules'
# unit tests (promtool, in prometheus). Installed here when run as root where apt is (CI, a fresh
# Debian box); elsewhere those tests skip and say why. A failed install only warns.
test-tools:
	@for need in chromium:chromium promtool:prometheus; do \
	  tool=$${need%%:*}; package=$${need#*:}; \
	  command -v $$tool >/dev/null 2>&1 || { \
	    [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && { \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$package >/dev/null 2>&1 || { \
	        apt-get update -qq >/dev/null 2>&1 && \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$package >/dev/null 2>&1; }; }; } || \
	  echo "$$tool is not installed (apt-get install $$package): the tests that need it will be skipped"; \
	done

# About 10 minutes (the data-path rounds, 10 s per load cell, a 60 s idle measurement); `bench.py --quick` is shorter.
# `exec`: make's SIGTERM reaches bench.py itself, which stops everything it started.
bench: $(VENV)/.installed  ## side-by-side benchmarks, about 10 minutes (needs wrk; nginx is compared when present)
	$(VENV)/bin/python -m pip install -q -e '.[bench]'
	$(VENV)/bin/python bench/held_bodies.py && exec $(VENV)/bin/python bench/bench.py

# Not part of `make test`: needs root, Docker Engine and systemd-nspawn, and minutes. Each part
# skips with a message where a piece is missing; the README's "Integration" says what ran.
integration: $(VENV)/.installed  ## the shipped compose file and units under real Docker and systemd
	exec ./integration/run
