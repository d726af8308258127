"""Snakemake wrapper: one calibration pass (see quamba.stages.calibrate.calibrate_model_dir)."""

from pathlib import Path

import torch

from quamba.logs import job_log
from quamba.stages.calibrate import CalibrationSettings, calibrate_model_dir
from quamba.transforms.reorder import reorders

with job_log(snakemake.log[0]) as log:  # noqa: F821
    torch.set_num_threads(snakemake.threads)  # noqa: F821
    setting, transforms = dict(snakemake.params.settings), dict(snakemake.params.transforms)  # noqa: F821
    settings = CalibrationSettings(
        num_samples=setting["samples"], seq_len=setting["seq_len"], batch_size=setting["batch_size"],
        seed=setting["seed"], alphas=tuple(setting["alphas"]),
        activation_layers=tuple(setting["activation_layers"]),
        activation_samples=setting["activation_samples"], save_activations=True,
        rotate_residual=transforms["rotate_residual"],
        reorder=reorders(snakemake.input.model, transforms["reorder"]),  # noqa: F821
        **{key: transforms[key] for key in ("head_clusters", "channel_clusters") if key in transforms})
    data = setting.get("data")
    log.info("calibrating %s with %s (data: %s)", snakemake.input.model, settings, data or "shipped corpus")  # noqa: F821
    doc = calibrate_model_dir(Path(snakemake.input.model), Path(snakemake.output.stats).parent,  # noqa: F821
                              settings, data=data, device=snakemake.params.device, progress=False)  # noqa: F821
    log.info("wrote %d taps; data tokens sha256 %s", len(doc["taps"]), doc["data"]["tokens_sha256"])
