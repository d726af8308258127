"""Peak memory of the lm-eval adapter's scoring: the float32 log-softmax of every target at once
against chunks of SCORED_ROWS targets (quamba.lm_eval_model), the scores compared bit for bit.

Perplexity scores every position of its windows, so a batch of 64 windows x 2048 tokens over a
50280-token vocabulary held 26 GB of float32 log-probabilities (and as much again for their
float32 copy of fp16 logits) on top of the 13 GB of logits. Each setting runs in a fresh process;
the figure is the growth of its peak resident memory over the loaded model (ru_maxrss), so run it
on the CPU.

    python -m bench.scoring_memory --arch mamba2-130m --layers 2 --batch-size 4 [--dtype float32]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.profiling import random_model_dir
from quamba.models.random_checkpoint import ARCHITECTURES

CORPUS = Path(__file__).resolve().parents[1] / "resources" / "corpus" / "test.txt"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def child(model_dir: Path, batch_size: int, max_length: int, rows: int, dtype: str) -> dict:
    """One setting in this process: scoring time, peak memory growth, a digest of the scores."""
    import torch
    from lm_eval.api.instance import Instance

    import quamba.lm_eval_model as adapter

    torch.set_num_threads(2)
    adapter.SCORED_ROWS = rows
    lm = adapter.QuambaLM(str(model_dir), batch_size=batch_size, device="cpu", max_length=max_length,
                          dtype=dtype, progress=False)
    text = CORPUS.read_text()
    requests = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    before = peak_mb()
    begun = time.perf_counter()
    scores = lm.loglikelihood_rolling(requests)
    seconds = time.perf_counter() - begun
    targets = len(lm.tok_encode(text))
    return {"scored_rows": rows, "targets": targets, "scoring_s": round(seconds, 2),
            "peak_growth_mb": round(peak_mb() - before), "scores_sha256": hashlib.sha256(
                json.dumps(scores).encode()).hexdigest()[:16]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="mamba2-130m")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--dtype", default="float16", help="the model's dtype (float16: as on a GPU, where the "
                        "log-softmax takes a float32 copy of the logits)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.batch_size, args.max_length, int(args.child[1]), args.dtype)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = random_model_dir(args.arch, args.layers, Path(tmp))
        rows = []
        for scored_rows in (10**9, 4096):  # 10**9: every target of a batch at once, as before
            out = subprocess.run([sys.executable, "-m", "bench.scoring_memory", "--child", str(model_dir),
                                  str(scored_rows), "--batch-size", str(args.batch_size),
                                  "--max-length", str(args.max_length), "--dtype", args.dtype],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps({"arch": args.arch, "layers": args.layers, "batch_size": args.batch_size,
                              **rows[-1]}), flush=True)
        whole, chunked = rows
        print(json.dumps({
            "dtype": args.dtype,
            "peak_growth_chunked_over_whole": round(chunked["peak_growth_mb"] / whole["peak_growth_mb"], 3),
            "time_chunked_over_whole": round(chunked["scoring_s"] / whole["scoring_s"], 3),
            "same_scores": chunked["scores_sha256"] == whole["scores_sha256"]}))


if __name__ == "__main__":
    main()
