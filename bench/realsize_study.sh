#!/usr/bin/env bash
# The four-run study of configs/realsize.yaml on one GPU, timed (issue 16's end-to-end figures):
# the cold run's wall time, the GPU's busy share (nvidia-smi once a second), the per-rule breakdown
# from the jobs' benchmarks/ files, and a no-op rerun. ../shared/gpu/README.md stages the kernels.
#   bash bench/realsize_study.sh OUT_DIR [CONFIG] [TIME_LIMIT_S] [SNAKEMAKE_ARGS...]
#   (defaults: configs/realsize.yaml, 540 s, --cores 16 --resources gpu=JOBS_PER_GPU)
# The study is the seed note's four runs: the config's seeds become STUDY_SEEDS (default [0]; "keep"
# leaves them), and JOBS_PER_GPU (default 1) GPU jobs share the one GPU (the config's jobs_per_gpu).
# Past the time limit the run is stopped; the breakdown then shows the jobs that finished.
# STUDY_WORK=DIR keeps the study in DIR; a second call with the same DIR (a device call is at most
# 600 s) resumes a stopped run (--rerun-incomplete) and reports the wall time of both parts.
set -uo pipefail
out=${1:?usage: bench/realsize_study.sh OUT_DIR [CONFIG] [TIME_LIMIT_S] [SNAKEMAKE_ARGS...]}
config=${2:-configs/realsize.yaml}; limit=${3:-540}
shift $(( $# < 3 ? $# : 3 ))
jobs=${JOBS_PER_GPU:-1}; seeds=${STUDY_SEEDS:-[0]}
args=("$@"); [ ${#args[@]} -gt 0 ] || args=(--cores 16 --resources gpu="$jobs")
repo=$(pwd); work=${STUDY_WORK:-$(mktemp -d)}
mkdir -p "$out" "$work"
earlier=0
if [ -f "$work/study.yaml" ]; then  # resuming: the wall time of the parts before this one
  earlier=$(cat "$work/wall_s" 2>/dev/null || echo 0)
  (cd "$work" && python3 -m snakemake --snakefile "$repo/Snakefile" --configfile study.yaml --unlock -q) > /dev/null 2>&1
else
  ln -s "$repo/resources" "$work/resources"
  python3 - "$config" "$work/study.yaml" "$seeds" "$jobs" <<'EOF'
import sys, yaml
source, target, seeds, jobs = sys.argv[1:]
study = yaml.safe_load(open(source))
if seeds != "keep":
    study["quantization"]["seeds"] = yaml.safe_load(seeds)
study["jobs_per_gpu"] = int(jobs)
yaml.safe_dump(study, open(target, "w"), sort_keys=False)
EOF
fi
now() { python3 -c "import time; print(time.time())"; }
since() { python3 -c "import time; print(round(time.time() - $1, 1))"; }
study() { (cd "$work" && timeout -s INT -k 30 "$limit" python3 -m snakemake --snakefile "$repo/Snakefile" "${args[@]}" \
    --configfile study.yaml --rerun-incomplete --quiet rules); }

if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 >> "$work/gpu.csv" &
  sampler=$!
fi
start=$(now)
study > "$out/study.log" 2>&1
rc=$?
part=$(since "$start")
total=$(python3 -c "print(round($earlier + $part, 1))"); echo "$total" > "$work/wall_s"
echo "cold run: rc=$rc (124: stopped at the $limit s limit) in $part s; with the earlier parts $total s"
[ -n "${sampler:-}" ] && kill "$sampler" 2>/dev/null
cp "$work/gpu.csv" "$out/" 2>/dev/null
python3 - "$work/benchmarks" "$work/gpu.csv" <<'EOF' | tee "$out/breakdown.txt"
import collections, csv, pathlib, sys

seconds = collections.defaultdict(list)
for tsv in pathlib.Path(sys.argv[1]).rglob("*.tsv"):
    with tsv.open() as f:
        row = next(csv.DictReader(f, delimiter="\t"), None)
    if row:
        seconds[tsv.stem].append(float(row["s"]))
print("| job (benchmark file) | jobs | total s | longest s |")
print("| --- | --- | --- | --- |")
for name, values in sorted(seconds.items(), key=lambda kv: -sum(kv[1])):
    print(f"| {name} | {len(values)} | {sum(values):.1f} | {max(values):.1f} |")
gpu = pathlib.Path(sys.argv[2])
busy = [float(r[1]) for r in csv.reader(gpu.open()) if len(r) > 2] if gpu.is_file() else []
if busy:
    print(f"GPU busy: mean {sum(busy) / len(busy):.0f}% over {len(busy)} one-second samples, "
          f"0% in {sum(b == 0 for b in busy)} of them")
EOF
if [ "$rc" = 0 ]; then
  start=$(now)
  study > "$out/noop.log" 2>&1
  echo "no-op rerun: rc=$? in $(since "$start") s"
fi
cp "$work/study.yaml" "$out/"; cp -r "$work/logs" "$out/" 2>/dev/null
cp "$work/results/summary/aggregate.csv" "$out/" 2>/dev/null
true
