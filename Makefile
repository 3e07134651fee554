# Set-up is implicit: every target creates or reuses the local virtual environment .venv.
# The stamp is rebuilt when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.usmoe-lp-installed
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test lint bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)          ## the main job on the embedded default
	$(BIN)/usmoe-lp demo --out out/demo

test: $(STAMP)          ## the whole test suite (doctests and notebooks included)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check usmoe_lp tests benchmarks

bench: $(STAMP)         ## performance benchmarks (on demand, never in CI)
	$(BIN)/python benchmarks/run_all.py

clean-venv:
	rm -rf $(VENV)
