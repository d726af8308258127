"""The study's tables, built from the per-run files under results/ (nothing is re-measured).

- accuracy.csv: tidy, one row per (model, variant, task, metric) from the eval JSONs.
- aggregate.csv: mean, std, n and a 95% t-interval across seeds per (model, scheme, alpha, task,
  metric), with the FP16 value and the delta to it.
- clipping.csv: one row per (model, calib, tap, alpha) from stats.json.
- runs.csv: one row per quantized run, what the user's experiments.jsonl held: its config, a
  clipping summary of the first layers, every metric, and the paths it came from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from quamba.errors import ConfigError
from quamba.formats.layout import alpha_key
from quamba.formats.stats import read_stats
from quamba.io import atomic_path
from quamba.models.taps import tap_layer
from quamba.stages.evaluate import PERPLEXITY_METRICS, PERPLEXITY_TASK

# Quamba clips the SSM input with its percentile observer; these taps say what alpha did.
SSM_INPUT_POINTS = ("x_proj:input", "x_conv_out:input")
FIRST_LAYERS = 3  # the user's note logged the first three layers
ACCURACY_COLUMNS = ["model", "variant", "scheme", "alpha", "seed", "task", "metric", "value", "stderr", "path"]
AGGREGATE_KEYS = ["model", "scheme", "alpha", "task", "metric"]
CLIPPING_COLUMNS = ["model", "calib", "tap", "layer", "observer", "alpha", "min", "max", "absmax", "threshold",
                    "clipped_min", "clipped_max", "clipped_range", "range_reduction", "clipped_fraction"]


# -- reading one run -----------------------------------------------------------------------------
def read_eval(path: Path) -> dict[str, Any]:
    """An eval JSON written by quamba.stages.evaluate.evaluate, with model and variant read from its place in
    results/{model}/{variant}/eval/{task}.json (variant: fp16 or {scheme}/pa{alpha}/seed{seed})."""
    path = Path(path)
    doc = json.loads(path.read_text())
    if doc.get("kind") != "quamba-eval" or path.parent.name != "eval":
        raise ConfigError(f"{path}: not an eval JSON under results/{{model}}/{{variant}}/eval/")
    quant = doc["model"].get("quant_config")
    depth = 1 if quant is None else 3  # fp16 | scheme/pa{alpha}/seed{seed}
    parts = path.parent.parent.parts
    doc["_model"], doc["_variant"] = parts[-depth - 1], "/".join(parts[-depth:])
    doc["_scheme"] = "fp16" if quant is None else quant["scheme"]
    doc["_alpha"] = None if quant is None else quant["alpha"]
    doc["_seed"] = None if quant is None else quant["seed"]
    return doc


def metric_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per reported metric of every task in an eval doc; lm-eval's `_stderr` keys fill
    the stderr column of their metric, perplexity's counts (tokens, bytes) are left out."""
    rows = []
    for task, scores in sorted(doc.get("results", {}).items()):
        for key, value in sorted(scores.items()):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if task.startswith(PERPLEXITY_TASK):
                if key not in PERPLEXITY_METRICS:
                    continue
                metric, stderr = key, None
            else:
                metric, _, filt = key.partition(",")
                if not filt or "_stderr" in metric:
                    continue
                metric = metric if filt == "none" else f"{metric},{filt}"
                stderr = scores.get(key.replace(",", "_stderr,", 1))
            rows.append({"model": doc["_model"], "variant": doc["_variant"], "scheme": doc["_scheme"],
                         "alpha": doc["_alpha"], "seed": doc["_seed"], "task": task, "metric": metric,
                         "value": float(value), "stderr": stderr if isinstance(stderr, (int, float)) else None})
    return rows


# -- tables --------------------------------------------------------------------------------------
def accuracy_table(eval_files: Iterable[Path]) -> pd.DataFrame:
    """Tidy metrics of every eval JSON (fp16 rows have no alpha or seed)."""
    rows = []
    for path in eval_files:
        rows += [{**row, "path": str(path)} for row in metric_rows(read_eval(path))]
    frame = pd.DataFrame(rows, columns=ACCURACY_COLUMNS)
    return frame.sort_values(["model", "scheme", "alpha", "seed", "task", "metric"], na_position="first",
                             kind="stable", ignore_index=True)


def t_interval(values: Sequence[float]) -> tuple[float, float, float, float]:
    """mean, sample std, and the 95% Student-t interval of the mean (NaN where n < 2)."""
    from scipy import stats

    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def aggregate_table(accuracy: pd.DataFrame) -> pd.DataFrame:
    """Across seeds: n, mean, std, 95% interval, the FP16 value and mean - FP16."""
    fp16 = accuracy[accuracy.scheme == "fp16"].set_index(["model", "task", "metric"])["value"]
    rows = []
    for key, group in accuracy.groupby(AGGREGATE_KEYS, dropna=False, sort=True):
        row = dict(zip(AGGREGATE_KEYS, key))
        mean, std, low, high = t_interval(group["value"].tolist())
        baseline = fp16.get((row["model"], row["task"], row["metric"]), math.nan)
        rows.append({**row, "n": len(group), "mean": mean, "std": std, "ci95_low": low, "ci95_high": high,
                     "fp16": baseline, "delta_fp16": mean - baseline})
    return pd.DataFrame(rows, columns=[*AGGREGATE_KEYS, "n", "mean", "std", "ci95_low", "ci95_high", "fp16",
                                       "delta_fp16"])


def clipping_rows(stats_path: Path) -> list[dict[str, Any]]:
    """Per tap and alpha of one stats.json: the range before and after clipping, the share clipped.
    The model and calibration names come from results/{model}/calib/{calib}/stats.json."""
    stats_path = Path(stats_path)
    doc = read_stats(stats_path)
    model, calib = stats_path.parent.parent.parent.name, stats_path.parent.name
    rows = []
    for tap, entry in doc["taps"].items():
        for alpha, clip in entry["alphas"].items():
            rows.append({"model": model, "calib": calib, "tap": tap, "layer": tap_layer(tap),
                         "observer": entry["observer"], "alpha": float(alpha),
                         **{k: entry[k] for k in ("min", "max", "absmax")},
                         **{k: clip[k] for k in ("threshold", "clipped_min", "clipped_max", "clipped_range",
                                                 "range_reduction", "clipped_fraction")}})
    return rows


def clipping_table(stats_files: Iterable[Path]) -> pd.DataFrame:
    rows = [row for path in stats_files for row in clipping_rows(path)]
    frame = pd.DataFrame(rows, columns=CLIPPING_COLUMNS)
    return frame.sort_values(["model", "calib", "layer", "tap", "alpha"], na_position="last", kind="stable",
                             ignore_index=True)


def ssm_input_clipping(clipping: pd.DataFrame, model: str, alpha: float, first_layers: int | None = None) -> dict:
    """Mean clipped share and range reduction over a model's SSM-input taps at one alpha."""
    rows = clipping[(clipping.model == model) & (clipping.alpha == alpha)
                    & clipping.tap.str.split(".").str[-1].isin(SSM_INPUT_POINTS)]
    if first_layers is not None:
        rows = rows[rows.layer < first_layers]
    if rows.empty:
        return {"clipped_fraction": math.nan, "range_reduction": math.nan}
    return {"clipped_fraction": float(rows.clipped_fraction.mean()), "range_reduction": float(rows.range_reduction.mean())}


def run_files(results_dir: Path, model: str, variant: str) -> tuple[dict, dict, str | None]:
    """A quantized run's quant_config, provenance and the calibration setting it was built from."""
    model_dir = Path(results_dir) / model / variant / "model"
    quant = json.loads((model_dir / "quant_config.json").read_text())
    provenance = json.loads((model_dir / "provenance.json").read_text())
    stats = provenance.get("stats") or {}
    return quant, provenance, Path(stats["path"]).parent.name if stats.get("path") else None


def run_ssm_input_clipping(clipping: pd.DataFrame, quant: dict, calib: str | None, model: str,
                           first_layers: int | None = None) -> dict:
    """What the run's alpha did to its SSM input. With Quamba2's reordering, x is quantized with
    grouped min/max scales that alpha does not set, so there is nothing to report (NaN)."""
    if "reorder" in quant or calib is None:
        return {"clipped_fraction": math.nan, "range_reduction": math.nan}
    return ssm_input_clipping(clipping[clipping.calib == calib], model, quant["alpha"], first_layers)


def runs_table(accuracy: pd.DataFrame, clipping: pd.DataFrame, results_dir: Path) -> pd.DataFrame:
    """One row per quantized run: config, clipping of the first layers' SSM input, every metric
    as a `task:metric` column, and the files it came from."""
    rows = []
    quantized = accuracy[accuracy.scheme != "fp16"]
    for (model, variant), group in quantized.groupby(["model", "variant"], sort=True):
        model_dir = Path(results_dir) / model / variant / "model"
        quant, provenance, calib = run_files(results_dir, model, variant)
        gptq = quant["gptq"]["settings"]
        stats = provenance.get("stats") or {}
        row = {"model": model, "scheme": quant["scheme"], "alpha": quant["alpha"], "seed": quant["seed"],
               "w_bits": quant["w_bits"], "a_bits": quant["a_bits"], "group_size": quant["group_size"],
               "calib": calib, "gptq_nsamples": gptq.get("nsamples"), "gptq_seqlen": gptq.get("seqlen"),
               "gptq_data": quant["gptq"]["data"].get("source") if isinstance(quant["gptq"]["data"], dict) else None}
        clip = run_ssm_input_clipping(clipping, quant, calib, model, FIRST_LAYERS)
        row.update({f"ssm_input_{k}_first{FIRST_LAYERS}": v for k, v in clip.items()})
        for metric in group.itertuples():
            row[f"{metric.task}:{metric.metric}"] = metric.value
        row.update({"model_dir": str(model_dir), "stats": stats.get("path"),
                    "gptq_dir": provenance["gptq"]["path"], "eval_dir": str(model_dir.parent / "eval")})
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sort_values(["model", "scheme", "alpha", "seed"], kind="stable", ignore_index=True) if rows else frame


# -- files ---------------------------------------------------------------------------------------
def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """CSV written atomically; floats as their shortest round-trip repr, so the file holds exactly
    the numbers of the eval JSONs and equal tables give equal bytes."""
    with atomic_path(Path(path)) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")


def write_summary(results_dir: Path, eval_files: Sequence[Path], stats_files: Sequence[Path],
                  out_dir: Path) -> dict[str, pd.DataFrame]:
    """All four tables into out_dir; returns them by file stem."""
    accuracy = accuracy_table(eval_files)
    clipping = clipping_table(stats_files)
    tables = {"accuracy": accuracy, "aggregate": aggregate_table(accuracy), "clipping": clipping,
              "runs": runs_table(accuracy, clipping, results_dir)}
    for name, frame in tables.items():
        write_csv(frame, Path(out_dir) / f"{name}.csv")
    return tables


def discover(results_dir: Path) -> tuple[list[Path], list[Path]]:
    """Every eval JSON and stats.json under a results/ tree (for use without Snakemake)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ConfigError(f"{results_dir}: no such results directory; run the study first (snakemake --cores N)")
    evals = sorted(p for p in results_dir.glob("*/**/eval/*.json") if "summary" not in p.parts)
    stats = sorted(results_dir.glob("*/calib/*/stats.json"))
    return evals, stats


def alpha_label(alpha: float | None) -> str:
    return "fp16" if alpha is None or (isinstance(alpha, float) and math.isnan(alpha)) else alpha_key(alpha)
