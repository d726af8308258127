"""The `evaluate` stage: lm-eval tasks (held-out perplexity among them) on one model dir, one
results JSON and, beside it, the per-item results (quamba.formats.samples).

    from quamba.stages.evaluate import evaluate
    evaluate("results/mamba1-demo/fp16/model", ["quamba_mc"], Path("mc.json"))
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from quamba import perplexity
from quamba.data import TOKENIZER_FILES
from quamba.errors import ConfigError, ResultError
from quamba.formats.quantized_dir import read_quant_config
from quamba.formats.samples import reduce_samples, samples_path, write_samples
from quamba.io import package_versions, sha256_files, write_json
from quamba.lm_eval_model import QuambaLM, check_model_dir, positive_int
from quamba.models.checkpoint import CONFIG_FILE, model_sha256, weight_files
from quamba.models.load import parse_dtype, resolve_device
from quamba.recipe import QUAMBA_LM_EVAL, known_departures
from quamba.shipped import ROOT, TASKS_DIR

PERPLEXITY_TASK = perplexity.TASK
# lm-eval's output sections that describe the tasks and their scores; the rest (dates, git hash,
# timings, model info, samples) would make two identical runs differ.
LM_EVAL_SECTIONS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
                    "higher_is_better", "n-samples")
SCHEMA_VERSION = 1
log = logging.getLogger(__name__)  # a job's log file (quamba.logs.job_log) gets its phase timings


# -- tasks ---------------------------------------------------------------------------------------
def split_tasks(tasks: Sequence[str]) -> tuple[list[str], list[Path | None], Any]:
    """lm-eval task names, perplexity files (None: the default), and a TaskManager that knows the
    names. Unknown names fail here, before any model work, naming the task and what is allowed."""
    if not tasks:
        raise ConfigError("tasks: empty; name at least one lm-eval task, quamba_offline, or perplexity")
    if len(set(tasks)) < len(tasks):
        raise ConfigError(f"tasks: {list(tasks)} names a task twice")
    names, files = [], []
    for task in tasks:
        if task == PERPLEXITY_TASK or task.startswith(PERPLEXITY_TASK + ":"):
            data = task.partition(":")[2]
            if data and not Path(data).is_file():
                raise ConfigError(f"task {task!r}: {data} is not a file; perplexity:FILE takes a .txt or .jsonl file")
            if data and Path(data).suffix not in (".txt", ".jsonl"):
                raise ConfigError(f"task {task!r}: {data} is no .txt or .jsonl file; perplexity:FILE takes one")
            files.append(Path(data) if data else None)
        else:
            names.append(task)
    return names, files, task_manager(names)


@functools.cache
def _indexed_task_manager():
    """lm-eval's whole task index with the offline tasks, built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))


def task_manager(names: Sequence[str]):
    """A TaskManager for `names`. Indexing lm-eval's ~15k bundled tasks takes seconds, so the
    offline tasks alone are tried first."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    if all(name in manager.all_tasks for name in names):
        return manager
    manager = _indexed_task_manager()
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            raise ConfigError(f"task {name!r}: unknown; allowed: an lm-eval task, group or tag name "
                              f"(`lm-eval ls tasks`), the offline tasks quamba_cloze and quamba_mc "
                              f"(tag quamba_offline), or perplexity[:FILE]"
                              + (f"; did you mean {', '.join(close)}?" if close else ""))
    return manager


# -- results -------------------------------------------------------------------------------------
def model_provenance(model_dir: Path, shown_as: str) -> dict[str, Any]:
    """What was evaluated: the dir as named, hashes of its weights and tokenizer, its quantization.
    The weights' hash comes from the dir's hash record where it is current (model_sha256): the
    same value, without reading gigabytes in every evaluation job."""
    files = [model_dir / CONFIG_FILE, *weight_files(model_dir)]
    tokenizer = [model_dir / name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    quant_config = model_dir / "quant_config.json"
    return {"path": shown_as, "files": sorted(p.name for p in files), "sha256": model_sha256(model_dir),
            "tokenizer_sha256": sha256_files(tokenizer),
            "quant_config": read_quant_config(model_dir) if quant_config.is_file() else None}


def plain_json(value: Any) -> Any:
    """lm-eval's output as strict, stable JSON: NaN/inf become null, paths inside the repo
    repo-relative (the file must not depend on the clone's location), callables their qualified
    name (a repr would carry a memory address), anything else unknown its str()."""
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str) and value.startswith(f"{ROOT}/"):
        return value.removeprefix(f"{ROOT}/")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return plain_json(value.item())
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
    return str(value)


def check_finite_metrics(results: dict[str, dict[str, Any]], model_dir: Path) -> None:
    """A metric that is NaN or inf is a broken model or input, never a result: fail naming it.
    (Standard errors may be undefined, e.g. over one document; they are written as null.)"""
    for task, metrics in results.items():
        for metric, value in metrics.items():
            if "stderr" in metric or isinstance(value, bool):
                continue
            number = value.item() if hasattr(value, "item") else value
            if isinstance(number, (int, float)) and not math.isfinite(number):
                raise ResultError(f"{model_dir}: task {task} metric {metric} is {number}, not a finite number; "
                                  f"nothing was written (check the model's weights and its quantization scales)")


LM_EVAL_SEEDS = {"random": 0, "numpy": 1234, "torch": 1234, "fewshot": 1234}  # simple_evaluate's defaults


def evaluate(model_dir: str | Path, tasks: Sequence[str], out: Path, batch_size: int = 8,
             limit: int | None = None, device: str | None = None, dtype: str | None = None,
             num_fewshot: int = 0, seed: int | None = None, progress: bool = True,
             perplexity_tokens: int | None = None, softmax_dtype: str | None = None) -> dict[str, Any]:
    """Run `tasks` on a model dir and write one JSON to `out` (atomically); returns its content.

    tasks: lm-eval task/group/tag names (the offline quamba_cloze and quamba_mc included), and
    `perplexity` or `perplexity:FILE` for held-out perplexity (the lm-eval task of quamba.perplexity;
    perplexity_tokens: its token budget). Every input is checked before the model is loaded; a bad
    one raises ConfigError/CheckpointError and writes nothing. The per-item results go beside `out`
    (quamba.formats.samples.samples_path). Neither file holds dates or timings, so a rerun on the
    same device gives the same bytes.

    seed: None gives lm-eval's own seeds (random 0, numpy, torch and few-shot 1234), which Quamba's
    evaluation runs with; a number seeds all four with it. softmax_dtype: None scores in the
    logits' dtype, as HFLM (Quamba's wrapper) does; float32 is finer for an fp16 model.
    """
    batch_size = positive_int("batch_size", batch_size)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32):
        raise ConfigError(f"seed: {seed!r} is not allowed; expected an integer in [0, 2^32), or none for lm-eval's "
                          f"own seeds (Quamba's)")
    seeds = LM_EVAL_SEEDS if seed is None else dict.fromkeys(LM_EVAL_SEEDS, seed)
    parse_dtype(softmax_dtype)  # a bad name fails here, before the model loads
    if Path(out).is_dir():
        raise ConfigError(f"out: {out} is a directory; give the path of the results JSON to write (e.g. {Path(out)}/"
                          f"eval.json)")
    if any(parent.exists() and not parent.is_dir() for parent in Path(out).parents):
        raise ConfigError(f"out: {out} lies under a file, not a directory; give a path whose parents are directories")
    if limit is not None:
        limit = positive_int("limit", limit)
    if perplexity_tokens is not None:
        perplexity_tokens = positive_int("perplexity_tokens", perplexity_tokens)
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ConfigError(f"num_fewshot: {num_fewshot!r} is not allowed; expected an integer >= 0")
    resolve_device(device)  # a CUDA device asked for must exist; nothing falls back to the CPU
    names, perplexity_files, manager = split_tasks(list(tasks))
    local_dir = check_model_dir(model_dir)
    doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "kind": "quamba-eval", "tasks": list(tasks),
                           "model": model_provenance(local_dir, str(model_dir))}

    begun = time.perf_counter()
    lm = QuambaLM(local_dir, batch_size=batch_size, device=device, dtype=dtype, progress=progress,
                  softmax_dtype=softmax_dtype)
    log.info("model loaded in %.2f s (%s, %s)", time.perf_counter() - begun, lm.device, lm.model.dtype)
    doc["settings"] = {"batch_size": batch_size, "limit": limit, "num_fewshot": num_fewshot, "seed": seed,
                       "seeds": seeds, "max_length": lm.max_length, "device": lm.device.type,
                       "dtype": str(lm.model.dtype).removeprefix("torch."),
                       "softmax_dtype": None if softmax_dtype is None else str(lm.softmax_dtype).removeprefix("torch.")}
    from lm_eval.evaluator import simple_evaluate

    specs = [*names, *(perplexity.task_config(lm, data, perplexity_tokens) for data in perplexity_files)]
    begun = time.perf_counter()
    try:
        with _without_environment_report():
            output = simple_evaluate(model=lm, tasks=specs, task_manager=manager, num_fewshot=num_fewshot,
                                     limit=limit, log_samples=True, random_seed=seeds["random"],
                                     numpy_random_seed=seeds["numpy"], torch_random_seed=seeds["torch"],
                                     fewshot_random_seed=seeds["fewshot"])
    except OverflowError as err:  # lm-eval's exp() of a loglikelihood beyond float range
        raise ResultError(f"{local_dir}: a metric overflowed ({err}): the model's loglikelihoods are far out of "
                          f"range; nothing was written (check the model's weights and quantization scales)") from None
    log.info("lm-eval done in %.2f s, of which the model scored requests %.2f s (its first batch, with any kernel "
             "compilation and autotuning and any wait for quamba.compile_lock: %s s; the rest of lm-eval's time: "
             "building the requests, metrics and their standard errors)", time.perf_counter() - begun,
             lm.scoring_seconds,
             "-" if lm.first_batch_seconds is None else f"{lm.first_batch_seconds:.2f}")
    sections = {key: output.get(key) or {} for key in LM_EVAL_SECTIONS}
    check_finite_metrics(sections["results"], local_dir)
    doc.update({key: value for key, value in sections.items() if value})
    doc["package_versions"] = package_versions()
    doc["known_departures"] = evaluation_departures(doc["package_versions"]["lm-eval"], bool(perplexity_files))
    doc = plain_json(doc)
    write_samples(samples_path(out), reduce_samples(output["samples"], aggregation_names(output)))
    write_json(out, doc)  # last: the results JSON is the job's output, its per-item file is already there
    return doc


def evaluation_departures(lm_eval_version: str, perplexity_scored: bool) -> dict[str, str]:
    """Where this evaluation scores otherwise than Quamba's (recipe.KNOWN_DEPARTURES)."""
    keys = ["lm_eval_version"] if lm_eval_version != QUAMBA_LM_EVAL else []
    return known_departures(keys + (["perplexity"] if perplexity_scored else []), version=lm_eval_version)


@contextlib.contextmanager
def _without_environment_report() -> Iterator[None]:
    """simple_evaluate ends by describing the machine: torch's collect_env (subprocesses: pip list,
    nvidia-smi; 1.7 s of every evaluation job on a CPU, more on a GPU box) and `git describe`. That
    report lands in sections this stage drops (LM_EVAL_SECTIONS; package_versions records what
    counts), so evaluations skip it."""
    import lm_eval.evaluator as evaluator

    with mock.patch.object(evaluator, "add_env_info", lambda storage: None), \
            mock.patch.object(evaluator, "get_git_commit_hash", lambda: None):
        yield


def aggregation_names(output: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The name of lm-eval's aggregation of each task's metrics (its task config, else the
    metric's registered default)."""
    from lm_eval.api.registry import AGGREGATION_REGISTRY, get_metric_aggregation

    names_of = {fn: name for name, fn in AGGREGATION_REGISTRY.items()}
    found: dict[str, dict[str, str]] = {}
    for task, config in (output.get("configs") or {}).items():
        for entry in config.get("metric_list") or []:
            aggregation = entry.get("aggregation")
            if aggregation is None:
                try:
                    aggregation = get_metric_aggregation(entry["metric"])
                except (KeyError, ValueError):
                    aggregation = None
            found.setdefault(task, {})[entry["metric"]] = (
                aggregation if isinstance(aggregation, str) else names_of.get(aggregation, "unknown"))
    return found


def summary(doc: dict[str, Any]) -> list[str]:
    """One line per task and metric of an evaluation JSON, e.g. `quamba_mc  acc,none  0.4125`."""
    lines = []
    for task, metrics in sorted(doc.get("results", {}).items()):
        for metric, value in sorted(metrics.items()):
            if "," in metric and "_stderr," not in metric and isinstance(value, (int, float)):
                lines.append(f"{task:<24} {metric:<20} {value:.4f}")
    return lines
