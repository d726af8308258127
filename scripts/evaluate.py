"""Snakemake wrapper: one task (lm-eval or held-out perplexity) on one model dir (see quamba.stages.evaluate.evaluate)."""

from pathlib import Path

import torch

from quamba.gpu_lease import lease_for_job
from quamba.logs import job_log
from quamba.stages.evaluate import evaluate, summary

with job_log(snakemake.log[0]) as log, lease_for_job(snakemake, f"evaluate {snakemake.output[0]}", log):  # noqa: F821
    torch.set_num_threads(snakemake.threads)  # noqa: F821
    params = snakemake.params  # noqa: F821
    task = params.task
    log.info("evaluating %s on %s (batch size %s, limit %s)", snakemake.input.model, task,  # noqa: F821
             params.batch_size, params.limit)
    doc = evaluate(Path(snakemake.input.model), [task], Path(snakemake.output[0]),  # noqa: F821
                   batch_size=params.batch_size, limit=params.limit, device=params.device, progress=False,
                   perplexity_tokens=params.perplexity_tokens, softmax_dtype=params.softmax_dtype)
    for line in summary(doc):
        log.info(line)
