# `make demo` and `make test` each create .venv (if needed), install the pinned
# requirements and the package, then run the demo or the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install clean-demo

$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/wldm_demo --output demo_output

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf demo_output
