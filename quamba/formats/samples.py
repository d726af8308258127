"""Per-item results of one evaluation, owned here: `{results}.samples.json.gz` beside its results JSON.

lm-eval's `log_samples` output reduced to what paired statistics need, per task and filter:

    {"schema_version": 1, "kind": "quamba-eval-samples",
     "tasks": {"quamba_mc": {"doc_id": [0, 1, ...],
                             "metrics": {"acc,none": [1.0, 0.0, ...], ...},
                             "weights": {},                      # weighted metrics: their denominators
                             "aggregation": {"acc,none": "mean", ...},
                             "loglikelihoods": [[-12.1, -14.0, -13.2, -15.9], ...]}}}

A metric lm-eval scores per item as a (value, weight) pair, e.g. perplexity's (loglikelihood,
tokens), keeps the value under `metrics` and the weight under `weights`. `aggregation` is the
name of lm-eval's aggregation of that metric, so a reader knows what the items add up to.
`loglikelihoods` holds each item's request loglikelihoods (one per choice, per window set, or
per target), where the task's requests return numbers. gzip with no timestamp and sorted keys:
the same evaluation gives the same bytes.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

from quamba.errors import ConfigError
from quamba.formats.layout import SAMPLES_SUFFIX
from quamba.io import atomic_path

SCHEMA_VERSION = 1
KIND = "quamba-eval-samples"


def samples_path(results_json: str | Path) -> Path:
    """Where the per-item file of a results JSON lives: eval/quamba_mc.json -> eval/quamba_mc.samples.json.gz."""
    results_json = Path(results_json)
    return results_json.with_name(results_json.name.removesuffix(".json") + SAMPLES_SUFFIX)


def _number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _loglikelihoods(response: Any) -> list[float] | None:
    """The numbers of one request's filtered response: (ll, is_greedy) -> ll, a rolling ll -> ll."""
    if isinstance(response, (list, tuple)) and response and isinstance(response[0], (int, float)):
        return [_number(response[0])]
    if isinstance(response, (int, float)) and not isinstance(response, bool):
        return [_number(response)]
    return None


def reduce_samples(samples: dict[str, list[dict[str, Any]]], aggregations: dict[str, dict[str, str]]) -> dict:
    """lm-eval's `samples` (task -> logged samples) as this file's content. `aggregations` names
    lm-eval's aggregation per task and metric (metric names without the filter)."""
    tasks: dict[str, Any] = {}
    for task, logged in sorted(samples.items()):
        entry: dict[str, Any] = {"doc_id": [], "metrics": {}, "weights": {}, "aggregation": {},
                                 "loglikelihoods": []}
        first_filter = logged[0]["filter"] if logged else None
        for sample in sorted(logged, key=lambda s: (s["filter"], s["doc_id"])):
            key = sample["filter"]
            if key == first_filter:
                entry["doc_id"].append(int(sample["doc_id"]))
                lls = [_loglikelihoods(r) for r in sample["filtered_resps"]]
                entry["loglikelihoods"].append(None if None in lls else [ll for got in lls for ll in got])
            for metric in sample["metrics"]:
                value, name = sample[metric], f"{metric},{key}"
                entry["aggregation"].setdefault(name, aggregations.get(task, {}).get(metric, "mean"))
                if isinstance(value, (list, tuple)):
                    entry["metrics"].setdefault(name, []).append(_number(value[0]))
                    entry["weights"].setdefault(name, []).append(_number(value[1]))
                elif isinstance(value, (int, float)):
                    entry["metrics"].setdefault(name, []).append(_number(value))
        if all(lls is None for lls in entry["loglikelihoods"]):
            entry["loglikelihoods"] = []
        tasks[task] = entry
    return {"schema_version": SCHEMA_VERSION, "kind": KIND, "tasks": tasks}


def write_samples(path: str | Path, content: dict[str, Any]) -> None:
    """Atomically, as deterministic gzip (no name, no timestamp) of sorted-key JSON."""
    raw = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f, gzip.GzipFile(
            filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as out:
        out.write(raw)


def read_samples(path: str | Path) -> dict[str, Any]:
    """A per-item file, checked: every metric list as long as its doc ids, no doc id twice."""
    path = Path(path)
    try:
        content = json.loads(gzip.decompress(path.read_bytes()))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: unreadable per-item results ({err}); rerun the evaluation that writes it") from None
    if not isinstance(content, dict) or content.get("kind") != KIND or content.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"{path}: not a per-item results file of schema version {SCHEMA_VERSION}; "
                          f"rerun the evaluation that writes it")
    for task, entry in content["tasks"].items():
        items = len(entry["doc_id"])
        if len(set(entry["doc_id"])) != items:
            raise ConfigError(f"{path}: task {task} lists a doc id twice")
        for name, values in [*entry["metrics"].items(), *entry["weights"].items()]:
            if len(values) != items:
                raise ConfigError(f"{path}: task {task} metric {name} has {len(values)} values for {items} items")
    return content
