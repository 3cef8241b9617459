# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

.PHONY: demo test bench
demo: $(VENV)/.installed   ## the simulator with autosleepd in front: a sleep and a wake in seconds
	$(VENV)/bin/autosleepd demo

test: $(VENV)/.installed   ## the whole test suite
	$(VENV)/bin/python -m pytest

bench: $(VENV)/.installed  ## side-by-side benchmarks (needs wrk; nginx is compared when present)
	$(VENV)/bin/python -m pip install -q -e '.[bench]'
	$(VENV)/bin/python bench/bench.py
	$(VENV)/bin/python bench/held_bodies.py
