"""Snakemake wrapper: assemble one quantized model dir (see quamba.stages.assemble.quantize_model_dir)."""

from pathlib import Path

import torch

from quamba.logs import job_log
from quamba.recipe import Recipe
from quamba.stages.assemble import quantize_model_dir

with job_log(snakemake.log[0]) as log:  # noqa: F821
    torch.set_num_threads(snakemake.threads)  # noqa: F821  (the same bytes at any thread count: tests/test_quantize.py)
    wc, inputs = snakemake.wildcards, snakemake.input  # noqa: F821
    stats, scales = getattr(inputs, "stats", None), getattr(inputs, "scales", None)
    log.info("assembling %s, seed %s%s", wc.scheme, wc.seed, f", alpha {wc.alpha}" if scales else "")
    config = quantize_model_dir(Path(inputs.model), Path(snakemake.output[0]), Path(inputs.gptq), wc.scheme,  # noqa: F821
                                Recipe(**snakemake.params.recipe),  # noqa: F821
                                calib_dir=Path(stats).parent if stats else None,
                                scales_path=Path(scales) if scales else None,
                                made_by={"rule": snakemake.rule, "wildcards": dict(wc.items()),  # noqa: F821
                                         "params": dict(snakemake.params.items())})  # noqa: F821
    log.info("wrote %s (%d activation thresholds)", snakemake.output[0], len(config["activation_thresholds"]))  # noqa: F821
