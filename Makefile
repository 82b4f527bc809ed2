# detox-sum: `make demo` sets up and runs the main job on the embedded tiny default; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0

.PHONY: setup constraints tiny-models demo bench test test-extended clean

# torch goes in first, pinned, so nothing later pulls a CUDA build on a CPU machine; then the project with the exact
# tested set of every package (constraints.txt) inside the ranges setup.cfg declares.
setup: $(VENV)/.installed
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

# Re-pin constraints.txt after changing setup.cfg: the newest versions in range, in a scratch venv. Then run the tests.
constraints:
	rm -rf .venv-pin
	$(PYTHON) -m venv .venv-pin
	.venv-pin/bin/python -m pip install --quiet torch==$(TORCH_VERSION)
	.venv-pin/bin/python -m pip install --quiet -e ".[dev]"
	{ echo "# The exact set the tests ran with (make constraints; Python 3.11, torch $(TORCH_VERSION) CPU build)."; \
	  .venv-pin/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt
	rm -rf .venv-pin

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

# The variants left out of `make test` to keep it short (more backends x process counts; see tests/helpers.py EXTENDED).
test-extended: setup
	$(PY) -m pytest -q -m extended

clean:
	rm -rf $(VENV) artifacts runs
