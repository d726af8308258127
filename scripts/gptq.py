"""Snakemake wrapper: GPTQ of one model at one w_bits and seed (see quamba.stages.gptq)."""

from pathlib import Path

import torch

from quamba.gpu_lease import lease_for_job
from quamba.logs import job_log
from quamba.recipe import Recipe
from quamba.stages.gptq import GPTQSettings, gptq_model_dir

with job_log(snakemake.log[0]) as log, lease_for_job(snakemake, f"gptq {snakemake.output[0]}", log):  # noqa: F821
    torch.set_num_threads(snakemake.threads)  # noqa: F821
    setting = dict(snakemake.params.settings)  # noqa: F821
    recipe = Recipe(**snakemake.params.recipe)  # noqa: F821
    settings = GPTQSettings.from_config(setting, w_bits=int(snakemake.wildcards.bits),  # noqa: F821
                                        seed=int(snakemake.wildcards.seed))  # noqa: F821  (as the door built it)
    log.info("GPTQ of %s with %s, %s (data: %s)", snakemake.input.model, settings, recipe,  # noqa: F821
             setting.get("data") or "shipped corpus")
    stats = getattr(snakemake.input, "stats", None)  # noqa: F821  (only with reorder)
    result = gptq_model_dir(Path(snakemake.input.model), Path(snakemake.output[0]), settings, recipe,  # noqa: F821
                            data=setting.get("data"), device=snakemake.params.device, progress=False,  # noqa: F821
                            calib_dir=Path(stats).parent if stats else None)
    for name, seconds in result["seconds"].items():
        log.info("%s: %.2f s, error %.4g", name, seconds, result["info"]["layers"][name]["error"])
