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
documents' lengths. Other aggregations are not compared. The table of every comparison
(paired.csv) is built by quamba.stages.summarize, the verdict lines by quamba.report.compare.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from quamba.errors import ConfigError

LEVEL = 0.95  # two-sided interval
POWER = 0.80  # for the minimum detectable effect
MAX_SEEDS = 1000  # seeds_to_detect searches up to this many
METHOD = "two-way random effects (seeds x items), Satterthwaite t"


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
    return seeds_needed(result.components, result.items, result.difference if effect is None else effect)


def seeds_needed(components: Components, items: int, effect: float) -> float:
    """seeds_to_detect from a comparison's variance components (paired.csv keeps them)."""
    effect = abs(effect)
    if math.isnan(components.seed) or effect == 0:
        return math.nan
    for seeds in range(2, MAX_SEEDS + 1):
        variance, dof = study_variance(components, seeds, items)
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


def linearized(differences: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Paired differences of a ratio metric (sum over items / sum of weights) as per-item values
    whose per-seed mean is exactly the ratio's difference (module docstring)."""
    ratio = differences.sum(axis=1, keepdims=True) / weights.sum()  # (seeds, 1)
    return ratio + (differences - ratio * weights[None, :]) / weights.mean()
