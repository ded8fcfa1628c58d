# `make demo`, `make test` and `make gpu-check` each create .venv (if needed), install the pinned
# requirements and the package, then run the demo, the test suite or the GPU check.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install clean-demo gpu-check

$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/wldm_demo --output demo_output

# two pytest-xdist workers of one torch thread each (a test file stays in one worker, so its module fixtures are
# built once): 10 min instead of 16 on this project's 2-core machine, where many tests wait on imports,
# subprocesses, elastix and files rather than on both cores
test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile tests

# every CUDA path once (training with AMP and torch.compile, torchrun/NCCL, whole-body prediction, sampler):
# gpu_check.json; GPU_CHECK_ARGS="--device cpu --quick" runs it on CPU at tiny sizes
gpu-check: $(VENV)/.installed
	$(PY) bench/gpu_check.py --out gpu_check.json $(GPU_CHECK_ARGS)

clean-demo:
	rm -rf demo_output
