"""Snakemake wrapper: normalize one FP16 checkpoint (see quamba.models.checkpoint.normalize)."""

from pathlib import Path

from quamba.logs import job_log
from quamba.models.checkpoint import normalize

with job_log(snakemake.log[0]) as log:  # noqa: F821
    params = snakemake.params  # noqa: F821
    log.info("normalizing %s (tokenizer %s)", params.source, params.tokenizer)
    out = normalize(params.source, params.tokenizer, Path(snakemake.output[0]))  # noqa: F821
    log.info("wrote %s", out)
