#!/usr/bin/env bash
# On a CUDA machine holding this repo (no internet needed), in under 8 minutes:
#   bash bench/gpu.sh [OUT_DIR]
# 1. installs what the image lacks from wheels carried in bench/wheels/ (optional; fetch them on a
#    machine with a package index: pip download --no-deps bitsandbytes==0.50.2 -d bench/wheels,
#    41 MiB; the repo and wheels together must stay within the carry limit of 64 MiB);
# 2. runs the gpu-marked tests (loss on labelled positions with CUDA tensors, NF4 on CUDA equals
#    CPU bit for bit, LoRA dropout on CUDA as peft's), writing a JUnit XML;
# 3. runs bench/gpu_bench.py: LoRA / QLoRA bf16 train steps, peftkit vs peft (+ bitsandbytes),
#    and NF4 dequantisation GB/s, writing gpu.json.
# Needs torch, transformers and peft (and pytest); trl and datasets are not used here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-bench/results}}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
status=0

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: bench/gpu.sh needs a GPU')" || exit 2
if compgen -G "bench/wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-deps --no-index bench/wheels/*.whl || echo "carried wheels did not install: going on without them"
fi
"$PY" -m pip install -q --no-deps --no-index -e . 2>/dev/null || true  # peftkit itself, where pip allows; else PYTHONPATH
"$PY" -c "import pytest" 2>/dev/null || echo "pytest missing: the gpu tests are skipped (carry its wheel in bench/wheels/)"

if "$PY" -c "import pytest" 2>/dev/null; then
    timeout 180 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -o addopts="" \
        --junitxml="$OUT/gpu-tests.xml" || status=1
fi
timeout 300 "$PY" bench/gpu_bench.py --out "$OUT/gpu.json" || status=1
exit $status
