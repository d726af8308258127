"""Which of Quamba's choices move the numbers: W8A8 held-out perplexity of both demo models at alpha
0.9995 and 1.0 under the quamba recipe, then with each recipe option flipped alone, with the spread
over GPTQ seeds beside it. One Snakemake study per variant, each in its own workdir.

    python -m bench.recipe_options --out /tmp/recipe-bench            # CPU: about 4 min a variant
    python -m bench.recipe_options --out DIR --variants quamba alpha_one=stream_max
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> the recipe options it flips (the demo widths are powers of two: hadamard changes nothing)
    "quamba": {},
    "alpha_one=stream_max": {"alpha_one": "stream_max"},
    "rotate_residual=false": {"rotate_residual": False},
    "calibration_data=packed": {"calibration_data": "packed"},
    "calibration_order=seeded": {"calibration_order": "seeded"},
    "reorder=true": {"reorder": True},  # Quamba2 (Mamba2 only; the Mamba1 rows equal quamba's)
    "reorder=true,reorder_method=absmax_kmeans1d": {"reorder": True, "reorder_method": "absmax_kmeans1d"},
    "module_coverage=projections": {"module_coverage": "projections"},  # the project's earlier, lighter W8A8
    "quantize_embedding=true,quantize_lm_head=true": {"quantize_embedding": True, "quantize_lm_head": True},  # eval.sh
}


def study(options: dict, seeds: list[int], tokens: int | None) -> dict:
    """The default study's models and calibration, W8A8 only, perplexity only."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["recipe"] = {"name": "quamba", **options}
    config["quantization"].update(schemes=["w8a8"], alphas=[0.9995, 1.0], seeds=seeds)
    config["tasks"] = ["perplexity"]
    config["eval"] = {"batch_size": 8, "limit": None, "perplexity_tokens": tokens}
    return config


def run(name: str, options: dict, root: Path, seeds: list[int], tokens: int | None, cores: int) -> pd.DataFrame:
    workdir = root / name.replace("=", "-")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "resources").unlink(missing_ok=True)
    (workdir / "resources").symlink_to(REPO / "resources")
    (workdir / "study.yaml").write_text(yaml.safe_dump(study(options, seeds, tokens)))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", str(cores),
                    "--configfile", "study.yaml", "--quiet"], cwd=workdir, check=True)
    print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    aggregate = pd.read_csv(workdir / "results" / "summary" / "aggregate.csv")
    rows = aggregate[aggregate.metric == "perplexity"].copy()
    rows.insert(0, "variant", name)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a dir for the studies' workdirs")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tokens", type=int, default=None, help="perplexity tokens (default: all of test.txt)")
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    frames = [run(name, VARIANTS[name], args.out, args.seeds, args.tokens, args.cores) for name in args.variants]
    table = pd.concat(frames, ignore_index=True)
    table.to_csv(args.out / "recipe_options.csv", index=False)
    fp16 = table[table.scheme == "fp16"].groupby("model")["mean"].first()
    print("| variant | " + " | ".join(f"{m} a={a}" for m in sorted(fp16.index) for a in ("0.9995", "1.0")) + " |")
    print("| --- |" + " --- |" * (2 * len(fp16)))
    print("| fp16 | " + " | ".join(f"{fp16[m]:.2f}" for m in sorted(fp16.index) for _ in range(2)) + " |")
    for name in args.variants:
        cells = []
        for model in sorted(fp16.index):
            for alpha in (0.9995, 1.0):
                row = table[(table.variant == name) & (table.model == model) & (table.scheme == "w8a8")
                            & (table.alpha == alpha)].iloc[0]
                cells.append(f"{row['mean']:.2f} +- {row['std']:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
