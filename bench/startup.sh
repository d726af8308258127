#!/usr/bin/env bash
# Job start-up on a GPU box: import times of torch and the stages, the slowest imports, and three jobs
# of a small `device: cuda` study (normalize, calibrate, evaluate) with their "start-up: X s" lines.
# Run from the repo root: bash bench/startup.sh LOG_FILE   (the lines are also printed)
set -uo pipefail
log=${1:?usage: bench/startup.sh LOG_FILE}
: > "$log"
for module in torch quamba.stages.calibrate quamba.stages.evaluate; do
  /usr/bin/time -f "import $module: %e s" python3 -c "import $module" 2>&1 | tail -1 | tee -a "$log"
done
python3 -X importtime -c "import quamba.stages.evaluate" 2>&1 | sort -t'|' -k2 -n | tail -25 >> "$log"
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
(cd "$work" && timeout 120 python3 -m snakemake results/mamba2-demo/fp16/eval/perplexity.json \
    results/mamba2-demo/calib/default/stats.json --snakefile "$OLDPWD/Snakefile" --cores 8 --resources gpu=1 \
    --configfile study.yaml --quiet rules 1>&2)  # targets first: --quiet takes several values
echo "cuda study (3 jobs): rc=$? in $((SECONDS - start)) s" | tee -a "$log"
grep -H "start-up\|job done" -r "$work/logs" | sed "s|$work/logs/||" | tee -a "$log"
