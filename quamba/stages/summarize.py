"""The `summarize` stage: the study's tables, built from the per-run files under results/ (nothing
is re-measured). Which model and calibration a file belongs to is its place in the tree
(quamba.formats.layout); what a run was (scheme, alpha, seed) comes from its own records.

- accuracy.csv: tidy, one row per (model, variant, task, metric) from the eval JSONs.
- aggregate.csv: mean, std, n and a 95% t-interval across seeds per (model, scheme, alpha, task,
  metric), with the FP16 value and the delta to it; alpha is empty for FP16 and for w4a16.
- clipping.csv: one row per (model, calib, tap, alpha) from each alpha's scales.json.
- paired.csv: paired comparisons on the same items and seeds (quamba.numerics.paired): each pair
  of alphas of a scheme, and each quantized (scheme, alpha) against FP16, per task and metric,
  from the per-item files beside the eval JSONs.
- runs.csv: one row per quantized run, what the user's experiments.jsonl held: its config, a
  clipping summary of the first layers, every metric, and the paths it came from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from quamba.errors import ConfigError
from quamba.formats import layout
from quamba.formats.calibration import read_stats
from quamba.formats.layout import alpha_key
from quamba.formats.samples import read_samples, samples_path
from quamba.formats.scales import read_scales
from quamba.io import atomic_path
from quamba.models.taps import tap_layer
from quamba.numerics.paired import METHOD, linearized, mcnemar, paired, seeds_to_detect

# Quamba clips the SSM input with its percentile observer; these taps say what alpha did.
SSM_INPUT_POINTS = ("x_proj:input", "x_conv_out:input")
FIRST_LAYERS = 3  # the user's note logged the first three layers
ACCURACY_COLUMNS = ["model", "variant", "scheme", "alpha", "seed", "task", "metric", "value", "stderr", "path"]
AGGREGATE_KEYS = ["model", "scheme", "alpha", "task", "metric"]
CLIPPING_COLUMNS = ["model", "calib", "tap", "layer", "observer", "alpha", "min", "max", "absmax", "threshold",
                    "clipped_min", "clipped_max", "clipped_range", "range_reduction", "clipped_fraction"]


# -- reading one run -----------------------------------------------------------------------------
def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: unreadable {what} ({err}); rerun the job that writes it") from None


def read_eval(path: Path, results_dir: Path = Path(layout.RESULTS)) -> dict[str, Any]:
    """An eval JSON written by quamba.stages.evaluate.evaluate: its model is its place in the
    results/ tree; its scheme, alpha and seed come from the quant_config it records."""
    path = Path(path)
    place = layout.match(layout.EVAL, path, results_dir)
    doc = read_json(path, "eval JSON")
    if doc.get("kind") != "quamba-eval" or place is None:
        raise ConfigError(f"{path}: not an eval JSON at {layout.EVAL} under {results_dir}")
    quant = doc["model"].get("quant_config")
    doc["_model"] = place["model"]
    doc["_scheme"] = "fp16" if quant is None else quant["scheme"]
    doc["_alpha"] = None if quant is None else quant["alpha"]
    doc["_seed"] = None if quant is None else quant["seed"]
    doc["_variant"] = layout.variant(doc["_scheme"], doc["_alpha"], doc["_seed"])
    return doc


def metric_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per reported metric of every task in an eval doc; lm-eval's `_stderr` keys fill
    the stderr column of their metric ("N/A", e.g. perplexity's, leaves it empty)."""
    rows = []
    for task, scores in sorted(doc.get("results", {}).items()):
        for key, value in sorted(scores.items()):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
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
def accuracy_table(eval_files: Iterable[Path], results_dir: Path = Path(layout.RESULTS)) -> pd.DataFrame:
    """Tidy metrics of every eval JSON (fp16 rows have no alpha or seed, w4a16 rows no alpha)."""
    rows = []
    for path in eval_files:
        rows += [{**row, "path": str(path)} for row in metric_rows(read_eval(path, results_dir))]
    frame = pd.DataFrame(rows, columns=ACCURACY_COLUMNS)
    return frame.sort_values(["model", "scheme", "alpha", "seed", "task", "metric"], na_position="first",
                             kind="stable", ignore_index=True)


def paired_runs(eval_files: Iterable[Path], results_dir: Path = Path(layout.RESULTS)) -> list[Run]:
    """Every evaluated variant with its per-item results; an eval JSON without its per-item file
    (written by an older quamba-flow) is an error naming it."""
    runs = []
    for path in eval_files:
        doc = read_eval(path, results_dir)
        items = samples_path(path)
        if not items.is_file():
            raise ConfigError(f"{items}: missing; the per-item results of {path} are needed for paired.csv "
                              f"(rerun that evaluation: snakemake --forcerun evaluate, or quamba eval)")
        runs.append(Run(model=doc["_model"], scheme=doc["_scheme"], alpha=doc["_alpha"], seed=doc["_seed"],
                        path=items, tasks=read_samples(items)["tasks"]))
    return runs


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


def clipping_rows(scales_path: Path, results_dir: Path = Path(layout.RESULTS)) -> list[dict[str, Any]]:
    """Per tap of one alpha's scales.json: the range before and after clipping, the share clipped.
    The range before clipping comes from the stats.json of the same calibration dir."""
    place = layout.match(layout.SCALES, scales_path, results_dir)
    if place is None:
        raise ConfigError(f"{scales_path}: not a scales.json at {layout.SCALES} under {results_dir}")
    scales = read_scales(scales_path)
    stats = read_stats(Path(results_dir) / layout.path(layout.STATS, **place).removeprefix(layout.RESULTS + "/"))
    rows = []
    for tap, clip in scales["taps"].items():
        entry = stats["taps"][tap]
        rows.append({"model": place["model"], "calib": place["calib"], "tap": tap, "layer": tap_layer(tap),
                     "observer": clip["observer"], "alpha": scales["alpha"],
                     **{k: entry[k] for k in ("min", "max", "absmax")},
                     **{k: clip[k] for k in ("threshold", "clipped_min", "clipped_max", "clipped_range",
                                             "range_reduction", "clipped_fraction")}})
    return rows


def clipping_table(scales_files: Iterable[Path], results_dir: Path = Path(layout.RESULTS)) -> pd.DataFrame:
    rows = [row for path in scales_files for row in clipping_rows(path, results_dir)]
    frame = pd.DataFrame(rows, columns=CLIPPING_COLUMNS)
    frame["layer"] = frame["layer"].astype("Int64")  # lm_head:input has no layer: empty, not a float
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
    model_dir = Path(results_dir) / layout.path(layout.VARIANT_MODEL, model=model, variant=variant).removeprefix(
        layout.RESULTS + "/")
    quant = read_json(model_dir / "quant_config.json", "quant_config.json")
    provenance = read_json(model_dir / "provenance.json", "provenance.json")
    stats = provenance.get("stats") or {}
    place = layout.match(layout.STATS, stats["path"], results_dir) if stats.get("path") else None
    return quant, provenance, None if place is None else place["calib"]


def run_ssm_input_clipping(clipping: pd.DataFrame, quant: dict, calib: str | None, model: str,
                           first_layers: int | None = None) -> dict:
    """What the run's alpha did to its SSM input. With Quamba2's reordering, x is quantized with
    grouped min/max scales that alpha does not set, so there is nothing to report (NaN)."""
    if "reorder" in quant or calib is None or quant["alpha"] is None:
        return {"clipped_fraction": math.nan, "range_reduction": math.nan}
    return ssm_input_clipping(clipping[clipping.calib == calib], model, quant["alpha"], first_layers)


def runs_table(accuracy: pd.DataFrame, clipping: pd.DataFrame, results_dir: Path) -> pd.DataFrame:
    """One row per quantized run: config, clipping of the first layers' SSM input, every metric
    as a `task:metric` column, and the files it came from."""
    rows = []
    quantized = accuracy[accuracy.scheme != "fp16"]
    for (model, variant), group in quantized.groupby(["model", "variant"], sort=True):
        quant, provenance, calib = run_files(results_dir, model, variant)
        model_dir = Path(layout.path(layout.VARIANT_MODEL, model=model, variant=variant))
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
        row.update({"recipe_departures": ",".join(quant["recipe"]["departures"]),
                    "model_dir": str(model_dir), "stats": stats.get("path"),
                    "gptq_dir": provenance["gptq"]["path"], "eval_dir": str(model_dir.parent / "eval")})
        rows.append(row)
    frame = pd.DataFrame(rows)
    return (frame.sort_values(["model", "scheme", "alpha", "seed"], kind="stable", na_position="first",
                              ignore_index=True) if rows else frame)


# -- paired.csv: paired comparisons on the same items and seeds (quamba.numerics.paired) ----------
COMPARED_AGGREGATIONS = ("mean", "perplexity", "weighted_perplexity")
PAIRED_COLUMNS = ["model", "task", "metric", "scale", "scheme", "comparison", "alpha", "baseline", "seeds",
                  "items", "difference", "ci95_low", "ci95_high", "p_value", "se", "dof", "seed_spread",
                  "detectable", "seeds_to_detect", "gained", "lost", "mcnemar_p", "var_seed", "var_item",
                  "var_residual", "method"]



def item_values(entry: dict[str, Any], metric: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The per-item values of `metric` ("acc,none") in one task's entry of a per-item file, on the
    scale compared (quamba.numerics.paired), and their weights for a weighted (ratio) metric."""
    aggregation = entry["aggregation"].get(metric)
    values = np.asarray(entry["metrics"][metric], dtype=np.float64)
    if aggregation == "mean":
        return values, None
    if aggregation == "perplexity":
        return -values, None
    if aggregation == "weighted_perplexity":
        return -values, np.asarray(entry["weights"][metric], dtype=np.float64)
    raise ConfigError(f"metric {metric}: aggregation {aggregation!r} is not compared; "
                      f"allowed: {', '.join(COMPARED_AGGREGATIONS)}")


def scale_of(entry: dict[str, Any], metric: str) -> str:
    """What a difference is in: `fraction` for mean metrics, `log` for perplexities."""
    return "fraction" if entry["aggregation"].get(metric) == "mean" else "log"


@dataclass(frozen=True)
class Run:
    """One evaluated variant of a model, and its per-item results."""

    model: str
    scheme: str
    alpha: float | None
    seed: int | None
    path: Path  # its per-item file
    tasks: dict[str, Any]


def aligned(runs: Sequence[Run], task: str, metric: str) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """The runs' item values of one metric in one shared doc-id order, and the items' weights;
    runs that scored other items (or weigh them otherwise) than the first are an error naming both files."""
    order = sorted(runs[0].tasks[task]["doc_id"])
    rows, first_weights = [], None
    for k, run in enumerate(runs):
        entry = run.tasks[task]
        if sorted(entry["doc_id"]) != order:
            raise ConfigError(f"{run.path}: task {task} scored other items than {runs[0].path} "
                              f"({len(entry['doc_id'])} vs {len(order)}); evaluate both with the same limit")
        values, weights = item_values(entry, metric)
        index = [{doc: i for i, doc in enumerate(entry["doc_id"])}[doc] for doc in order]
        rows.append(values[index])
        if weights is not None:
            if k == 0:
                first_weights = weights[index]
            elif not np.array_equal(weights[index], first_weights):
                raise ConfigError(f"{run.path}: task {task} metric {metric} weighs its items otherwise than "
                                  f"{runs[0].path} (another tokenizer?); paired items must be the same")
    return first_weights, rows


def comparison_row(model: str, task: str, metric: str, scale: str, scheme: str, comparison: str,
                   alpha: float | None, baseline: str, variant: np.ndarray, base: np.ndarray,
                   weights: np.ndarray | None) -> dict[str, Any]:
    differences = variant - base
    result = paired(differences if weights is None else linearized(differences, weights))
    pooled = mcnemar(variant, base)
    return {"model": model, "task": task, "metric": metric.removesuffix(",none"), "scale": scale, "scheme": scheme,
            "comparison": comparison, "alpha": alpha, "baseline": baseline, "seeds": result.seeds,
            "items": result.items, "difference": result.difference, "ci95_low": result.low, "ci95_high": result.high,
            "p_value": result.p_value, "se": result.se, "dof": result.dof, "seed_spread": result.seed_spread,
            "detectable": result.detectable, "seeds_to_detect": seeds_to_detect(result),
            "gained": None if pooled is None else pooled[0], "lost": None if pooled is None else pooled[1],
            "mcnemar_p": None if pooled is None else pooled[2], "var_seed": result.components.seed,
            "var_item": result.components.item, "var_residual": result.components.residual, "method": METHOD}


def compared_metrics(run: Run) -> list[tuple[str, str]]:
    """(task, metric) pairs of a run that a paired comparison is made for."""
    return [(task, metric) for task, entry in sorted(run.tasks.items())
            for metric in sorted(entry["metrics"]) if entry["aggregation"].get(metric) in COMPARED_AGGREGATIONS]


def paired_table(runs: Sequence[Run]) -> pd.DataFrame:
    """Per model, task and metric: each pair of alphas of a scheme (the larger vs the smaller, on
    the seeds both have), and each quantized (scheme, alpha) against FP16. A run is one per-item
    file; a variant's tasks may come in several."""
    def order(key):
        return key[0], -1.0 if key[1] is None else key[1]

    rows = []
    for model in sorted({run.model for run in runs}):
        model_runs = [run for run in runs if run.model == model]
        for task, metric in sorted({pair for run in model_runs for pair in compared_metrics(run)}):
            here = [run for run in model_runs if task in run.tasks and metric in run.tasks[task]["metrics"]]
            scale = scale_of(here[0].tasks[task], metric)
            fp16 = [run for run in here if run.scheme == "fp16"]
            groups: dict[tuple[str, float | None], dict[int, Run]] = {}
            for run in here:
                if run.scheme != "fp16":
                    groups.setdefault((run.scheme, run.alpha), {})[run.seed] = run
            for (scheme, alpha), by_seed in sorted(groups.items(), key=lambda kv: order(kv[0])):
                seeds = sorted(by_seed)
                if fp16:
                    weights, values = aligned([fp16[0], *(by_seed[s] for s in seeds)], task, metric)
                    variant = np.stack(values[1:])
                    rows.append(comparison_row(model, task, metric, scale, scheme, "fp16", alpha, "fp16", variant,
                                               np.broadcast_to(values[0], variant.shape), weights))
                for (other_scheme, other), other_seeds in sorted(groups.items(), key=lambda kv: order(kv[0])):
                    if other_scheme != scheme or alpha is None or other is None or other >= alpha:
                        continue
                    shared = sorted(set(by_seed) & set(other_seeds))
                    if not shared:
                        continue
                    weights, values = aligned([*(by_seed[s] for s in shared), *(other_seeds[s] for s in shared)],
                                              task, metric)
                    rows.append(comparison_row(model, task, metric, scale, scheme, "alpha", alpha, alpha_key(other),
                                               np.stack(values[:len(shared)]), np.stack(values[len(shared):]),
                                               weights))
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


# -- files ---------------------------------------------------------------------------------------
def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """CSV written atomically; floats as their shortest round-trip repr, so the file holds exactly
    the numbers of the eval JSONs and equal tables give equal bytes."""
    with atomic_path(Path(path)) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")


def write_summary(results_dir: Path, eval_files: Sequence[Path], scales_files: Sequence[Path],
                  out_dir: Path) -> dict[str, pd.DataFrame]:
    """All five tables into out_dir; returns them by file stem."""
    accuracy = accuracy_table(eval_files, results_dir)
    clipping = clipping_table(scales_files, results_dir)
    tables = {"accuracy": accuracy, "aggregate": aggregate_table(accuracy), "clipping": clipping,
              "runs": runs_table(accuracy, clipping, results_dir),
              "paired": paired_table(paired_runs(eval_files, results_dir))}
    for name, frame in tables.items():
        write_csv(frame, Path(out_dir) / f"{name}.csv")
    return tables


def discover(results_dir: Path) -> tuple[list[Path], list[Path]]:
    """Every eval JSON and scales.json under a results/ tree (for use without Snakemake)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ConfigError(f"{results_dir}: no such results directory; run the study first (snakemake --cores N)")
    evals = [path for path, _ in layout.find(layout.EVAL, results_dir)]
    scales = [path for path, _ in layout.find(layout.SCALES, results_dir)]
    return evals, scales


def alpha_label(alpha: float | None, none: str = "fp16") -> str:
    """An alpha as shown in tables and plots; `none` for runs without one."""
    return none if alpha is None or (isinstance(alpha, float) and math.isnan(alpha)) else alpha_key(alpha)
