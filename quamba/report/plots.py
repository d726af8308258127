"""The study's plots (PNG, matplotlib's Agg backend: no display needed).

- accuracy_vs_alpha: per model and task, each scheme's metric at every alpha: one dot per seed,
  the mean with a +-std bar, FP16 as a dashed line. The seed spread is the point of the study.
- clipping_ranges: per layer, the SSM input's range before clipping and after it at each alpha.
- paired_differences: a forest plot of paired.csv: each comparison's difference with its 95%
  interval (seeds x items), per model and task, in points of accuracy or percent of perplexity.
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

from quamba.formats.calibration import read_activation_samples, read_stats
from quamba.formats.scales import read_scales
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
    """Per model and task: schemes with an alpha as dots per seed and mean +- std per alpha;
    schemes without one (w4a16) as a dotted reference line per seed and a solid mean; FP16 dashed."""
    models, tasks = sorted(accuracy.model.unique()), sorted(accuracy.task.unique())
    fig, axes = plt.subplots(len(models), len(tasks), figsize=(4.2 * len(tasks), 3.4 * len(models)),
                             squeeze=False, layout="constrained")
    alphas = sorted(a for a in accuracy.alpha.dropna().unique())
    quantized = accuracy[accuracy.scheme != "fp16"]
    with_alpha = sorted(quantized[quantized.alpha.notna()].scheme.unique())
    without_alpha = sorted(set(quantized[quantized.alpha.isna()].scheme) - set(with_alpha))
    colors = dict(zip([*with_alpha, *without_alpha], plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    for i, model in enumerate(models):
        for j, task in enumerate(tasks):
            ax, rows = axes[i][j], accuracy[(accuracy.model == model) & (accuracy.task == task)]
            if rows.empty:
                ax.set_visible(False)
                continue
            metric = _main_metric(rows)
            rows = rows[rows.metric == metric]
            for k, scheme in enumerate(with_alpha):
                runs = rows[rows.scheme == scheme]
                offset = (k - (len(with_alpha) - 1) / 2) * 0.12
                ax.scatter(runs.alpha.map(alphas.index) + offset, runs.value, s=14, alpha=0.6, color=colors[scheme])
                stats = runs.groupby("alpha")["value"].agg(["mean", "std"]).reindex(alphas)
                ax.errorbar(np.arange(len(alphas)) + offset, stats["mean"], yerr=stats["std"].fillna(0), fmt="-o",
                            color=colors[scheme], capsize=3, label=f"{scheme} (mean +- std)")
            for scheme in without_alpha:
                runs = rows[rows.scheme == scheme]
                for n, value in enumerate(runs.value):
                    ax.axhline(value, color=colors[scheme], linestyle=":", linewidth=0.8, alpha=0.7,
                               label=f"{scheme}, each seed (no alpha)" if n == 0 else None)
                if not runs.empty:
                    ax.axhline(runs.value.mean(), color=colors[scheme], linewidth=1.5, label=f"{scheme} mean")
            fp16 = rows[rows.scheme == "fp16"]
            if not fp16.empty:
                ax.axhline(fp16.value.iloc[0], color="black", linestyle="--", linewidth=1, label="fp16")
            ax.set_xticks(range(len(alphas)), [alpha_label(a) for a in alphas])
            ax.set_title(f"{model}: {task}", fontsize=10)
            ax.set_xlabel("percentile alpha")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="outside lower center", ncols=min(len(labels), 4) or 1)
    fig.suptitle("Metric vs alpha: dots are GPTQ seeds, bars mean +- std", fontsize=11)
    _save(fig, out)


def clipping_ranges(clipping: pd.DataFrame, out: Path) -> None:
    """Per model: the SSM input's range per layer before clipping and after it at each alpha."""
    ssm = clipping[clipping.tap.str.split(".").str[-1].isin(SSM_INPUT_POINTS)]
    models = sorted(ssm.model.unique()) or ["(no SSM-input taps)"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.6), squeeze=False, layout="constrained")
    for ax, model in zip(axes[0], models):
        rows = ssm[ssm.model == model]
        if rows.empty:
            continue
        before = rows.groupby("layer")[["min", "max"]].first()
        ax.plot(before.index, before["max"] - before["min"], "k-o", label="before clipping")
        for (alpha, group), marker in zip(rows.groupby("alpha"), "svd^<>p*"):
            after = group.groupby("layer")["clipped_range"].first()
            ax.plot(after.index, after, f"--{marker}", label=f"alpha {alpha_label(alpha)}")
        ax.set_yscale("log")
        ax.set_title(f"{model}: SSM input range per layer", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel("max - min (log scale)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, out)


def paired_differences(paired: pd.DataFrame, out: Path) -> None:
    """Forest plot: per model and task (its main metric), one row per comparison, the mean paired
    difference with its 95% interval; colour says the scheme, the marker what it is compared with."""
    panels = []
    for (model, task), rows in paired.groupby(["model", "task"], sort=True):
        metric = _main_metric(rows)
        panels.append((model, task, metric, rows[rows.metric == metric].reset_index(drop=True)))
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.2 * max(len(panels), 1), 0.5 + 0.45 * max(
        [len(p[3]) for p in panels] or [4]) + 1.4), squeeze=False, layout="constrained")
    schemes = sorted(paired.scheme.unique()) if not paired.empty else []
    colors = dict(zip(schemes, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    markers = {"alpha": "o", "fp16": "s"}
    for ax, (model, task, metric, rows) in zip(axes[0], panels):
        fraction = (rows.scale == "fraction").all()
        shown = (lambda v: 100 * v) if fraction else (lambda v: 100 * np.expm1(v))
        for k, row in enumerate(rows.itertuples()):
            center, low, high = shown(row.difference), shown(row.ci95_low), shown(row.ci95_high)
            error = [[center - low], [high - center]] if np.isfinite(low) else None
            ax.errorbar(center, k, xerr=error, fmt=markers[row.comparison], color=colors[row.scheme], capsize=3)
        labels = [f"{r.scheme}{'' if pd.isna(r.alpha) else f' {alpha_label(r.alpha)}'} vs {r.baseline}"
                  for r in rows.itertuples()]
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(f"{model}: {task}" + ("" if metric == task else f" {metric}"), fontsize=10)
        ax.set_xlabel("difference (points of accuracy)" if fraction else "difference (% of perplexity)")
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[s], marker="o", linestyle="", label=s) for s in schemes]
    handles += [plt.Line2D([], [], color="0.4", marker=markers[kind], linestyle="", label=label)
                for kind, label in (("alpha", "vs a smaller alpha, same seeds"), ("fp16", "vs FP16"))]
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=min(len(handles), 5))
    fig.suptitle("Paired differences, mean over seeds, 95% interval over seeds x items", fontsize=11)
    _save(fig, out)


def activation_histograms(stats_path: Path, npz_path: Path, scales_paths: list[Path], out: Path,
                          layers: int = 3) -> None:
    """The sampled SSM-input activations of the first layers, with each alpha's +-threshold."""
    stats = read_stats(stats_path)
    scales = sorted((read_scales(path) for path in scales_paths), key=lambda doc: doc["alpha"])
    samples = read_activation_samples(npz_path, stats,
                                      lambda t: t.split(".")[-1] in SSM_INPUT_POINTS and t in stats["taps"])
    taps = sorted(samples, key=lambda t: int(t.split(".")[0].removeprefix("layer_")))[:layers]
    fig, axes = plt.subplots(1, max(len(taps), 1), figsize=(4.2 * max(len(taps), 1), 3.6), squeeze=False,
                             layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, tap in zip(axes[0], taps):
        values = samples[tap]
        ax.hist(values, bins=120, color="0.6", log=True, label="sampled values")
        for k, doc in enumerate(scales):
            clip = doc["taps"][tap]
            style = {"color": colors[k % len(colors)], "linestyle": ("--", "-.", ":", (0, (5, 1)))[k % 4],
                     "linewidth": 1.2}
            ax.axvline(clip["threshold"], label=f"alpha {alpha_label(doc['alpha'])}: "
                                                f"{100 * clip['clipped_fraction']:.3f}% clipped", **style)
            ax.axvline(-clip["threshold"], **style)
        ax.set_title(f"{tap} ({values.size} samples)", fontsize=9)
        ax.set_xlabel("activation value")
        ax.set_ylabel("count (log scale)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=1, frameon=False)
    fig.suptitle(f"{stats['model']['layer']}: SSM input samples and each alpha's clipping threshold (+-)", fontsize=10)
    _save(fig, out)
