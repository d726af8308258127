#!/usr/bin/env bash
# Real-size quantized models from random weights of a real architecture, then bench.quantized_model
# (weight memory, prefill, batch-1 decode against FP16). Round-to-nearest weights (--no-gptq: the
# speed and memory of a layer do not depend on how its integers were found) and a small calibration.
#   bash bench/realsize_quantized.sh ARCH OUT_DIR DEVICE [N_LAYER]   (SKIP_BUILD=1: only the bench;
#   SKIP_BENCH=1: only the dirs)
# e.g. on the H200: bash bench/realsize_quantized.sh mamba2-2.7b /tmp/rs cuda
#      on a CPU, a smoke run: bash bench/realsize_quantized.sh mamba2-130m /tmp/rs cpu 2
set -euo pipefail  # the independent steps run side by side (wait fails on none: check the dirs)
arch=${1:-mamba2-2.7b}; out=${2:-/tmp/realsize}; device=${3:-cuda}; layers=${4:-}
q() { python3 -m quamba.cli "$@"; }
start=$SECONDS
if [ -z "${SKIP_BUILD:-}" ]; then  # SKIP_BUILD=1: bench the dirs an earlier run built in OUT_DIR
rm -rf "$out" && mkdir -p "$out"
q random-checkpoint "$arch" --out "$out/fp16" ${layers:+--layers "$layers"}
q calibrate "$out/fp16" --samples 8 --seq-len 256 --device "$device" --out "$out/calib"
q scales "$out/calib" --alpha 0.9995 --out "$out/scales.json"
for bits in 8 4; do q gptq "$out/fp16" --w-bits $bits --no-gptq --device "$device" --out "$out/g$bits" & done
wait
q quantize "$out/fp16" --gptq "$out/g8" --scheme w8a8 --calib "$out/calib" --scales "$out/scales.json" --out "$out/w8a8" &
q quantize "$out/fp16" --gptq "$out/g4" --scheme w4a8 --calib "$out/calib" --scales "$out/scales.json" --out "$out/w4a8" &
q quantize "$out/fp16" --gptq "$out/g4" --scheme w4a16 --out "$out/w4a16" &
# W8A8 as Quamba's eval.sh runs it: int8 embedding and lm_head as well
q quantize "$out/fp16" --gptq "$out/g8" --scheme w8a8 --calib "$out/calib" --scales "$out/scales.json" \
    --quantize-embedding --quantize-lm-head --out "$out/w8a8_evalsh" &
wait
echo "built in $((SECONDS - start)) s"
fi
[ -z "${SKIP_BENCH:-}" ] || exit 0
if [ "$device" = cpu ]; then shape="--prefill 2 64 --decode 8 --repeats 1"; else shape=${BENCH_ARGS:-}; fi
python3 -m bench.quantized_model --fp16 "$out/fp16" --quantized "$out/w8a8" "$out/w8a8_evalsh" "$out/w4a8" "$out/w4a16" \
    --device "$device" $shape --out "$out/quantized_model.json"
