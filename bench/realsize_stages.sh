#!/usr/bin/env bash
# Where the real-size stages spend their time, on one GPU (../shared/gpu/README.md stages the kernels):
#   1. GPTQ's CUDA tests (the column loop as CUDA graphs equals the eager loop, run to run identity);
#   2. the gptq stage at mamba2-2.7b width (random weights, a few blocks, Quamba's 128 x 1024 windows):
#      eager against CUDA-graph column loop, GPU busy share, byte-identical weights;
#   3. calibrate against a plain forward at mamba2-2.7b width, with a torch profile;
#   4. the lm-eval adapter at mamba2-2.7b width against a plain forward, with a torch profile;
#   5. job start-up: a small `device: cuda` study; every job's "start-up" log line and wall time.
# Run from the repo root: bash bench/realsize_stages.sh OUT_DIR [LAYERS]
set -uo pipefail
out=${1:?usage: bench/realsize_stages.sh OUT_DIR [LAYERS]}
layers=${2:-8}
mkdir -p "$out"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

timeout 120 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda_quant.py -k gptq -s 2>&1 \
    | grep -E "GPTQ|passed|failed|Error" | tee "$out/gptq_tests.txt"
timeout 200 python3 -m bench.gptq --arch mamba2-2.7b --layers 4 --nsamples 128 --seqlen 1024 \
    > "$out/gptq_stage.json" 2> "$out/gptq_stage.err"; tail -2 "$out/gptq_stage.json" "$out/gptq_stage.err"
timeout 150 python3 -m bench.calibration --arch mamba2-2.7b --layers "$layers" --samples 64 --seq-len 512 \
    --profile > "$out/calibration.json" 2> "$out/calibration_profile.txt"; cat "$out/calibration.json"
timeout 150 python3 -m bench.eval --arch mamba2-2.7b --layers "$layers" --repeats 1 --profile \
    > "$out/eval.json" 2> "$out/eval_profile.txt"; cat "$out/eval.json"

work=$(mktemp -d)
ln -s "$(pwd)/resources" "$work/resources"
cat > "$work/study.yaml" <<'YAML'
device: cuda
models:
  mamba2-demo: {source: resources/models/mamba2-demo}
calibrations:
  default: {samples: 32, seq_len: 256}
quantization: {calibration: default, schemes: [w8a8], alphas: [1.0], seeds: [0]}
gptq: {nsamples: 8, seqlen: 128}
tasks: [perplexity]
eval: {batch_size: 8, perplexity_tokens: 2048}
YAML
start=$SECONDS
(cd "$work" && timeout 150 python3 -m snakemake --snakefile "$OLDPWD/Snakefile" --cores 8 --resources gpu=1 \
    --configfile study.yaml --quiet rules > "$out/study.log" 2>&1)
echo "cuda study: rc=$? in $((SECONDS - start)) s"
grep -H "start-up\|job done" -r "$work/logs" | sed "s|$work/logs/||" | tee "$out/startup.txt"
