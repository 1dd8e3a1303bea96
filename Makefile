# `make demo` and `make test` set everything up on a fresh machine (a venv with pinned versions).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -n 2 --dist loadfile
DEMO_ARGS ?=

.PHONY: test demo install clean

install: $(STAMP)

$(STAMP): setup.py requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(PY) -m experiments.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
