"""Which of Quamba's choices move the numbers: held-out perplexity of both demo models (W8A8 at alpha
0.9995 and 1.0 by default) under the quamba recipe, then with each recipe option flipped alone, with
the spread over GPTQ seeds beside it. One Snakemake study per variant, each in its own workdir.

    python -m bench.recipe_options --out /tmp/recipe-bench            # CPU: about 4 min a variant
    python -m bench.recipe_options --out DIR --variants quamba alpha_one=stream_max
    python -m bench.recipe_options --out DIR --schemes w8a8 w4a8 w4a16 --alphas 0.9995 \
        --variants quamba gptq=false int4_grid=symmetric          # the weight options, every scheme
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
    # the weight options (QUAMBA.md sections 5, 7 and 8)
    "gptq=false": {"gptq": False},  # round-to-nearest everywhere: Quamba's W8A8 paper setting
    "w8_gptq=per_tensor": {"w8_gptq": "per_tensor"},
    "int4_grid=symmetric": {"int4_grid": "symmetric"},
    "lm_head_gptq=none": {"lm_head_gptq": "none"},
    "lm_head_gptq=w_bits": {"lm_head_gptq": "w_bits"},
    "w4_layout=gptq_codes": {"w4_layout": "gptq_codes"},
    "rounding=half_away": {"rounding": "half_away"},
}


def study(options: dict, seeds: list[int], tokens: int | None, schemes: list[str], alphas: list[float]) -> dict:
    """The default study's models and calibration, the given schemes and alphas, perplexity only."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["recipe"] = {"name": "quamba", **options}
    config["quantization"].update(schemes=schemes, alphas=alphas, seeds=seeds)
    config["tasks"] = ["perplexity"]
    config["eval"] = {"batch_size": 8, "limit": None, "perplexity_tokens": tokens}
    return config


def run(name: str, options: dict, root: Path, args: argparse.Namespace) -> pd.DataFrame:
    workdir = root / name.replace("=", "-")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "resources").unlink(missing_ok=True)
    (workdir / "resources").symlink_to(REPO / "resources")
    (workdir / "study.yaml").write_text(yaml.safe_dump(study(options, args.seeds, args.tokens, args.schemes,
                                                             args.alphas)))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", str(args.cores),
                    "--configfile", "study.yaml", "--quiet"], cwd=workdir, check=True)
    print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return table_rows(name, root)


def table_rows(name: str, root: Path) -> pd.DataFrame:
    """The perplexity rows of one finished variant's aggregate.csv."""
    aggregate = pd.read_csv(root / name.replace("=", "-") / "results" / "summary" / "aggregate.csv")
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
    parser.add_argument("--schemes", nargs="+", default=["w8a8"], choices=["w8a8", "w4a8", "w4a16"])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.9995, 1.0])
    parser.add_argument("--table-only", action="store_true", help="print the table of the studies already run")
    args = parser.parse_args()
    frames = ([table_rows(name, args.out) for name in args.variants] if args.table_only
              else [run(name, VARIANTS[name], args.out, args) for name in args.variants])
    table = pd.concat(frames, ignore_index=True)
    table.to_csv(args.out / "recipe_options.csv", index=False)
    print_table(table, args.variants)


def print_table(table: pd.DataFrame, variants: list[str]) -> None:
    """A markdown table: a row per variant, a column per (model, scheme, alpha) measured."""
    fp16 = table[table.scheme == "fp16"].groupby("model")["mean"].first()
    quantized = table[table.scheme != "fp16"]
    columns = sorted({(r.model, r.scheme, None if pd.isna(r.alpha) else r.alpha) for r in quantized.itertuples()},
                     key=lambda c: (c[0], c[1], -1.0 if c[2] is None else c[2]))

    def label(model, scheme, alpha):
        return f"{model} {scheme}" + ("" if alpha is None else f" a={alpha:g}")
    print("| variant | " + " | ".join(label(*c) for c in columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    print("| fp16 | " + " | ".join(f"{fp16[c[0]]:.2f}" for c in columns) + " |")
    for name in variants:
        cells = []
        for model, scheme, alpha in columns:
            rows = quantized[(quantized.variant == name) & (quantized.model == model) & (quantized.scheme == scheme)
                             & (quantized.alpha.isna() if alpha is None else quantized.alpha == alpha)]
            cells.append("-" if rows.empty else f"{rows.iloc[0]['mean']:.2f} +- {rows.iloc[0]['std']:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
