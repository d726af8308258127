"""Assembly time: the weights a GPTQ dir replaces left unrotated (the default) against rotating
every weight first, as before 2026-12-07; the two dirs compared byte for byte. Same process,
alternating, best of --repeats.

Any FP16, calibration and GPTQ dirs of one model, e.g. mamba2-2.7b's widths at 16 blocks:
    quamba random-checkpoint mamba2-2.7b --layers 16 --out fp16
    quamba calibrate fp16 --samples 2 --seq-len 64 --device cpu --out calib
    quamba gptq fp16 --w-bits 8 --nsamples 1 --seqlen 64 --device cpu --out gptq
    python -m bench.assembly fp16 calib gptq --threads 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import quamba.stages.assemble as assemble
from quamba.recipe import Recipe
from quamba.stages.scales import scales_file

FILES = ("model.safetensors", "quant_config.json", "config.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fp16", type=Path)
    parser.add_argument("calib", type=Path)
    parser.add_argument("gptq", type=Path)
    parser.add_argument("--scheme", default="w8a8")
    parser.add_argument("--threads", type=int, default=4, help="the assemble rule's threads")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    skipping = assemble.gptq_replaced
    settings = {"skipped": skipping, "everything": lambda *_: frozenset()}
    best = dict.fromkeys(settings, float("inf"))
    with tempfile.TemporaryDirectory() as tmp:
        scales = Path(tmp) / "scales.json"
        scales_file(args.calib, 0.9995, scales)
        for _ in range(args.repeats):
            for name, replaced in settings.items():
                assemble.gptq_replaced = replaced
                begun = time.perf_counter()
                assemble.quantize_model_dir(args.fp16, Path(tmp) / name, args.gptq, args.scheme, Recipe(),
                                            args.calib, scales)
                best[name] = min(best[name], time.perf_counter() - begun)
        assemble.gptq_replaced = skipping
        same = all((Path(tmp) / "skipped" / f).read_bytes() == (Path(tmp) / "everything" / f).read_bytes()
                   for f in FILES)
    print(json.dumps({"fp16": str(args.fp16), "scheme": args.scheme, "threads": args.threads,
                      "rotate_everything_s": round(best["everything"], 2), "skip_replaced_s": round(best["skipped"], 2),
                      "speedup": round(best["everything"] / best["skipped"], 2), "same_files": same}))


if __name__ == "__main__":
    main()
