# Config validation at the door, and helpers shared by the rules.
import re
from pathlib import Path

from snakemake.utils import validate

from quamba.formats.layout import alpha_key
from quamba.errors import QuambaError
from quamba.stages.evaluate import split_tasks
from quamba.models.checkpoint import check_source
from quamba.schemes import get_scheme

validate(config, "../schemas/config.schema.yaml", set_default=True)

MODELS = sorted(config["models"])
CALIBRATIONS = sorted(config["calibrations"])
QUANTIZATION = config["quantization"]
SCHEMES = QUANTIZATION["schemes"]
ALPHAS = [alpha_key(a) for a in QUANTIZATION["alphas"]]
SEEDS = [str(s) for s in QUANTIZATION["seeds"]]
SCHEME_BITS = {name: get_scheme(name).w_bits for name in SCHEMES}
TRANSFORMS = config["transforms"]
CONDA_ENV = "../envs/quamba.yaml"  # used only with --software-deployment-method conda
DEVICE = config["device"]
GPUS = 1 if DEVICE == "cuda" else 0  # resources: gpu of the jobs that run the model


def _check_quantization():
    """Study alphas must come out of the calibration that feeds the scales."""
    calib = QUANTIZATION["calibration"]
    if calib not in config["calibrations"]:
        raise ValueError(f"config: quantization.calibration: {calib!r} is not a calibration setting; "
                         f"allowed: {CALIBRATIONS}")
    calibrated = {alpha_key(a) for a in config["calibrations"][calib]["alphas"]}
    missing = [a for a in ALPHAS if a not in calibrated]
    if missing:
        raise ValueError(f"config: quantization.alphas: {missing} not in calibrations.{calib}.alphas "
                         f"{sorted(calibrated)}; one calibration pass answers only the alphas it lists")


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
VARIANT_PATTERN = "fp16|(?:{})/pa(?:{})/seed\\d+".format(
    "|".join(SCHEMES), "|".join(re.escape(a) for a in ALPHAS))
QUANTIZED_VARIANTS = [f"{scheme}/pa{alpha}/seed{seed}" for scheme in SCHEMES for alpha in ALPHAS for seed in SEEDS]
VARIANTS = ["fp16", *QUANTIZED_VARIANTS]


wildcard_constraints:
    model="|".join(MODELS),
    calib="|".join(CALIBRATIONS),
    scheme="|".join(SCHEMES),
    alpha="|".join(re.escape(a) for a in ALPHAS),
    seed=r"\d+",
    bits="4|8",


def calibration_setting(calib):
    """A calibration setting; validate() has filled in the schema's defaults."""
    return config["calibrations"][calib]


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


def gptq_stats(wildcards):
    """With reorder on, GPTQ runs on the reordered model, whose plan is in the calibration's stats."""
    return {"stats": study_stats(wildcards)} if TRANSFORMS["reorder"] else {}


def study_stats(wildcards):
    return f"results/{wildcards.model}/calib/{QUANTIZATION['calibration']}/stats.json"


# -- evaluation ------------------------------------------------------------------------------

EVAL_TASKS = config["tasks"]
REPO_DIR = Path(workflow.basedir)
OFFLINE_TASKS = REPO_DIR / "resources" / "tasks"
PERPLEXITY_TEXT = REPO_DIR / "resources" / "corpus" / "test.txt"


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


def task_files(wildcards):
    """The data a task reads, so a rebuilt task or text reruns its evaluations."""
    task = TASK_BY_KEY[wildcards.task]
    if is_perplexity(task):
        return [task.partition(":")[2] or str(PERPLEXITY_TEXT)]
    if (OFFLINE_TASKS / f"{task}.yaml").is_file():
        return [str(OFFLINE_TASKS / f"{task}.yaml"), str(OFFLINE_TASKS / "data" / f"{task}.jsonl"),
                str(OFFLINE_TASKS / "offline_data.py")]
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


def effective_transforms():
    """The transform settings that matter: the cluster counts only when reordering."""
    if TRANSFORMS["reorder"]:
        return dict(TRANSFORMS)
    return {"rotate_residual": TRANSFORMS["rotate_residual"], "reorder": False}
