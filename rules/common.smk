# Config validation at the door, and helpers shared by the rules. Every path pattern comes from
# quamba.formats.layout, the one owner of the results/ tree.
import re
from pathlib import Path

from quamba.errors import QuambaError
from quamba.formats import layout
from quamba.study import check_study
from quamba.recipe import Recipe
from quamba.schemes import get_scheme

try:  # the door: one short error naming the key, before any job; fills in the schema's defaults
    check_study(config)
except QuambaError as err:
    raise ValueError(str(err)) from None

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

RECIPE = Recipe.from_mapping(config["recipe"], where="config: recipe")  # checked at the door


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
    """A calibration setting; the door (check_study) has filled in the schema's defaults."""
    return canonical(config["calibrations"][calib])


CORPUS_TEXT = Path("resources") / "corpus" / "train.txt"  # calibration and GPTQ text unless data says otherwise


def data_files(source):
    """The local file a calibration or GPTQ setting reads, so editing it reruns the jobs that read
    it; none for a hub dataset id (its rows are hashed into stats.json and gptq.json)."""
    if source is None:
        return [_shipped(CORPUS_TEXT)]
    return [str(source)] if Path(source).is_file() else []


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


task_key = layout.task_key
TASK_BY_KEY = {task_key(task): task for task in EVAL_TASKS}  # tasks sharing a file name fail at the door


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

