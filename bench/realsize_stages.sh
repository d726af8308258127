#!/usr/bin/env bash
# Where the real-size stages spend their time, on one GPU (../shared/gpu/README.md stages the kernels):
#   1. the CUDA tests of the kernels, GPTQ (column loop as CUDA graphs = eager) and calibration's observers;
#   2. the gptq stage at mamba2-2.7b width (random weights, 4 blocks, Quamba's 128 x 1024 windows):
#      eager against CUDA-graph column loop, GPU busy share, byte-identical weights;
#   3. calibrate against a plain forward at mamba2-2.7b width, batch 1 (Quamba's) and 8, a torch profile;
#   4. the lm-eval adapter at mamba2-2.7b width against a plain forward at batch 8 and 64, a profile;
#   5. job start-up (bench/startup.sh).
# Run from the repo root: bash bench/realsize_stages.sh OUT_DIR [LAYERS]   (8 files in OUT_DIR)
set -uo pipefail
out=${1:?usage: bench/realsize_stages.sh OUT_DIR [LAYERS]}
layers=${2:-8}
mkdir -p "$out"
err="$out/stderr.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py tests/test_cuda_calibration.py \
    tests/test_cuda_quant.py -k "kernel or gptq or calibration or reservoir or histogram" -s 2>&1 \
    | grep -E "GPTQ|passed|failed|Error|assert" | tee "$out/tests.txt"
timeout 200 python3 -m bench.gptq --arch mamba2-2.7b --layers 4 --nsamples 128 --seqlen 1024 \
    > "$out/gptq_stage.json" 2>> "$err"; cat "$out/gptq_stage.json"
for batch in 1 8; do  # Quamba's calibration runs batch 1 (each window is one sample of its observers)
  timeout 150 python3 -m bench.calibration --arch mamba2-2.7b --layers "$layers" --samples 64 --seq-len 512 \
      --batch-size $batch $([ $batch = 1 ] && echo --profile) >> "$out/calibration.json" \
      2> "$out/calibration_profile.txt.$batch"
done
mv "$out/calibration_profile.txt.1" "$out/calibration_profile.txt"; cat "$out/calibration_profile.txt.8" >> "$err"
rm -f "$out/calibration_profile.txt.8"; cat "$out/calibration.json"
for batch in 8 64; do
  timeout 150 python3 -m bench.eval --arch mamba2-2.7b --layers "$layers" --repeats 1 --batch-size $batch \
      $([ $batch = 64 ] && echo --profile) >> "$out/eval.json" 2> "$out/eval_profile.txt.$batch"
done
mv "$out/eval_profile.txt.64" "$out/eval_profile.txt"; cat "$out"/eval_profile.txt.* >> "$err"
rm -f "$out"/eval_profile.txt.*; cat "$out/eval.json"

bash bench/startup.sh "$out/startup.txt" 2>> "$err"
