#!/usr/bin/env bash
# The checks that decide whether the fusions written without a GPU may be switched on, in one
# device call (after ../shared/gpu/README.md's two staging calls; about 6 minutes on an H200):
#   1. their CUDA tests: the fused Hadamard rotation and the fused observer statistics against
#      the eager paths, and the every-option model (now with a QuantEmbedding) on CUDA and as a graph;
#   2. their benchmarks, each fused against eager in one process: bench.hadamard at mamba2-2.7b's
#      width, bench.calibration at Quamba's setting (batch 1, 512-token windows, 8 blocks).
# Run from the repo root: bash bench/fusion_checks.sh [OUT_DIR]   (logs land in OUT_DIR)
set -uo pipefail
out=${1:-/tmp/fusion-checks}
mkdir -p "$out"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider -m cuda -s tests/test_cuda_calibration.py \
    tests/test_cuda_quant.py -k "fused or every" 2>&1 | tee "$out/tests.log" \
    | grep -E "relative diff|passed|failed|Error" | head -20
python3 -m bench.hadamard --device cuda --shapes 1 8192 2>&1 | tee "$out/hadamard.log" | tail -3
python3 -m bench.calibration --arch mamba2-2.7b --layers 8 --samples 32 --seq-len 512 --batch-size 1 \
    2>&1 | tee "$out/calibration.log" | tail -1
