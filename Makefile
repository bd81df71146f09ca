# WhisperHub: `make run` starts everything, `make test` passes the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: run test install install-test system-deps system-deps-test bench clean-var

run: install
	$(PY) scripts/run.py

test: install-test
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install-test
	$(PY) bench/run_all.py

install: system-deps $(VENV)/.installed
install-test: system-deps-test $(VENV)/.installed-test

system-deps:
	@scripts/install_system.sh run

system-deps-test:
	@scripts/install_system.sh test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Installs only when a requirements file changed since the last install.
$(VENV)/.installed: requirements.txt | $(VENV)/bin/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	touch $@

$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed
	$(PIP) install -q -r requirements-test.txt
	touch $@

# Stops nothing: removes the embedded database, uploads and models. Ask twice.
clean-var:
	@read -p "Delete var/ (database, uploads, models)? [y/N] " a && [ "$$a" = y ] && rm -rf var
