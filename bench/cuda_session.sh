#!/usr/bin/env bash
# The CUDA checks of one device session (../shared/gpu/README.md stages the kernels first):
#   1. the library's imports leave CUDA uninitialised, so the GPU lease's CUDA_VISIBLE_DEVICES counts;
#   2. the CUDA tests (kernels vs the reference, quantized models CUDA vs CPU, GPTQ run to run);
#   3. a `device: cuda` study through the workflow: every GPU job takes a GPU lease and logs its device.
# Run from the repo root on the GPU machine: bash bench/cuda_session.sh [OUT_DIR]
set -uo pipefail
out=${1:-/tmp/cuda-session}
mkdir -p "$out"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

python3 - <<'EOF'
import os
import quamba.gpu_lease, quamba.logs, quamba.stages.calibrate, quamba.stages.evaluate, quamba.stages.gptq  # noqa: F401
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # takes effect only if nothing has initialised CUDA yet
import torch
print("imports initialise CUDA:", torch.cuda.is_available())
EOF

python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py tests/test_cuda_quant.py -s 2>&1 | tee "$out/cuda_tests.log" | grep -E "relative diff|byte-identical|passed|failed|Error" | head -40

work=$(mktemp -d)
ln -s "$(pwd)/resources" "$work/resources"
cat > "$work/study.yaml" <<'EOF'
device: cuda
models:
  mamba1-demo: {source: resources/models/mamba1-demo}
  mamba2-demo: {source: resources/models/mamba2-demo}
calibrations:
  default: {samples: 32, seq_len: 256}
quantization: {calibration: default, schemes: [w8a8, w4a16], alphas: [0.9995, 1.0], seeds: [0]}
gptq: {nsamples: 8, seqlen: 128}
tasks: [perplexity]
eval: {batch_size: 8, perplexity_tokens: 2048}
EOF
start=$SECONDS
(cd "$work" && python3 -m snakemake --snakefile "$OLDPWD/Snakefile" --cores 8 --resources gpu=1 \
    --configfile study.yaml --quiet rules > "$out/study.log" 2>&1)
echo "cuda study: rc=$? in $((SECONDS - start)) s"
grep -h "GPU lease" -r "$work/logs" | sed 's/^[0-9-]* [0-9:,]* //' | sort | uniq -c | head
cp "$work/results/summary/aggregate.csv" "$out/" 2>/dev/null
python3 -m quamba.cli compare "$work/results" --task perplexity 2>&1 | tail -8
