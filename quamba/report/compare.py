"""`quamba compare`: the user's four-run comparison, from the results/ tree.

One row per (model, scheme, alpha): the accuracy of a task as mean +- std over seeds (n seeds),
its delta to FP16, and what the alpha did to the SSM input (mean clipped share and range
reduction over every layer's SSM-input tap). The user's note compared mamba-130m and
mamba2-2.7b at alpha 0.9995 and 1.0, W8A8, on lambada_openai; here any study's grid shows.
Under the table, one verdict line per paired comparison (quamba.numerics.paired): each pair of
alphas of a scheme, and each variant against FP16, on the same items and seeds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from quamba.errors import ConfigError
from quamba.formats.layout import alpha_key
from quamba.numerics.paired import LEVEL, Components, seeds_needed
from quamba.stages.summarize import (
    accuracy_table,
    aggregate_table,
    alpha_label,
    clipping_table,
    discover,
    paired_runs,
    paired_table,
    run_files,
    run_ssm_input_clipping,
)

DEFAULT_METRICS = ("acc", "perplexity")  # the first of these a task reports is compared


def pick_metric(accuracy: pd.DataFrame, task: str, metric: str | None) -> str:
    available = sorted(accuracy.loc[accuracy.task == task, "metric"].unique())
    if metric is not None:
        if metric not in available:
            raise ConfigError(f"compare: --metric {metric!r} is not reported by {task}; allowed: {available}")
        return metric
    for name in DEFAULT_METRICS:
        if name in available:
            return name
    return available[0]


def compare_table(results_dir: Path, task: str | None = None, metric: str | None = None,
                  schemes: list[str] | None = None) -> tuple[pd.DataFrame, str, str]:
    """The comparison as a frame of display strings, and the task and metric it shows."""
    evals, scales = discover(results_dir)
    accuracy = accuracy_table(evals, results_dir)
    if accuracy.empty:
        raise ConfigError(f"{results_dir}: no eval results yet; run the study first (snakemake --cores N)")
    tasks = sorted(accuracy.task.unique())
    scored = sorted(accuracy.loc[accuracy.metric == "acc", "task"].unique())
    task = task or (scored or tasks)[0]  # an accuracy task first; perplexity when there is no other
    if task not in tasks:
        raise ConfigError(f"compare: --task {task!r} has no results; allowed: {tasks}")
    metric = pick_metric(accuracy, task, metric)
    aggregate = aggregate_table(accuracy[(accuracy.task == task) & (accuracy.metric == metric)])
    if schemes:
        unknown = sorted(set(schemes) - set(aggregate.scheme))
        if unknown:
            raise ConfigError(f"compare: --schemes {unknown} have no results; allowed: {sorted(set(aggregate.scheme))}")
        aggregate = aggregate[aggregate.scheme.isin([*schemes, "fp16"])]
    clipping = clipping_table(scales, results_dir)
    rows = []
    for row in aggregate.itertuples():
        fp16 = row.scheme == "fp16"
        clip = {"clipped_fraction": math.nan, "range_reduction": math.nan}
        if not fp16:  # the calibration this (model, scheme, alpha)'s runs were built from
            same_alpha = accuracy.alpha.isna() if pd.isna(row.alpha) else accuracy.alpha == row.alpha
            runs = accuracy[(accuracy.model == row.model) & (accuracy.scheme == row.scheme) & same_alpha]
            quant, _, calib = run_files(results_dir, row.model, runs.variant.iloc[0])
            clip = run_ssm_input_clipping(clipping, quant, calib, row.model)
        spread = "" if math.isnan(row.std) else f" +- {row.std:.4f}"
        rows.append({"model": row.model, "scheme": row.scheme, "alpha": "fp16" if fp16 else alpha_label(row.alpha, none="-"),
                     (task if metric == task else f"{task} {metric}"): f"{row.mean:.4f}{spread} (n={row.n})",
                     "delta fp16": "" if fp16 else f"{row.delta_fp16:+.4f}",
                     "SSM input clipped": "" if math.isnan(clip["clipped_fraction"])
                     else f"{100 * clip['clipped_fraction']:.4f}%",
                     "range reduction": "" if math.isnan(clip["range_reduction"])
                     else f"{100 * clip['range_reduction']:.1f}%"})
    return pd.DataFrame(rows), task, metric


def _shown(value: float, scale: str, signed: bool = True) -> str:
    """A difference as points of accuracy, or as a percent change of perplexity."""
    if scale == "fraction":
        return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"
    percent = 100 * math.expm1(value)
    return f"{percent:+.2f}%" if signed else f"{percent:.2f}%"


def in_scale(effect: float, scale: str) -> float:
    """An effect as the user gives it (points of accuracy, percent of perplexity) on the scale of
    paired.csv (a fraction, log-perplexity)."""
    return effect / 100 if scale == "fraction" else math.log1p(effect / 100)


def verdict(row: Any, effect: float | None = None) -> str:
    """One line a researcher can paste into a paper's notes, e.g. "mamba1-demo w8a8 alpha 1.0 vs
    0.9995: +0.4 points [-0.3, +1.1] over 3 seeds x 500 items, p = 0.27; seed spread 0.6; this
    study detects >= 0.9 points". With `effect` (points, or percent of perplexity) it also says
    how many seeds would detect that effect."""
    scale = row.scale
    unit = " points" if scale == "fraction" else ""
    what = row.task if row.metric == row.task else f"{row.task} {row.metric}"
    subject = f"{row.model} {row.scheme}" + ("" if pd.isna(row.alpha) else f" alpha {alpha_key(row.alpha)}")
    head = f"{subject} vs {row.baseline} ({what}): "
    if row.se == 0 and row.difference == 0:
        return head + f"no difference on any of {row.seeds} seed{'s' if row.seeds != 1 else ''} x {row.items} items"
    line = head + f"{_shown(row.difference, scale)}{unit}"
    if not pd.isna(row.ci95_low):
        line += f" [{_shown(row.ci95_low, scale)}, {_shown(row.ci95_high, scale)}]"
    line += f" over {row.seeds} seed{'s' if row.seeds != 1 else ''} x {row.items} items"
    if not pd.isna(row.p_value):
        line += f", p = {row.p_value:.2g}"
    if row.seeds > 1:
        line += f"; seed spread {_shown(row.seed_spread, scale, signed=False)}"
    else:
        line += "; one seed: the interval covers item noise only"
    if not pd.isna(row.detectable):
        line += f"; this study detects >= {_shown(row.detectable, scale, signed=False)}{unit}"
    if row.seeds > 1 and not pd.isna(row.p_value) and row.p_value >= 1 - LEVEL and row.difference != 0:
        if pd.isna(row.seeds_to_detect):
            line += f"; no number of seeds detects {_shown(row.difference, scale)}{unit} with {row.items} items"
        else:
            line += f"; {int(row.seeds_to_detect)} seeds would detect {_shown(row.difference, scale)}{unit}"
    if effect is not None:
        wanted = in_scale(effect, scale)
        shown = _shown(wanted, scale, signed=False)
        needed = seeds_needed(Components(row.var_seed, row.var_item, row.var_residual), row.items, wanted)
        line += (f"; seeds to detect {shown}{unit}: unknown from one seed" if row.seeds < 2 else
                 f"; no number of seeds detects {shown}{unit} with {row.items} items" if math.isnan(needed) else
                 f"; {int(needed)} seeds would detect {shown}{unit}")
    return line


def verdicts(results_dir: Path, task: str, metric: str, schemes: list[str] | None = None,
             effect: float | None = None) -> list[str]:
    """One line per paired comparison of `task`'s `metric`: alpha pairs first, then against FP16."""
    evals, _ = discover(results_dir)
    paired = paired_table(paired_runs(evals, results_dir))
    rows = paired[(paired.task == task) & (paired.metric == metric)]
    if schemes:
        rows = rows[rows.scheme.isin(schemes)]
    rows = rows.sort_values(["model", "comparison", "scheme", "alpha"], kind="stable")
    return [verdict(row, effect) for row in rows.itertuples()]


def render(results_dir: Path, task: str | None = None, metric: str | None = None,
           schemes: list[str] | None = None, effect: float | None = None) -> str:
    frame, task, metric = compare_table(results_dir, task, metric, schemes)
    shown = task if metric == task else f"{task} {metric}"
    title = (f"{shown}: mean +- std over seeds; SSM input clipping averaged over layers "
             f"(from {Path(results_dir)})")
    try:
        lines = verdicts(results_dir, task, metric, schemes, effect)
    except ConfigError as err:  # e.g. results of an older quamba-flow, without per-item files: the table stands
        lines = [f"no paired verdicts: {err}"]
    notes = ["", "Paired on the same items and seeds (95% interval over seeds x items; README, paired.csv):",
             *lines] if lines else []
    return "\n".join([title, frame.to_string(index=False), *notes])
