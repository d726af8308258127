"""Paired comparisons (quamba.numerics.paired, paired.csv, the verdict lines): intervals that cover the truth at about the nominal
rate over seeded synthetic studies with known effects and seed noise, the textbook special cases,
the verdict line's words, and the table's numbers against a direct computation."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from quamba.errors import ConfigError
from quamba.numerics.paired import (
    detectable_effect,
    linearized,
    mcnemar,
    paired,
    seeds_to_detect,
    study_variance,
)
from quamba.report.compare import in_scale, verdict
from quamba.stages.summarize import Run, paired_table


def crossed(rng, seeds, items, effect, seed_sd, item_sd, noise_sd):
    """D[s, i] = effect + seed effect + item effect + noise."""
    return (effect + rng.normal(0, seed_sd, (seeds, 1)) + rng.normal(0, item_sd, (1, items))
            + rng.normal(0, noise_sd, (seeds, items)))


def binary_study(rng, seeds, items, effect, seed_sd):
    """0/1 answers of a baseline and a variant on the same items; the variant's rate moves by
    `effect` plus a per-seed shift."""
    easy = rng.uniform(0.2, 0.8, items)
    base = (rng.uniform(size=(seeds, items)) < easy).astype(float)
    shift = effect + rng.normal(0, seed_sd, (seeds, 1))
    variant = (rng.uniform(size=(seeds, items)) < np.clip(easy + shift, 0, 1)).astype(float)
    return variant, base


@pytest.mark.parametrize("effect, seed_sd, item_sd", [(0.5, 0.1, 1.0), (0.0, 0.3, 1.0), (0.2, 0.02, 0.3)])
def test_intervals_cover_the_truth_at_about_the_nominal_rate(effect, seed_sd, item_sd):
    rng = np.random.default_rng(7)
    results = [paired(crossed(rng, 3, 200, effect, seed_sd, item_sd, 1.0)) for _ in range(300)]
    coverage = np.mean([r.low <= effect <= r.high for r in results])
    assert 0.91 <= coverage <= 0.985, coverage  # nominal 0.95; 300 repetitions: +-0.025 is two standard errors
    if effect == 0:
        assert np.mean([r.p_value < 0.05 for r in results]) <= 0.09


def test_binary_items_with_seed_noise_cover_the_truth_and_zero_when_there_is_no_effect():
    rng = np.random.default_rng(11)
    runs = [binary_study(rng, 3, 500, 0.0, 0.01) for _ in range(300)]
    covers_zero = np.mean([(lambda r: r.low <= 0 <= r.high)(paired(v - b)) for v, b in runs])
    assert 0.92 <= covers_zero <= 0.99, covers_zero


def test_one_seed_is_a_paired_t_test_over_items():
    rng = np.random.default_rng(0)
    variant, base = rng.normal(0.1, 1, (1, 80)), rng.normal(0, 1, (1, 80))
    result = paired(variant - base)
    assert result.p_value == pytest.approx(stats.ttest_rel(variant[0], base[0]).pvalue, rel=1e-9)
    assert result.dof == 79 and math.isnan(result.seed_spread) and math.isnan(seeds_to_detect(result))


def test_seed_noise_alone_is_a_t_test_over_the_seed_means():
    rng = np.random.default_rng(1)
    differences = 0.3 + rng.normal(0, 1, (4, 1)) + np.zeros((4, 50))  # every item moves with its seed
    differences += rng.normal(0, 1e-9, differences.shape)
    result = paired(differences)
    want = stats.ttest_1samp(differences.mean(axis=1), 0.0)
    assert result.dof == pytest.approx(3, rel=1e-6) and result.p_value == pytest.approx(want.pvalue, rel=1e-5)
    assert result.seed_spread == pytest.approx(differences.mean(axis=1).std(ddof=1), rel=1e-12)


def test_results_are_deterministic_and_identical_runs_differ_by_exactly_zero():
    rng = np.random.default_rng(3)
    differences = crossed(rng, 3, 100, 0.1, 0.1, 1, 1)
    assert paired(differences) == paired(differences.copy())
    same = paired(np.zeros((3, 100)))
    assert (same.difference, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ConfigError, match="finite seeds x items"):
        paired(np.full((3, 4), np.nan))


def test_seeds_to_detect_is_the_fewest_seeds_whose_detectable_effect_is_small_enough():
    rng = np.random.default_rng(5)
    result = paired(crossed(rng, 3, 500, 0.05, 0.2, 0.5, 1.0))
    needed = int(seeds_to_detect(result, 0.3))
    def detectable(seeds):
        return detectable_effect(*(lambda v, d: (math.sqrt(v), d))(*study_variance(result.components, seeds, 500)))

    assert detectable(needed) <= 0.3 < detectable(needed - 1)
    assert math.isnan(seeds_to_detect(result, 0.0))


def test_mcnemar_counts_the_discordant_items():
    variant = np.array([[1, 1, 0, 0, 1], [1, 0, 0, 1, 1]], dtype=float)
    base = np.array([[1, 0, 0, 1, 0], [1, 0, 1, 1, 0]], dtype=float)
    gained, lost, p_value = mcnemar(variant, base)
    assert (gained, lost) == (3, 2) and p_value == pytest.approx(stats.binomtest(3, 5, 0.5).pvalue)
    assert mcnemar(variant + 0.5, base) is None


def test_the_verdict_line_reads_as_a_researcher_would_write_it():
    row = SimpleNamespace(model="mamba-130m", scheme="w8a8", alpha=1.0, baseline="0.9995", task="lambada_openai",
                          metric="acc", scale="fraction", difference=0.004, ci95_low=-0.003, ci95_high=0.011,
                          seeds=3, items=500, p_value=0.27, se=0.0035, seed_spread=0.006, detectable=0.009,
                          seeds_to_detect=14.0)
    assert verdict(row) == ("mamba-130m w8a8 alpha 1.0 vs 0.9995 (lambada_openai acc): +0.4 points [-0.3, +1.1] "
                            "over 3 seeds x 500 items, p = 0.27; seed spread 0.6; this study detects >= 0.9 points; "
                            "14 seeds would detect +0.4 points")
    ppl = SimpleNamespace(**{**vars(row), "task": "perplexity", "metric": "perplexity", "scale": "log",
                             "baseline": "fp16", "difference": math.log(1.01), "ci95_low": math.log(1.005),
                             "ci95_high": math.log(1.015), "p_value": 0.001, "seed_spread": math.log(1.002),
                             "detectable": math.log(1.004), "seeds": 1})
    assert verdict(ppl) == ("mamba-130m w8a8 alpha 1.0 vs fp16 (perplexity): +1.00% [+0.50%, +1.50%] over 1 seed "
                            "x 500 items, p = 0.001; one seed: the interval covers item noise only; "
                            "this study detects >= 0.40%")
    same = SimpleNamespace(**{**vars(row), "difference": 0.0, "se": 0.0})
    assert verdict(same) == "mamba-130m w8a8 alpha 1.0 vs 0.9995 (lambada_openai acc): no difference on any of 3 seeds x 500 items"


def run(scheme, alpha, seed, acc, ll, tokens, doc_ids=None):
    """A Run as read from a per-item file: quamba_mc acc and the perplexity task's loglikelihoods."""
    doc_ids = list(range(len(acc))) if doc_ids is None else doc_ids
    return Run(model="m", scheme=scheme, alpha=alpha, seed=seed, path=f"{scheme}-{alpha}-{seed}", tasks={
        "quamba_mc": {"doc_id": doc_ids, "metrics": {"acc,none": list(acc)}, "weights": {},
                      "aggregation": {"acc,none": "mean"}},
        "perplexity": {"doc_id": list(range(len(ll))), "metrics": {"perplexity,none": list(ll)},
                       "weights": {"perplexity,none": list(tokens)},
                       "aggregation": {"perplexity,none": "weighted_perplexity"}}})


def test_the_table_equals_a_direct_computation_from_the_items():
    rng = np.random.default_rng(9)
    items, docs, tokens = 40, 6, rng.integers(20, 90, 6).astype(float)
    fp16 = run("fp16", None, None, rng.integers(0, 2, items), -tokens * 4.0, tokens)
    runs = [fp16]
    for seed in (0, 1, 2):
        for alpha in (0.9995, 1.0):
            runs.append(run("w8a8", alpha, seed, rng.integers(0, 2, items), -tokens * rng.uniform(4, 4.2, docs),
                            tokens))
    table = paired_table(runs).set_index(["task", "comparison", "alpha"])
    by = {(r.alpha, r.seed): r for r in runs[1:]}
    accuracy = table.loc[("quamba_mc", "alpha", 1.0)]
    per_seed = [np.mean(by[1.0, s].tasks["quamba_mc"]["metrics"]["acc,none"])
                - np.mean(by[0.9995, s].tasks["quamba_mc"]["metrics"]["acc,none"]) for s in (0, 1, 2)]
    assert accuracy.difference == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert accuracy.seed_spread == pytest.approx(np.std(per_seed, ddof=1), rel=1e-9)
    assert (accuracy.baseline, accuracy.seeds, accuracy["items"], accuracy.scale) == ("0.9995", 3, items, "fraction")

    def log_ppl(r):
        entry = r.tasks["perplexity"]
        return -sum(entry["metrics"]["perplexity,none"]) / sum(entry["weights"]["perplexity,none"])

    ppl = table.loc[("perplexity", "fp16", 0.9995)]
    want = np.mean([log_ppl(by[0.9995, s]) - log_ppl(fp16) for s in (0, 1, 2)])
    assert ppl.difference == pytest.approx(want, rel=1e-9) and ppl.scale == "log" and ppl["items"] == docs
    assert math.isnan(ppl.gained) and len(table) == 2 * 3  # per task: 2 alphas vs fp16, 1 alpha pair


def test_runs_that_scored_other_items_are_refused_naming_both():
    a = run("w8a8", 1.0, 0, [1, 0, 1], [-1.0], [1.0])
    b = run("w8a8", 0.9995, 0, [1, 0, 1, 1], [-1.0], [1.0])
    with pytest.raises(ConfigError, match=r"w8a8-0.9995-0: task quamba_mc scored other items than w8a8-1.0-0"):
        paired_table([a, b])


def test_a_ratio_metric_is_compared_per_token_not_per_document_length():
    """Documents of very different lengths whose every token got 0.01 nats worse: the difference
    is exactly 0.01 in log-perplexity with no item noise at all (the lengths are not noise)."""
    tokens = np.array([10.0, 400.0, 35.0, 1600.0])
    base = -tokens * 4.0
    differences = np.stack([0.01 * tokens, 0.01 * tokens])  # two seeds, the same shift
    z = linearized(differences, tokens)
    assert z.mean(axis=1) == pytest.approx([0.01, 0.01], abs=1e-15) and np.ptp(z) == pytest.approx(0, abs=1e-15)
    fp16 = run("fp16", None, None, [1], base, tokens)
    variants = [run("w8a8", 1.0, seed, [1], base - 0.01 * tokens * (1 + 0.1 * seed), tokens) for seed in (0, 1)]
    row = paired_table([fp16, *variants]).set_index("task").loc["perplexity"]
    want = np.mean([0.01 * (1 + 0.1 * seed) for seed in (0, 1)])
    assert row.difference == pytest.approx(want, rel=1e-12)
    other = run("w8a8", 1.0, 2, [1], base, tokens + 1)
    with pytest.raises(ConfigError, match=r"weighs its items otherwise than fp16-None-None \(another tokenizer\?\)"):
        paired_table([fp16, other])


def test_a_given_effect_is_answered_with_the_seeds_that_would_detect_it():
    rng = np.random.default_rng(5)
    result = paired(crossed(rng, 3, 500, 0.05, 0.02, 0.1, 0.3))
    components = result.components
    row = SimpleNamespace(model="m", scheme="w8a8", alpha=1.0, baseline="0.9995", task="t", metric="acc",
                          scale="fraction", difference=result.difference, ci95_low=result.low, ci95_high=result.high,
                          seeds=3, items=500, p_value=result.p_value, se=result.se, seed_spread=result.seed_spread,
                          detectable=result.detectable, seeds_to_detect=seeds_to_detect(result),
                          var_seed=components.seed, var_item=components.item, var_residual=components.residual)
    needed = int(seeds_to_detect(result, 0.04))
    assert verdict(row, effect=4.0).endswith(f"; {needed} seeds would detect 4.0 points")
    assert verdict(row).count("seeds would detect") <= 1
    assert in_scale(1.0, "log") == pytest.approx(math.log(1.01)) and in_scale(2.0, "fraction") == 0.02
