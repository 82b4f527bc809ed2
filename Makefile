# detox-sum: `make demo` sets up and runs the main job on the embedded tiny default; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0

.PHONY: setup tiny-models demo bench test clean

# torch goes in first, pinned, so nothing later pulls a CUDA build on a CPU machine.
setup: $(VENV)/.installed
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

tiny-models: setup
	$(PY) -m train.tiny_models

# The main job: LoRA SFT -> PPO -> evaluation (zero-shot base, SFT, PPO) and report, on the tiny offline default.
demo: tiny-models
	$(PY) -m eval.pipeline --config configs/tiny.yaml

# Stage benchmarks (generation, reward, PPO update, evaluation; 1 vs 2 processes), appended to bench/RESULTS.md.
bench: tiny-models
	$(PY) bench/run_all.py --append bench/RESULTS.md

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) artifacts runs
