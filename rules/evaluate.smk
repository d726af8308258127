# Evaluation: one job per (model, variant, task), where variant is fp16 or a quantized run
# {scheme}/pa{alpha}/seed{seed}. A job reads only its model dir, so adding a task runs only that
# task's jobs, and a rebuilt model reruns only its own evaluations.
import re

from quamba.errors import QuambaError
from quamba.eval import split_tasks

EVAL_TASKS = config["tasks"]


def _check_tasks():
    """Every task is known to lm-eval (or is perplexity[:FILE]), so a typo fails before any job runs."""
    try:
        split_tasks(EVAL_TASKS)
    except QuambaError as err:
        raise ValueError(f"config: tasks: {err}") from None


_check_tasks()


def task_limit(task):
    """eval.limit: one number for every task, or a mapping task -> number."""
    limit = config["eval"]["limit"]
    return limit.get(task) if isinstance(limit, dict) else limit


def _check_limits():
    limit = config["eval"]["limit"]
    unknown = sorted(set(limit) - set(EVAL_TASKS)) if isinstance(limit, dict) else []
    if unknown:
        raise ValueError(f"config: eval.limit: {unknown} are not in tasks {EVAL_TASKS}")


_check_limits()


rule evaluate:
    input:
        model="results/{model}/{variant}/model",
    output:
        "results/{model}/{variant}/eval/{task}.json",
    wildcard_constraints:
        variant=VARIANT_PATTERN,
        task="|".join(re.escape(t) for t in EVAL_TASKS),
    params:
        batch_size=config["eval"]["batch_size"],
        limit=lambda wc: task_limit(wc.task),
        perplexity_tokens=config["eval"]["perplexity_tokens"],
        device=DEVICE,
    log:
        "logs/{model}/{variant}/eval/{task}.log",
    benchmark:
        "benchmarks/{model}/{variant}/eval/{task}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=GPUS,
    script:
        "../scripts/evaluate.py"
