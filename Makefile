# featurewire developer entry points. Every target creates .venv when it is missing.
# torch is installed pinned FIRST: an unpinned torch resolved by pip would pull a CUDA build.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: venv test lint demo bench hookpoints clean-venv

venv: $(STAMP)

# Re-runs only when the dependency lists change; `make test` is fast when .venv is current.
$(STAMP): pyproject.toml clients/python/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]' -e clients/python
	@touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m service demo

hookpoints: $(STAMP)
	$(PY) -m service hookpoints --model default

bench: $(STAMP)
	$(PY) bench/hook_overhead.py
	$(PY) bench/train_throughput.py

clean-venv:
	rm -rf $(VENV)
