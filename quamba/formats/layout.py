"""The results/ tree, owned here: every path pattern of it, and how alphas are spelled.

Patterns are Snakemake wildcard patterns ("results/{model}/calib/{calib}/stats.json"), used as
they are by the rules and filled by `path(pattern, **wildcards)` in Python. logs/ and
benchmarks/ mirror the same paths. Which model and calibration a file belongs to is its place
in this tree (`match`); what a run was (scheme, alpha, seed, recipe) is read from the files' own
records, never parsed out of a path.
"""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = "results"
FP16_MODEL = "results/{model}/fp16/model"
CALIB_DIR = "results/{model}/calib/{calib}"
STATS = CALIB_DIR + "/stats.json"
STORE = CALIB_DIR + "/calibration.safetensors"
ACTIVATIONS = CALIB_DIR + "/activations.npz"
SCALES = CALIB_DIR + "/pa{alpha}/scales.json"
GPTQ_DIR = "results/{model}/gptq/w{bits}/seed{seed}"
ACTIVATION_QUANTIZED_MODEL = "results/{model}/{scheme}/pa{alpha}/seed{seed}/model"  # w8a8, w4a8
WEIGHT_ONLY_MODEL = "results/{model}/{scheme}/seed{seed}/model"  # w4a16: no activation scales, no alpha
VARIANT_MODEL = "results/{model}/{variant}/model"  # variant: fp16 or a quantized run's variant()
EVAL = "results/{model}/{variant}/eval/{task}.json"
SAMPLES_SUFFIX = ".samples.json.gz"  # a results JSON's per-item file: NAME.json -> NAME.samples.json.gz
SAMPLES = EVAL.removesuffix(".json") + SAMPLES_SUFFIX  # per-item results (quamba.formats.samples)
SUMMARY = "results/summary"
SUMMARY_TABLE = SUMMARY + "/{table}.csv"
SUMMARY_PLOT = SUMMARY + "/plots/{plot}.png"
RESERVED_MODEL_NAMES = ("summary",)  # results/summary/ holds the study's tables


def task_key(task: str) -> str:
    """A task as a file name: perplexity:path/to/x.txt -> perplexity_path_to_x.txt."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", task)


def alpha_key(alpha: float) -> str:
    """How an alpha is written in a path or a JSON key: Python's shortest repr, e.g. '0.9995', '1.0'."""
    return repr(float(alpha))


def variant(scheme: str, alpha: float | None = None, seed: int | None = None) -> str:
    """A model's variant, its second level under results/: fp16, {scheme}/pa{alpha}/seed{seed}, or
    {scheme}/seed{seed} for a scheme without activation quantization (alpha None)."""
    if scheme == "fp16":
        return "fp16"
    return f"{scheme}/seed{seed}" if alpha is None else f"{scheme}/pa{alpha_key(alpha)}/seed{seed}"


def path(pattern: str, **wildcards) -> str:
    """A pattern with its wildcards filled in."""
    return pattern.format(**wildcards)


def log(pattern: str, name: str | None = None) -> str:
    """The log file of a job whose output follows `pattern`: logs/ mirrors results/ (a dir or file
    output gets {name}.log beside it; with name None the output's own name with .log)."""
    return _mirror("logs", pattern, name, "log")


def benchmark(pattern: str, name: str | None = None) -> str:
    """The benchmark file of such a job: benchmarks/ mirrors results/."""
    return _mirror("benchmarks", pattern, name, "tsv")


def _mirror(root: str, pattern: str, name: str | None, suffix: str) -> str:
    stem = pattern.removeprefix(RESULTS + "/")
    if name is None:
        return f"{root}/{stem.rsplit('.', 1)[0]}.{suffix}"
    for tail in ("/model", "/stats.json", "/scales.json"):
        stem = stem.removesuffix(tail)
    return f"{root}/{stem}/{name}.{suffix}"


def _regex(pattern: str) -> str:
    """The pattern as a regex with one named group per wildcard ({variant} may span directories)."""
    out, position = "", 0
    for found in re.finditer(r"\{(\w+)\}", pattern):
        out += re.escape(pattern[position:found.start()])
        name = found.group(1)
        out += f"(?P<{name}>.+?)" if name == "variant" else f"(?P<{name}>[^/]+)"
        position = found.end()
    return out + re.escape(pattern[position:]) + "$"


def match(pattern: str, file: str | Path, results_dir: str | Path = RESULTS) -> dict[str, str] | None:
    """The wildcards of `file` if it follows `pattern` under `results_dir` (or, for a path recorded
    relative to another working dir, if its trailing components do); else None."""
    regex = _regex(pattern.removeprefix(RESULTS + "/"))
    try:
        relative = Path(file).resolve().relative_to(Path(results_dir).resolve()).as_posix()
        found = re.match(regex, relative)
    except ValueError:
        found = re.search(r"(?:^|/)" + re.escape(RESULTS) + "/" + regex, Path(file).as_posix())
    return found.groupdict() if found else None


def find(pattern: str, results_dir: str | Path = RESULTS) -> list[tuple[Path, dict[str, str]]]:
    """Every existing file under results_dir that follows `pattern`, with its wildcards, sorted."""
    results_dir = Path(results_dir)
    glob = re.sub(r"\{variant\}", "**", pattern.removeprefix(RESULTS + "/"))
    glob = re.sub(r"\{\w+\}", "*", glob)
    found = []
    for file in sorted(results_dir.glob(glob)):
        wildcards = match(pattern, file, results_dir)
        if wildcards is not None:
            found.append((file, wildcards))
    return found
