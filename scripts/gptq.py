"""Snakemake wrapper: GPTQ of one model at one w_bits and seed (see quamba.stages.gptq)."""

from pathlib import Path

import torch

from quamba.logs import job_log
from quamba.stages.gptq import GPTQSettings, gptq_model_dir
from quamba.transforms.reorder import reorders

with job_log(snakemake.log[0]) as log:  # noqa: F821
    torch.set_num_threads(snakemake.threads)  # noqa: F821
    setting, transforms = dict(snakemake.params.settings), dict(snakemake.params.transforms)  # noqa: F821
    reorder = reorders(snakemake.input.model, transforms["reorder"])  # noqa: F821
    settings = GPTQSettings(w_bits=int(snakemake.wildcards.bits), seed=int(snakemake.wildcards.seed),  # noqa: F821
                            nsamples=setting["nsamples"], seqlen=setting["seqlen"],
                            group_size=setting["group_size"], percdamp=setting["percdamp"],
                            act_order=setting["act_order"], lm_head=setting["lm_head"],
                            rotate_residual=transforms["rotate_residual"], reorder=reorder)
    log.info("GPTQ of %s with %s (data: %s)", snakemake.input.model, settings, setting.get("data") or "shipped corpus")  # noqa: F821
    result = gptq_model_dir(Path(snakemake.input.model), Path(snakemake.output[0]), settings,  # noqa: F821
                            data=setting.get("data"), device=snakemake.params.device, progress=False,  # noqa: F821
                            stats=Path(snakemake.input.stats) if reorder else None)  # noqa: F821
    for name, seconds in result["seconds"].items():
        log.info("%s: %.2f s, error %.4g", name, seconds, result["info"]["layers"][name]["error"])
