"""The study's plots (PNG, matplotlib's Agg backend: no display needed).

- accuracy_vs_alpha: per model and task, each scheme's metric at every alpha: one dot per seed,
  the mean with a +-std bar, FP16 as a dashed line. The seed spread is the point of the study.
- clipping_ranges: per layer, the SSM input's range before clipping and after it at each alpha.
- activation_histograms: the sampled activations (activations.npz) of the first layers' SSM
  inputs with each alpha's clipping threshold drawn.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from quamba.formats.stats import read_stats
from quamba.io import atomic_path
from quamba.stages.summarize import SSM_INPUT_POINTS, alpha_label

MAIN_METRICS = ("acc", "perplexity")  # the metric plotted per task: the first it reports


def _save(fig: plt.Figure, path: Path) -> None:
    """PNG written atomically; fixed metadata so equal data gives equal bytes."""
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)


def _main_metric(rows: pd.DataFrame) -> str:
    metrics = set(rows.metric)
    return next((m for m in MAIN_METRICS if m in metrics), min(metrics))


def accuracy_vs_alpha(accuracy: pd.DataFrame, out: Path) -> None:
    models, tasks = sorted(accuracy.model.unique()), sorted(accuracy.task.unique())
    fig, axes = plt.subplots(len(models), len(tasks), figsize=(4.2 * len(tasks), 3.4 * len(models)),
                             squeeze=False, layout="constrained")
    alphas = sorted(a for a in accuracy.alpha.dropna().unique())
    schemes = sorted(s for s in accuracy.scheme.unique() if s != "fp16")
    for i, model in enumerate(models):
        for j, task in enumerate(tasks):
            ax, rows = axes[i][j], accuracy[(accuracy.model == model) & (accuracy.task == task)]
            if rows.empty:
                ax.set_visible(False)
                continue
            metric = _main_metric(rows)
            rows = rows[rows.metric == metric]
            for k, scheme in enumerate(schemes):
                runs = rows[rows.scheme == scheme]
                offset = (k - (len(schemes) - 1) / 2) * 0.12
                x = runs.alpha.map(alphas.index) + offset
                line = ax.scatter(x, runs.value, s=14, alpha=0.6)
                stats = runs.groupby("alpha")["value"].agg(["mean", "std"]).reindex(alphas)
                ax.errorbar(np.arange(len(alphas)) + offset, stats["mean"], yerr=stats["std"].fillna(0), fmt="-o",
                            color=line.get_facecolor()[0], alpha=1.0, capsize=3, label=scheme)
            fp16 = rows[rows.scheme == "fp16"]
            if not fp16.empty:
                ax.axhline(fp16.value.iloc[0], color="black", linestyle="--", linewidth=1, label="fp16")
            ax.set_xticks(range(len(alphas)), [alpha_label(a) for a in alphas])
            ax.set_title(f"{model}: {task}", fontsize=10)
            ax.set_xlabel("alpha")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle("Metric vs alpha: dots are seeds, bars mean +- std", fontsize=11)
    _save(fig, out)


def clipping_ranges(clipping: pd.DataFrame, out: Path, calib: str | None = None) -> None:
    """calib: the calibration setting to show (default: all rows, which must then be one setting)."""
    if calib is not None:
        clipping = clipping[clipping.calib == calib]
    ssm = clipping[clipping.tap.str.split(".").str[-1].isin(SSM_INPUT_POINTS)]
    models = sorted(ssm.model.unique()) or ["(no SSM-input taps)"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.6), squeeze=False, layout="constrained")
    for ax, model in zip(axes[0], models):
        rows = ssm[ssm.model == model]
        if rows.empty:
            continue
        first_alpha = rows[rows.alpha == rows.alpha.min()]
        before = first_alpha.groupby("layer")[["min", "max"]].first()
        ax.plot(before.index, before["max"] - before["min"], "k-o", label="before clipping")
        for alpha, group in rows.groupby("alpha"):
            if alpha == 1.0:
                continue
            after = group.groupby("layer")["clipped_range"].first()
            ax.plot(after.index, after, "-o", label=f"alpha {alpha_label(alpha)}")
        ax.set_yscale("log")
        ax.set_title(f"{model}: SSM input range per layer", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel("max - min")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, out)


def activation_histograms(stats_path: Path, npz_path: Path, out: Path, layers: int = 3) -> None:
    stats = read_stats(stats_path)
    with np.load(npz_path) as npz:
        taps = [t for t in npz.files if t.split(".")[-1] in SSM_INPUT_POINTS and t in stats["taps"]]
        taps = sorted(taps, key=lambda t: int(t.split(".")[0].removeprefix("layer_")))[:layers]
        samples = {t: npz[t].astype(np.float64).ravel() for t in taps}
    fig, axes = plt.subplots(1, max(len(taps), 1), figsize=(4.2 * max(len(taps), 1), 3.2), squeeze=False, layout="constrained")
    for ax, tap in zip(axes[0], taps):
        values = samples[tap]
        ax.hist(values, bins=120, color="0.55", log=True)
        for alpha, clip in sorted(stats["taps"][tap]["alphas"].items()):
            line = ax.axvline(clip["threshold"], linestyle="--", linewidth=1,
                              label=f"alpha {alpha} ({100 * clip['clipped_fraction']:.3f}% clipped)")
            ax.axvline(-clip["threshold"], linestyle="--", linewidth=1, color=line.get_color())
        ax.set_title(f"{tap} ({values.size} samples)", fontsize=9)
        ax.set_xlabel("activation")
        ax.legend(fontsize=7)
    fig.suptitle(f"{stats['model']['layer']}: SSM input samples and clipping thresholds", fontsize=10)
    _save(fig, out)
