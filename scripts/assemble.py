"""Snakemake wrapper: assemble one quantized model dir (see quamba.stages.assemble.quantize_model_dir)."""

from pathlib import Path

from quamba.logs import job_log
from quamba.stages.assemble import quantize_model_dir
from quamba.transforms.reorder import reorders

with job_log(snakemake.log[0]) as log:  # noqa: F821
    wc, transforms = snakemake.wildcards, snakemake.params.transforms  # noqa: F821
    log.info("assembling %s at alpha %s, seed %s", wc.scheme, wc.alpha, wc.seed)
    config = quantize_model_dir(Path(snakemake.input.model), Path(snakemake.output[0]),  # noqa: F821
                                Path(snakemake.input.gptq), wc.scheme, float(wc.alpha),  # noqa: F821
                                Path(snakemake.input.stats),  # noqa: F821
                                reorder=reorders(snakemake.input.model, transforms["reorder"]),  # noqa: F821
                                rotate_residual=transforms["rotate_residual"])
    log.info("wrote %s (%d activation scales)", snakemake.output[0], len(config["activation_scales"]))  # noqa: F821
