"""`quamba view`: a calibration dir as a table a person can read, alphas side by side.

Per alpha it shows both what the recipe's observer does and the alpha-free truth beside it: the
threshold (Quamba's percentile EMA at percentile taps, so "1.0" still clips there), the stream's
own alpha-quantile of |x| (within 1/64), and the share of the whole stream the threshold clips.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from quamba.errors import ConfigError
from quamba.formats.calibration import read_stats, stats_path
from quamba.formats.layout import alpha_key
from quamba.stages.scales import derive_scales

DEFAULT_ALPHAS = (0.9995, 1.0)  # Quamba's alpha, and the seed note's "no clipping"


def _alpha_columns(entry: dict, alpha: float) -> dict[tuple[str, str], float]:
    label = f"a={alpha_key(alpha)}"
    return {(label, "threshold"): entry["threshold"],
            (label, "stream q"): entry["stream_percentile"]["high"],
            (label, "clipped %"): 100 * entry["clipped_fraction"],
            (label, "reduction %"): 100 * entry["range_reduction"]}


def _scales(calib: str | Path, alphas: list[float], alpha_one: str, taps: list[str]) -> dict[float, dict]:
    return {alpha: derive_scales(calib, alpha, alpha_one, taps)["taps"] for alpha in alphas}


def stats_table(calib: str | Path, alphas: list[float], alpha_one: str = "quamba",
                filter_text: str | None = None) -> pd.DataFrame:
    """One row per tap: observer and range before clipping, then per alpha the threshold, the
    stream's alpha-quantile, the share of values clipped and the range reduction."""
    doc = read_stats(calib)
    taps = [name for name in doc["taps"] if not filter_text or filter_text in name]
    scales = _scales(calib, alphas, alpha_one, taps)
    rows = {}
    for name in taps:
        tap = doc["taps"][name]
        row = {("", "observer"): tap["observer"], ("", "min"): tap["min"], ("", "max"): tap["max"],
               ("", "range"): tap["max"] - tap["min"]}
        for alpha in alphas:
            row.update(_alpha_columns(scales[alpha][name], alpha))
        rows[name] = row
    return _frame(rows)


def _frame(rows: dict[str, dict]) -> pd.DataFrame:
    """Rows in forward (tap) order, two-level column headers: alpha, quantity."""
    table = pd.DataFrame(list(rows.values()), index=list(rows))
    if not table.empty:
        table.columns = pd.MultiIndex.from_tuples(table.columns)
    return table


def compare_table(a: str | Path, b: str | Path, alphas: list[float], alpha_one: str = "quamba",
                  filter_text: str | None = None) -> pd.DataFrame:
    """Per tap of both calibrations and alpha: range after clipping and clipped share in both."""
    doc_a, doc_b = read_stats(a), read_stats(b)
    taps = [name for name in doc_a["taps"] if name in doc_b["taps"] and (not filter_text or filter_text in name)]
    scales_a, scales_b = _scales(a, alphas, alpha_one, taps), _scales(b, alphas, alpha_one, taps)
    rows = {}
    for name in taps:
        tap_a, tap_b = doc_a["taps"][name], doc_b["taps"][name]
        row = {("", "range A"): tap_a["max"] - tap_a["min"], ("", "range B"): tap_b["max"] - tap_b["min"]}
        for alpha in alphas:
            ca, cb, label = scales_a[alpha][name], scales_b[alpha][name], f"a={alpha_key(alpha)}"
            row[(label, "range A")] = ca["clipped_range"]
            row[(label, "range B")] = cb["clipped_range"]
            row[(label, "B/A")] = cb["clipped_range"] / ca["clipped_range"] if ca["clipped_range"] else float("nan")
            row[(label, "clipped % A")] = 100 * ca["clipped_fraction"]
            row[(label, "clipped % B")] = 100 * cb["clipped_fraction"]
        rows[name] = row
    return _frame(rows)


def header(doc: dict, label: str = "") -> str:
    recipe = doc["recipe"]
    departures = ", ".join(f"{k}={recipe['options'][k]}" for k in recipe["departures"]) or "none"
    return (f"{label}{doc['model']['path']} ({doc['model']['layer']}, {doc['model']['n_layer']} layers): "
            f"{doc['num_samples']} samples of up to {doc['seq_len']} tokens ({doc['data']['tokens']} in all) of "
            f"{doc['data']['source']}, batch {doc['batch_size']}, seed {doc['seed']}; recipe {recipe['name']} "
            f"(departures: {departures}); alphas >= {doc['min_alpha']} answerable")


LEGEND = ("threshold: where the recipe's observer clips |x| (scale = threshold / 127); stream q: the alpha-quantile "
          "of |x| over the whole calibration stream (upper end of a 1/64-wide bracket); clipped %: share of the "
          "stream above the threshold")


def render(path: str | Path, alphas: list[float] | None = None, alpha_one: str = "quamba",
           filter_text: str | None = None, compare: str | Path | None = None) -> str:
    alphas = list(alphas or DEFAULT_ALPHAS)
    if len(set(alphas)) < len(alphas) or not all(math.isfinite(a) and 0 < a <= 1 for a in alphas):
        raise ConfigError(f"alphas: {alphas}; allowed: distinct numbers in (0, 1], as quantization.alphas of a study")
    path = stats_path(path).parent
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.max_rows", None,
                           "display.float_format", "{:.4g}".format):
        if compare is None:
            table = stats_table(path, alphas, alpha_one, filter_text)
            return (header(read_stats(path)) + "\n" + LEGEND + "\n\n"
                    + (table.to_string() if not table.empty else "(no tap matches)"))
        other = stats_path(compare).parent
        table = compare_table(path, other, alphas, alpha_one, filter_text)
        return (header(read_stats(path), "A: ") + "\n" + header(read_stats(other), "B: ") + "\n\n"
                + (table.to_string() if not table.empty else "(no shared tap matches)"))
