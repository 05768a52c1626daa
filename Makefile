# featurewire developer entry points. Every target creates .venv when it is missing.
# torch is installed pinned FIRST: an unpinned torch resolved by pip would pull a CUDA build.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: venv test lint demo demo-stack tour bench hookpoints protos clean-venv

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

# The demo stack is built once (about 15 minutes on 2 CPU cores) and reused; delete runs/demo to rebuild it.
DEMO_STACK := runs/demo/stack/stack.json

$(DEMO_STACK): | $(STAMP)
	$(VENV)/bin/featurewire-train train --config trainer/configs/demo.toml --out runs/demo

demo-stack: $(DEMO_STACK)

demo: $(DEMO_STACK)
	$(PY) -m service demo --model default --stack runs/demo/stack

tour: $(STAMP)
	$(PY) -m service tour

hookpoints: $(STAMP)
	$(PY) -m service hookpoints --model default

bench: $(DEMO_STACK)
	$(PY) bench/hook_overhead.py
	$(PY) bench/train_throughput.py
	$(PY) bench/serve_overhead.py --stack runs/demo/stack

# The API's generated Python code is committed into the client package; tests/clients/test_protos.py
# regenerates it with these same flags and diffs. Only featurewire.proto defines a service.
PROTO_OUT := clients/python
PROTO_GEN := $(PROTO_OUT)/featurewire/v1

protos: $(STAMP)
	rm -f $(PROTO_GEN)/*_pb2.py $(PROTO_GEN)/*_pb2.pyi $(PROTO_GEN)/*_pb2_grpc.py
	$(PY) -m grpc_tools.protoc -I protos --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		$(sort $(wildcard protos/featurewire/v1/*.proto))
	$(PY) -m grpc_tools.protoc -I protos --grpc_python_out=$(PROTO_OUT) protos/featurewire/v1/featurewire.proto

clean-venv:
	rm -rf $(VENV)
