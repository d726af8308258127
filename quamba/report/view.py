"""`quamba view`: a stats.json as a table a person can read, alphas side by side."""

from __future__ import annotations

import pandas as pd

from quamba.formats.stats import read_stats


def _alpha_columns(tap: dict, alpha: str) -> dict[str, float]:
    a = tap["alphas"][alpha]
    return {(f"a={alpha}", "threshold"): a["threshold"],
            (f"a={alpha}", "range"): a["clipped_range"],
            (f"a={alpha}", "clipped %"): 100 * a["clipped_fraction"],
            (f"a={alpha}", "reduction %"): 100 * a["range_reduction"]}


def stats_table(doc: dict, filter_text: str | None = None) -> pd.DataFrame:
    """One row per tap: observer, range before clipping, then per alpha the threshold,
    range after clipping, share of values clipped and range reduction."""
    rows = {}
    for name, tap in doc["taps"].items():
        if filter_text and filter_text not in name:
            continue
        row = {("", "observer"): tap["observer"], ("", "min"): tap["min"], ("", "max"): tap["max"],
               ("", "range"): tap["max"] - tap["min"]}
        for alpha in tap["alphas"]:
            row.update(_alpha_columns(tap, alpha))
        rows[name] = row
    return _frame(rows)


def _frame(rows: dict[str, dict]) -> pd.DataFrame:
    """Rows in forward (tap) order, two-level column headers: alpha, quantity."""
    table = pd.DataFrame(list(rows.values()), index=list(rows))
    if not table.empty:
        table.columns = pd.MultiIndex.from_tuples(table.columns)
    return table


def compare_table(a: dict, b: dict, filter_text: str | None = None) -> pd.DataFrame:
    """Per tap and shared alpha: range after clipping and clipped share in both files."""
    rows = {}
    for name, tap_a in a["taps"].items():
        tap_b = b["taps"].get(name)
        if tap_b is None or (filter_text and filter_text not in name):
            continue
        row = {("", "range A"): tap_a["max"] - tap_a["min"], ("", "range B"): tap_b["max"] - tap_b["min"]}
        for alpha in tap_a["alphas"]:
            if alpha not in tap_b["alphas"]:
                continue
            ca, cb = tap_a["alphas"][alpha], tap_b["alphas"][alpha]
            row[(f"a={alpha}", "range A")] = ca["clipped_range"]
            row[(f"a={alpha}", "range B")] = cb["clipped_range"]
            row[(f"a={alpha}", "B/A")] = cb["clipped_range"] / ca["clipped_range"] if ca["clipped_range"] else float("nan")
            row[(f"a={alpha}", "clipped % A")] = 100 * ca["clipped_fraction"]
            row[(f"a={alpha}", "clipped % B")] = 100 * cb["clipped_fraction"]
        rows[name] = row
    return _frame(rows)


def header(doc: dict, label: str = "") -> str:
    return (f"{label}{doc['model']['path']} ({doc['model']['layer']}, {doc['model']['n_layer']} layers): "
            f"{doc['num_samples']} x {doc['seq_len']} tokens of {doc['data']['source']}, "
            f"batch {doc['batch_size']}, seed {doc['seed']}; Quamba's default alpha {doc['default_alpha']}")


def render(path: str, filter_text: str | None = None, compare: str | None = None) -> str:
    doc = read_stats(path)
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.max_rows", None,
                           "display.float_format", "{:.4g}".format):
        if compare is None:
            table = stats_table(doc, filter_text)
            return header(doc) + "\n\n" + (table.to_string() if not table.empty else "(no tap matches)")
        other = read_stats(compare)
        table = compare_table(doc, other, filter_text)
        return (header(doc, "A: ") + "\n" + header(other, "B: ") + "\n\n"
                + (table.to_string() if not table.empty else "(no shared tap matches)"))
