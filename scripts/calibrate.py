"""Snakemake wrapper: one calibration pass (see quamba.calibration.calibrate_model_dir)."""

import logging
from pathlib import Path

import torch

from quamba.calibration import CalibrationSettings, calibrate_model_dir

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO,  # noqa: F821
                    format="%(asctime)s %(levelname)s %(message)s")
torch.set_num_threads(snakemake.threads)  # noqa: F821
setting = dict(snakemake.params.settings)  # noqa: F821
data = setting.pop("data", None)
settings = CalibrationSettings(
    num_samples=setting["samples"], seq_len=setting["seq_len"], batch_size=setting["batch_size"],
    seed=setting["seed"], alphas=tuple(setting["alphas"]),
    activation_layers=tuple(setting["activation_layers"]),
    activation_samples=setting["activation_samples"], save_activations=True)
logging.info("calibrating %s with %s (data: %s)", snakemake.input.model, settings, data or "shipped corpus")  # noqa: F821
doc = calibrate_model_dir(Path(snakemake.input.model), Path(snakemake.output.stats).parent,  # noqa: F821
                          settings, data=data, progress=False)
logging.info("wrote %d taps; data tokens sha256 %s", len(doc["taps"]), doc["data"]["tokens_sha256"])
