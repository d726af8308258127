#!/usr/bin/env bash
# The checks that decide whether what was written without a GPU may be switched on, as device calls
# (after ../shared/gpu/README.md's two staging calls; each meant to fit the 600 s a call has):
#   bash bench/fusion_checks.sh OUT tests     the CUDA tests of the fused paths (Hadamard, quantized Hadamard,
#                                             quantizers, observer statistics) and of the every-option model,
#                                             then bench.hadamard and bench.calibration at Quamba's setting
#                                             (batch 1, 512-token windows), fused against eager. Run on
#                                             2026-12-03 with the dirs built beside it: 4 tests in 200 s
#                                             (bench/README.md); alone it needs most of a call
#   bash bench/fusion_checks.sh OUT compiled  the CUDA tests of compile_blocks (inductor compiles each model;
#                                             W8A8 through the quamba::int8_matmul operator, not yet run)
#   bash bench/fusion_checks.sh OUT models    mamba2-2.7b at 8 blocks: weight memory, prefill and decode of
#                                             FP16, W8A8 and W4A16, eager and with compiled blocks (rows
#                                             stream to models.log as they are measured)
# Run from the repo root; logs land in OUT.
set -uo pipefail
out=${1:-/tmp/fusion-checks}; part=${2:-tests}
mkdir -p "$out"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
if [ "$part" = tests ]; then
  python3 -m pytest -v -p no:cacheprovider -m cuda -s tests/test_cuda_calibration.py tests/test_cuda_quant.py \
      -k "(fused or every) and not compiled" 2>&1 | tee "$out/tests.log" | grep -E "relative diff|PASSED|FAILED|ERROR|passed|failed"
  python3 -m bench.hadamard --device cuda --shapes 1 8192 2>&1 | tee "$out/hadamard.log" | tail -3
  python3 -m bench.calibration --arch mamba2-2.7b --layers 8 --samples 32 --seq-len 512 --batch-size 1 \
      2>&1 | tee "$out/calibration.log" | tail -1
elif [ "$part" = compiled ]; then
  python3 -m pytest -v -p no:cacheprovider -m cuda -s tests/test_cuda_quant.py -k compiled 2>&1 \
      | tee "$out/compiled.log" | grep -E "relative diff|PASSED|FAILED|ERROR|passed|failed"
else
  SKIP_BENCH=1 bash bench/realsize_quantized.sh mamba2-2.7b /tmp/rs cuda 8 > "$out/build.log" 2>&1
  python3 -m bench.quantized_model --fp16 /tmp/rs/fp16 --quantized /tmp/rs/w8a8 /tmp/rs/w4a16 --device cuda \
      --repeats 2 --compile --no-unfused --out "$out/models.json" 2>&1 | tee "$out/models.log" \
      | grep -E "^\||^\{|device|failed"
fi
