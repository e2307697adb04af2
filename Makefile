# The two fresh-machine entry points (see README): `make quickstart` and `make test`.
# Both create .venv on first use. The CPU build of torch is installed first so that
# resolving the other requirements never pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: setup quickstart test lint clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev,tasks]'
	touch $@

setup: $(BIN)/.installed

quickstart: setup
	$(BIN)/ptqscale-run --multirun +sweep=quickstart
	$(BIN)/ptqscale-report --results results --study quickstart

test: setup
	$(BIN)/ruff check src analysis tests bench
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check src analysis tests bench

clean:
	rm -rf $(VENV) outputs multirun
