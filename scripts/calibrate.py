"""Snakemake wrapper: one calibration pass (see quamba.stages.calibrate.calibrate_model_dir)."""

from pathlib import Path

import torch

from quamba.gpu_lease import lease_for_job
from quamba.logs import job_log
from quamba.recipe import Recipe
from quamba.stages.calibrate import CalibrationSettings, calibrate_model_dir

with job_log(snakemake.log[0]) as log, lease_for_job(snakemake, f"calibrate {snakemake.output.stats}", log):  # noqa: F821
    torch.set_num_threads(snakemake.threads)  # noqa: F821
    setting = dict(snakemake.params.settings)  # noqa: F821
    recipe = Recipe(**snakemake.params.recipe)  # noqa: F821
    settings = CalibrationSettings.from_config(setting)  # as the study's door built it
    data = setting.get("data")
    log.info("calibrating %s with %s, %s (data: %s)", snakemake.input.model, settings, recipe,  # noqa: F821
             data or "shipped corpus")
    doc = calibrate_model_dir(Path(snakemake.input.model), Path(snakemake.output.stats).parent,  # noqa: F821
                              settings, recipe, data=data, device=snakemake.params.device, progress=False)  # noqa: F821
    log.info("wrote %d taps; %s; data tokens sha256 %s", len(doc["taps"]), doc["data"]["selection"],
             doc["data"]["tokens_sha256"])
