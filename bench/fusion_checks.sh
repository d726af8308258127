#!/usr/bin/env bash
# The checks that decide whether what was written without a GPU may be switched on, as three device
# calls (after ../shared/gpu/README.md's two staging calls; each meant to fit the 600 s a call has):
#   bash bench/fusion_checks.sh OUT tests     the CUDA tests of the fused Hadamard rotation and the fused
#                                             observer statistics against the eager paths and of the
#                                             every-option model (now with a QuantEmbedding), then
#                                             bench.hadamard and bench.calibration at Quamba's setting
#                                             (batch 1, 512-token windows, 8 blocks), fused against eager
#   bash bench/fusion_checks.sh OUT compiled  the CUDA tests of compile_blocks (inductor compiles each model)
#   bash bench/fusion_checks.sh OUT models    mamba2-2.7b at 8 blocks: weight memory, prefill and decode of
#                                             FP16 and the quantized dirs, eager and with compiled blocks
# Run from the repo root; logs land in OUT.
set -uo pipefail
out=${1:-/tmp/fusion-checks}; part=${2:-tests}
mkdir -p "$out"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
if [ "$part" = tests ]; then
  python3 -m pytest -q -p no:cacheprovider -m cuda -s tests/test_cuda_calibration.py tests/test_cuda_quant.py \
      -k "(fused or every) and not compiled" 2>&1 | tee "$out/tests.log" | grep -E "relative diff|passed|failed|Error" | head -30
  python3 -m bench.hadamard --device cuda --shapes 1 8192 2>&1 | tee "$out/hadamard.log" | tail -3
  python3 -m bench.calibration --arch mamba2-2.7b --layers 8 --samples 32 --seq-len 512 --batch-size 1 \
      2>&1 | tee "$out/calibration.log" | tail -1
elif [ "$part" = compiled ]; then
  python3 -m pytest -q -p no:cacheprovider -m cuda -s tests/test_cuda_quant.py -k compiled 2>&1 \
      | tee "$out/compiled.log" | grep -E "relative diff|passed|failed|Error" | head -20
else
  BENCH_ARGS="--repeats 2 --compile" bash bench/realsize_quantized.sh mamba2-2.7b "$out/rs" cuda 8 2>&1 \
      | tee "$out/models.log" | grep -E "^\||device|failed|built"
fi
