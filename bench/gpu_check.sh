#!/bin/sh
# One command for a fresh machine with one NVIDIA GPU and this repository (`sh bench/gpu_check.sh` or
# `make gpu-check`), in under ten minutes:
#   1. set up .venv through make, with the CUDA build of torch (only when nvidia-smi lists a GPU);
#   2. run the tests marked `gpu` (they skip without CUDA);
#   3. print the serving, concurrency and training-speed ratios on the GPU in bf16 (bench/serve_overhead.py,
#      bench/concurrency.py, bench/train_throughput.py; the default model with a random TopK stack, so nothing
#      has to be trained first).
# On a machine without a GPU it never installs a CUDA torch: it creates .venv the usual way when missing, runs the
# gpu tests (all skip), checks that the benchmarks still take --device/--dtype and says it skipped the GPU parts.
# Environment:
#   GPU_CHECK_SKIP_SETUP=1   use .venv as it is (no make, no pip)
#   GPU_CHECK_FORCE_CPU=1    behave as on a machine without a GPU (hides any GPU from torch too)
#   GPU_CHECK_TORCH_INDEX    where the CUDA torch comes from (default PyPI, whose Linux x86_64 torch wheels are CUDA
#                            builds); e.g. https://download.pytorch.org/whl/cu128 for a specific CUDA
set -eu
cd "$(dirname "$0")/.."
PY=.venv/bin/python
TORCH_PIN=$(sed -n 's/^TORCH *:= *//p' Makefile)
INDEX=${GPU_CHECK_TORCH_INDEX:-https://pypi.org/simple}
started=$(date +%s)

say() { printf '\n== %s (%ss)\n' "$1" "$(($(date +%s) - started))"; }

gpu=no
if [ "${GPU_CHECK_FORCE_CPU:-0}" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # torch sees no GPU either
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    gpu=yes
fi
say "GPU present: $gpu"
if [ "$gpu" = yes ]; then nvidia-smi -L; fi

if [ "${GPU_CHECK_SKIP_SETUP:-0}" = 1 ]; then
    say "setup skipped (GPU_CHECK_SKIP_SETUP=1)"
    [ -x "$PY" ] || { echo "no .venv: run without GPU_CHECK_SKIP_SETUP" >&2; exit 1; }
elif [ "$gpu" = yes ]; then
    say "setup: .venv with the CUDA build of $TORCH_PIN"
    [ -x "$PY" ] || python3 -m venv .venv
    if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
        "$PY" -m pip install --quiet --disable-pip-version-check --force-reinstall --index-url "$INDEX" "$TORCH_PIN"
    fi
    make venv  # the pinned torch is already satisfied, so make keeps the CUDA build
else
    say "setup: no GPU, so no CUDA torch; make venv only if .venv is missing"
    [ -x "$PY" ] || make venv
fi

cuda=$("$PY" -c 'import torch; print("yes" if torch.cuda.is_available() else "no")')
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "available:", torch.cuda.is_available())'
if [ "$gpu" = yes ] && [ "$cuda" != yes ]; then
    echo "FAILED: nvidia-smi lists a GPU but torch in .venv cannot use it (driver/CUDA mismatch?)" >&2
    exit 1
fi

gpu_tests=$(grep -rl 'pytest.mark.gpu' tests --include='*.py' | sort | tr '\n' ' ')
say "tests marked gpu: $gpu_tests"
# shellcheck disable=SC2086  # one argument per file
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu $gpu_tests

if [ "$cuda" != yes ]; then
    for script in serve_overhead concurrency train_throughput; do  # the flags the GPU run passes are still there
        grep -q '"--device"' "bench/$script.py" && grep -q '"--dtype"' "bench/$script.py" || {
            echo "FAILED: bench/$script.py lost its --device/--dtype flags" >&2; exit 1; }
    done
    say "GPU parts skipped: no CUDA device (serving, concurrency and training ratios on the GPU not run)"
    exit 0
fi

say "serving overhead on the GPU, bf16 (Gemma 3 270M, random TopK stack)"
timeout 180 "$PY" bench/serve_overhead.py --model default --stack random --device cuda --dtype bfloat16 --repeats 5
say "concurrency on the GPU, bf16"
timeout 180 "$PY" bench/concurrency.py --model default --stack random --device cuda --dtype bfloat16 --levels 1,2,4,8,16
say "training throughput on the GPU, bf16"
timeout 120 "$PY" bench/train_throughput.py --device cuda --dtype bfloat16 --steps 20 --repeats 3
say "done: GPU checks passed"
