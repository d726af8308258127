# Config validation at the door, and helpers shared by the rules. Every path pattern comes from
# quamba.formats.layout, the one owner of the results/ tree.
import re
from pathlib import Path

from snakemake.utils import validate

from quamba.errors import QuambaError
from quamba.formats import layout
from quamba.formats.study import check_study_config
from quamba.models.checkpoint import check_source
from quamba.recipe import Recipe
from quamba.schemes import get_scheme
from quamba.stages.evaluate import split_tasks

try:  # one short error naming the key; then Snakemake's validation fills in the defaults
    check_study_config(config)
except QuambaError as err:
    raise ValueError(str(err)) from None
validate(config, "../schemas/config.schema.yaml", set_default=True)

MODELS = sorted(config["models"])
CALIBRATIONS = sorted(config["calibrations"])
QUANTIZATION = config["quantization"]
STUDY_CALIBRATION = QUANTIZATION["calibration"]
SCHEMES = QUANTIZATION["schemes"]
ACTIVATION_SCHEMES = [s for s in SCHEMES if get_scheme(s).needs_stats]  # w8a8, w4a8: an alpha axis
WEIGHT_ONLY_SCHEMES = [s for s in SCHEMES if not get_scheme(s).needs_stats]  # w4a16: none
ALPHAS = [layout.alpha_key(a) for a in QUANTIZATION["alphas"]]
SEEDS = [str(s) for s in QUANTIZATION["seeds"]]
SCHEME_BITS = {name: get_scheme(name).w_bits for name in SCHEMES}
CONDA_ENV = "../envs/quamba.yaml"  # used only with --software-deployment-method conda
DEVICE = config["device"]
GPUS = 1 if DEVICE == "cuda" else 0  # resources: gpu of the jobs that run the model

try:
    RECIPE = Recipe.from_mapping(config["recipe"], where="config: recipe")
except QuambaError as err:
    raise ValueError(str(err)) from None


def _check_quantization():
    """Study alphas must be ones the feeding calibration can answer: any in [min_alpha, 1]."""
    if STUDY_CALIBRATION not in config["calibrations"]:
        raise ValueError(f"config: quantization.calibration: {STUDY_CALIBRATION!r} is not a calibration setting; "
                         f"allowed: {CALIBRATIONS}")
    min_alpha = config["calibrations"][STUDY_CALIBRATION]["min_alpha"]
    low = [a for a in QUANTIZATION["alphas"] if a < min_alpha]
    if low:
        raise ValueError(f"config: quantization.alphas: {low} are below calibrations.{STUDY_CALIBRATION}.min_alpha "
                         f"{min_alpha}; lower min_alpha (that reruns the calibration) or pick alphas in "
                         f"[{min_alpha}, 1]")


_check_quantization()


def _check_sources():
    """Every source is a local dir or a hub id, so a typo fails before any job runs."""
    for name, spec in config["models"].items():
        for key in ("source", "tokenizer"):
            if key in spec:
                try:
                    check_source(spec[key])
                except QuambaError as err:
                    raise ValueError(f"config: models.{name}.{key}: {err}") from None


_check_sources()


# A variant of a model: its FP16 checkpoint or one quantized run (the results/ tree's second level).
ACTIVATION_VARIANTS = [layout.variant(s, float(a), int(seed)) for s in ACTIVATION_SCHEMES for a in ALPHAS for seed in SEEDS]
WEIGHT_ONLY_VARIANTS = [layout.variant(s, None, int(seed)) for s in WEIGHT_ONLY_SCHEMES for seed in SEEDS]
QUANTIZED_VARIANTS = ACTIVATION_VARIANTS + WEIGHT_ONLY_VARIANTS
VARIANTS = ["fp16", *QUANTIZED_VARIANTS]
VARIANT_PATTERN = "|".join(re.escape(v) for v in VARIANTS)


wildcard_constraints:
    model="|".join(re.escape(m) for m in MODELS),
    calib="|".join(re.escape(c) for c in CALIBRATIONS),
    alpha=r"[0-9.e-]+",
    seed=r"\d+",
    bits="4|8",


def canonical(mapping):
    """A mapping with sorted keys: Snakemake compares params by their text, so the order in which
    a config file lists keys must not count as a change."""
    return {key: canonical(value) if isinstance(value, dict) else value for key, value in sorted(mapping.items())}


def calibration_setting(calib):
    """A calibration setting; validate() has filled in the schema's defaults."""
    return canonical(config["calibrations"][calib])


def model_source(model):
    return config["models"][model]["source"]


def model_tokenizer(model):
    spec = config["models"][model]
    return spec.get("tokenizer", spec["source"])


def local_model_files(wildcards):
    """The files of a local source, so editing them reruns normalization; none for hub ids."""
    source = Path(model_source(wildcards.model))
    if not source.is_dir():
        return []
    return sorted(str(p) for p in source.iterdir() if p.is_file())


def study_stats(wildcards):
    return layout.path(layout.STATS, model=wildcards.model, calib=STUDY_CALIBRATION)


def study_scales(model):
    """The study calibration's scales.json of every study alpha: what clipping did at each."""
    return [layout.path(layout.SCALES, model=model, calib=STUDY_CALIBRATION, alpha=a) for a in ALPHAS]


def reorder_stats(wildcards):
    """With reorder on, GPTQ and weight-only assembly read the calibration's plan (stats.json)."""
    return {"stats": study_stats(wildcards)} if RECIPE.reorder else {}


def recipe_options(stage):
    """The recipe options a stage reads, as its params: flipping one reruns exactly its jobs."""
    return RECIPE.options(stage)


def alpha_one(wildcards):
    """alpha_one acts only at alpha 1.0, so only those jobs rerun when it flips."""
    return RECIPE.alpha_one if float(wildcards.alpha) == 1.0 else None


# -- evaluation ------------------------------------------------------------------------------

EVAL_TASKS = config["tasks"]
OFFLINE_TASKS = Path("resources") / "tasks"
PERPLEXITY_TEXT = Path("resources") / "corpus" / "test.txt"


def task_key(task):
    """A task as a file name: perplexity:path/to/x.txt -> perplexity_path_to_x.txt."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", task)


TASK_BY_KEY = {task_key(task): task for task in EVAL_TASKS}


def _check_tasks():
    """Every task is known to lm-eval (or is perplexity[:FILE]), so a typo fails before any job runs."""
    try:
        split_tasks(EVAL_TASKS)
    except QuambaError as err:
        raise ValueError(f"config: tasks: {err}") from None
    if len(TASK_BY_KEY) < len(EVAL_TASKS):
        raise ValueError(f"config: tasks: {EVAL_TASKS} name two tasks that share a file name")


_check_tasks()


def is_perplexity(task):
    return task == "perplexity" or task.startswith("perplexity:")


def _shipped(relative):
    """A shipped file: relative to the workdir when the study runs in a checkout (so a moved study
    keeps its cache), else the one beside the Snakefile."""
    return str(relative) if Path(relative).exists() else str(Path(workflow.basedir) / relative)


def task_files(wildcards):
    """The data a task reads, so a rebuilt task or text reruns its evaluations."""
    task = TASK_BY_KEY[wildcards.task]
    if is_perplexity(task):
        return [task.partition(":")[2] or _shipped(PERPLEXITY_TEXT)]
    if (Path(workflow.basedir) / OFFLINE_TASKS / f"{task}.yaml").is_file():
        return [_shipped(OFFLINE_TASKS / f"{task}.yaml"), _shipped(OFFLINE_TASKS / "data" / f"{task}.jsonl"),
                _shipped(OFFLINE_TASKS / "offline_data.py")]
    return []  # an lm-eval task: its data comes from the hub into lm-eval's cache


def task_limit(task):
    """eval.limit: one number for every task, or a mapping task -> number."""
    limit = config["eval"]["limit"]
    return limit.get(task) if isinstance(limit, dict) else limit


def perplexity_tokens(task):
    """Only perplexity jobs read eval.perplexity_tokens, so only they rerun when it changes."""
    return config["eval"]["perplexity_tokens"] if is_perplexity(task) else None


def _check_limits():
    limit = config["eval"]["limit"]
    unknown = sorted(set(limit) - set(EVAL_TASKS)) if isinstance(limit, dict) else []
    if unknown:
        raise ValueError(f"config: eval.limit: {unknown} are not in tasks {EVAL_TASKS}")


_check_limits()
