"""Paired comparisons: is a difference between two variants larger than seed and item noise?

Every alpha of a GPTQ seed shares that seed's weights, and every variant answers the same items,
so a comparison is made on paired differences D[s, i] = variant(s, i) - baseline(s, i) over
seeds s and items i (against FP16 the baseline is the one FP16 run). Seeds and items are both
random samples (of GPTQ/calibration draws, of test items), crossed: the design of Clark (1973),
"The language-as-fixed-effect fallacy" (J. Verbal Learn. Verbal Behav. 12:335-359), with seeds in
the place of subjects. D is split by a two-way random-effects ANOVA (one value per cell):

    D[s, i] = mu + a_s + b_i + e_si,  Var(mean D) = s2_seed/S + s2_item/N + s2_resid/(S N)

with the variance components from the mean squares (negative estimates set to 0), the 95%
interval and p-value from Student's t with Satterthwaite's (1946, Biometrics Bulletin 2:110-114)
degrees of freedom. With one seed the seed component cannot be estimated: the interval then
covers item sampling only (a paired t-test over items), and says so.

For 0/1 metrics McNemar's exact test is given as well, on the discordant items pooled over
seeds (items gained, items lost): an items-only test, equal to McNemar's with one seed.

What an item's value is follows lm-eval's aggregation of the metric (quamba.formats.samples):
`mean` metrics (acc, acc_norm) as they are; perplexity metrics on the log scale, so differences
are in log-perplexity: `perplexity` (exp of minus the mean loglikelihood) takes -ll per item;
`weighted_perplexity` (exp of minus sum ll / sum weight, e.g. per token over documents) is a ratio,
so its paired differences d_i = -ll_i(variant) + ll_i(baseline) enter linearized (Cochran 1977,
Sampling Techniques, ch. 6): z_i = R + (d_i - R w_i) / mean(w) with R = sum d / sum w per seed,
whose mean is exactly the difference in log-perplexity and whose spread is the ratio's, not the
documents' lengths. Other aggregations are not compared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from quamba.errors import ConfigError

LEVEL = 0.95  # two-sided interval
POWER = 0.80  # for the minimum detectable effect
MAX_SEEDS = 1000  # seeds_to_detect searches up to this many
METHOD = "two-way random effects (seeds x items), Satterthwaite t"
COMPARED_AGGREGATIONS = ("mean", "perplexity", "weighted_perplexity")
PAIRED_COLUMNS = ["model", "task", "metric", "scale", "scheme", "comparison", "alpha", "baseline", "seeds",
                  "items", "difference", "ci95_low", "ci95_high", "p_value", "se", "dof", "seed_spread",
                  "detectable", "seeds_to_detect", "gained", "lost", "mcnemar_p", "method"]


# -- statistics ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Components:
    """Variance components of paired differences (NaN where one seed leaves them unknown)."""

    seed: float
    item: float
    residual: float


@dataclass(frozen=True)
class Paired:
    """One paired comparison over S seeds x N items."""

    seeds: int
    items: int
    difference: float  # mean of D over seeds and items
    se: float
    dof: float
    low: float
    high: float
    p_value: float
    seed_spread: float  # std over seeds of the per-seed mean differences (NaN with one seed)
    detectable: float  # minimum detectable |difference| at POWER, two-sided 1 - LEVEL
    components: Components


def _satterthwaite(terms: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """V = sum of terms c * MS, and its Satterthwaite degrees of freedom; terms: (c * MS, df)."""
    variance = math.fsum(term for term, _ in terms)
    denominator = math.fsum(term ** 2 / df for term, df in terms if term)
    return variance, (variance ** 2 / denominator if denominator > 0 else math.nan)


def study_variance(components: Components, seeds: int, items: int) -> tuple[float, float]:
    """Var(mean D) and its degrees of freedom for a study of `seeds` x `items`, from the
    components, written as the expected mean squares of that study (Satterthwaite)."""
    s2a, s2b, s2e = components.seed, components.item, components.residual
    ms_seed, ms_item, ms_resid = s2e + items * s2a, s2e + seeds * s2b, s2e
    df_seed, df_item, df_resid = seeds - 1, items - 1, (seeds - 1) * (items - 1)
    cells = seeds * items
    if s2a > 0 and s2b > 0:
        terms = [(ms_seed / cells, df_seed), (ms_item / cells, df_item), (-ms_resid / cells, df_resid)]
    elif s2a > 0:
        terms = [(ms_seed / cells, df_seed)]
    elif s2b > 0:
        terms = [(ms_item / cells, df_item)]
    else:
        terms = [(ms_resid / cells, df_resid)]
    return _satterthwaite(terms)


def variance_components(differences: np.ndarray) -> tuple[Components, float, float]:
    """Components of D (seeds x items), Var(mean D) and its degrees of freedom."""
    seeds, items = differences.shape
    grand = differences.mean()
    if seeds == 1 or items == 1:  # one factor only: a plain paired t over the other
        values = differences.ravel()
        variance = float(values.var(ddof=1)) / values.size if values.size > 1 else math.nan
        return Components(math.nan, math.nan, math.nan), variance, values.size - 1
    seed_means, item_means = differences.mean(axis=1), differences.mean(axis=0)
    ms_seed = items * float(((seed_means - grand) ** 2).sum()) / (seeds - 1)
    ms_item = seeds * float(((item_means - grand) ** 2).sum()) / (items - 1)
    residual = differences - seed_means[:, None] - item_means[None, :] + grand
    ms_resid = float((residual ** 2).sum()) / ((seeds - 1) * (items - 1))
    components = Components(seed=max(0.0, (ms_seed - ms_resid) / items),
                            item=max(0.0, (ms_item - ms_resid) / seeds), residual=ms_resid)
    variance, dof = study_variance(components, seeds, items)
    return components, variance, dof


def detectable_effect(se: float, dof: float) -> float:
    from scipy import stats

    if not se > 0 or not dof > 0:
        return math.nan
    return float((stats.t.ppf(1 - (1 - LEVEL) / 2, dof) + stats.t.ppf(POWER, dof)) * se)


def paired(differences: np.ndarray) -> Paired:
    """The comparison of paired differences D (seeds x items)."""
    from scipy import stats

    differences = np.asarray(differences, dtype=np.float64)
    if differences.ndim != 2 or differences.size == 0 or not np.isfinite(differences).all():
        raise ConfigError(f"paired differences: need a finite seeds x items array, got shape {differences.shape}")
    seeds, items = differences.shape
    mean = float(differences.mean())
    components, variance, dof = variance_components(differences)
    se = math.sqrt(variance) if variance >= 0 else math.nan
    if se == 0:  # every difference equal: no noise to measure
        low = high = mean
        p_value = 1.0 if mean == 0 else 0.0
    elif math.isnan(se) or not dof > 0:
        low = high = p_value = math.nan
    else:
        half = float(stats.t.ppf(1 - (1 - LEVEL) / 2, dof)) * se
        low, high = mean - half, mean + half
        p_value = float(2 * stats.t.sf(abs(mean) / se, dof))
    spread = float(differences.mean(axis=1).std(ddof=1)) if seeds > 1 else math.nan
    return Paired(seeds=seeds, items=items, difference=mean, se=se, dof=dof, low=low, high=high, p_value=p_value,
                  seed_spread=spread, detectable=detectable_effect(se, dof), components=components)


def seeds_to_detect(result: Paired, effect: float | None = None) -> float:
    """The fewest seeds (at this item count) whose study detects |effect| (default: the observed
    difference) at POWER; NaN when the seed component is unknown (one seed), when the effect is 0,
    or when no number up to MAX_SEEDS does (the item noise alone is too large)."""
    effect = abs(result.difference if effect is None else effect)
    if math.isnan(result.components.seed) or effect == 0:
        return math.nan
    for seeds in range(2, MAX_SEEDS + 1):
        variance, dof = study_variance(result.components, seeds, result.items)
        if variance <= 0 or detectable_effect(math.sqrt(variance), dof) <= effect:
            return float(seeds)
    return math.nan


def mcnemar(variant: np.ndarray, baseline: np.ndarray) -> tuple[int, int, float] | None:
    """(items gained, items lost, McNemar's exact p) pooled over seeds, for 0/1 values; else None."""
    from scipy import stats

    if not (np.isin(variant, (0.0, 1.0)).all() and np.isin(baseline, (0.0, 1.0)).all()):
        return None
    gained, lost = int(((variant == 1) & (baseline == 0)).sum()), int(((variant == 0) & (baseline == 1)).sum())
    p_value = 1.0 if gained + lost == 0 else float(stats.binomtest(gained, gained + lost, 0.5).pvalue)
    return gained, lost, p_value


# -- item values from the per-item files ---------------------------------------------------------
def item_values(entry: dict[str, Any], metric: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The per-item values of `metric` ("acc,none") in one task's entry of a per-item file, on the
    scale compared (module docstring), and their weights for a weighted (ratio) metric."""
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


def linearized(differences: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Paired differences of a ratio metric (sum over items / sum of weights) as per-item values
    whose per-seed mean is exactly the ratio's difference (module docstring)."""
    ratio = differences.sum(axis=1, keepdims=True) / weights.sum()  # (seeds, 1)
    return ratio + (differences - ratio * weights[None, :]) / weights.mean()


def scale_of(entry: dict[str, Any], metric: str) -> str:
    """What a difference is in: `fraction` for mean metrics, `log` for perplexities."""
    return "fraction" if entry["aggregation"].get(metric) == "mean" else "log"


# -- the table -----------------------------------------------------------------------------------
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
            "mcnemar_p": None if pooled is None else pooled[2], "method": METHOD}


def compared_metrics(run: Run) -> list[tuple[str, str]]:
    """(task, metric) pairs of a run that a paired comparison is made for."""
    return [(task, metric) for task, entry in sorted(run.tasks.items())
            for metric in sorted(entry["metrics"]) if entry["aggregation"].get(metric) in COMPARED_AGGREGATIONS]


def paired_table(runs: Sequence[Run]) -> pd.DataFrame:
    """Per model, task and metric: each pair of alphas of a scheme (the larger vs the smaller, on
    the seeds both have), and each quantized (scheme, alpha) against FP16. A run is one per-item
    file; a variant's tasks may come in several."""
    from quamba.formats.layout import alpha_key

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


# -- words ---------------------------------------------------------------------------------------
def _shown(value: float, scale: str, signed: bool = True) -> str:
    """A difference as points of accuracy, or as a percent change of perplexity."""
    if scale == "fraction":
        return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"
    percent = 100 * math.expm1(value)
    return f"{percent:+.2f}%" if signed else f"{percent:.2f}%"


def verdict(row: Any) -> str:
    """One line a researcher can paste into a paper's notes, e.g. "mamba1-demo w8a8 alpha 1.0 vs
    0.9995: +0.4 points [-0.3, +1.1] over 3 seeds x 500 items, p = 0.27; seed spread 0.6; this
    study detects >= 0.9 points"."""
    from quamba.formats.layout import alpha_key

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
    return line
