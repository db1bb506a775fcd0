#!/usr/bin/env bash
# The vLLM connector's checks that need a GPU, as one script for a machine that has one.
#
#   OUT=/some/dir tools/gpu_check.sh
#
# 1. The block-layout tests (FLASH_ATTN / FLASHINFER / TRITON_ATTN logical layouts in every
#    physical order, tensor-parallel head shares) with the paged caches built on the GPU
#    (CWM_TEST_DEVICE=cuda): gather and scatter between host chunks and device blocks, bit
#    for bit.
# 2. tools/bench/gpu_layouts.py: a 16k-token window at Llama-3.1-8B's KV geometry (2 GiB)
#    scattered into a FLASH_ATTN-shaped cache on the GPU and gathered back, pageable and
#    pinned host memory, with the rates (JSON in $OUT/gpu_layouts.json).
#
# Not here: the connector inside a running vLLM on the GPU. vLLM's CUDA build is not on the
# lent machines' image and its wheels are far larger than what can be carried to one (no
# network there), and the end-to-end tests are written for the CPU build (128-token blocks,
# cores pinned per server).
#
# Needs python3 with torch (CUDA) and pytest; nothing else of cwm's dependencies, so it
# runs on the lent H200 machines' stock image (tests run with --noconftest for that reason).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/cwm-gpu-check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

python3 - <<'PY' | tee "$OUT/device.txt" || exit 2
import torch
assert torch.cuda.is_available(), "no CUDA device"
print(torch.__version__, torch.cuda.get_device_name())
PY

echo "== layout tests on cuda"
CWM_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider --noconftest \
    tests/agent/engines/vllm/test_layout.py tests/agent/engines/vllm/test_parallel.py \
    tests/agent/engines/vllm/test_backends.py 2>&1 | tee "$OUT/layout_tests.txt" || status=1

echo "== gather/scatter at 8B geometry"
python3 tools/bench/gpu_layouts.py --tokens 16384 --json "$OUT/gpu_layouts.json" \
    2>&1 | tee "$OUT/gpu_layouts.txt" || status=1

exit $status
