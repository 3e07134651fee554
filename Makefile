# Set-up is implicit: every target creates or reuses the local virtual environment .venv and installs
# into it exactly the locked versions of lock/requirements.txt (hashes checked). The stamp is rebuilt
# when pyproject.toml or the lock change. `make lock` refreshes the lock; `make compat` runs the
# capture, analyze and routing tests on the newest releases and on the oldest supported transformers.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.usmoe-lp-installed
LOCK   := lock/requirements.txt
UV     := $(BIN)/uv
# Where a torch 2.13.0+cpu wheel lies on disk (the project machines carry one). Elsewhere the locked
# CPU wheel comes from the PyTorch CPU index.
TORCH_WHEELS ?= /opt/wheels
TORCH_SOURCE := $(if $(wildcard $(TORCH_WHEELS)/torch-2.13.0*),--find-links $(TORCH_WHEELS),--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
UV_PIP  = $(UV) pip install --python $(1)/bin/python -q $(TORCH_SOURCE)
LOCK_ARGS := --python-version 3.11 --python-platform x86_64-manylinux_2_28 --constraint lock/constraints.in

.PHONY: demo test lint bench lock compat clean-venv report-check

$(UV): lock/uv.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q --require-hashes --no-deps -r lock/uv.txt
	touch $(UV)

$(STAMP): pyproject.toml $(LOCK) $(UV)
	$(call UV_PIP,$(VENV)) --require-hashes -r $(LOCK)
	$(call UV_PIP,$(VENV)) --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)          ## the main job on the embedded default
	$(BIN)/usmoe-lp demo --out out/demo

# Every report.html under out/ rendered at 1280 px in headless Chromium (apt-get install chromium): screenshots in
# out/report-check/, and a non-zero exit naming each problem (overflow, raw Markdown, images, broken links).
report-check: $(STAMP)  ## render and check every report under out/ (builds out/demo when missing)
	test -f out/demo/report.html || $(BIN)/usmoe-lp demo --out out/demo
	$(BIN)/python tools/report_check.py out --shots out/report-check

test: $(STAMP)          ## the whole test suite (doctests and notebooks included)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check usmoe_lp tests benchmarks

bench: $(STAMP)         ## performance benchmarks (on demand, never in CI)
	$(BIN)/python benchmarks/run_all.py

lock: $(UV)             ## re-resolve pyproject.toml (with the dev extra) to exact versions and hashes
	$(UV) pip compile pyproject.toml --extra dev $(LOCK_ARGS) --find-links $(TORCH_WHEELS) --generate-hashes \
		--upgrade --no-header -q -o $(LOCK)

# The capture, analyze and routing tests on (1) the newest release of every dependency and (2) the
# oldest transformers that pyproject.toml admits, each in an environment of its own.
COMPAT_TESTS := tests/test_capture*.py tests/test_analyze.py tests/test_diag_*.py tests/test_routing_*.py \
	tests/test_logs_*.py
compat: $(UV)           ## newest releases and the oldest supported transformers
	bash tools/compat.sh "$(UV)" "$(PYTHON)" "$(TORCH_SOURCE)" $(COMPAT_TESTS)

clean-venv:
	rm -rf $(VENV) .venv-compat-*
