# detox-sum: `make demo` sets up and runs the main job on the embedded tiny default; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0

.PHONY: setup tiny-models demo test clean

# torch goes in first, pinned, so nothing later pulls a CUDA build on a CPU machine.
setup: $(VENV)/.installed
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

tiny-models: setup
	$(PY) -m train.tiny_models

demo: tiny-models
	$(PY) -m eval.baseline --config configs/tiny.yaml

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) artifacts runs
