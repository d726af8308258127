"""Snakemake wrapper: one alpha's thresholds from a calibration dir (see quamba.stages.scales)."""

from pathlib import Path

from quamba.logs import job_log
from quamba.stages.scales import scales_file

with job_log(snakemake.log[0]) as log:  # noqa: F821
    alpha_one = snakemake.params.alpha_one or "quamba"  # noqa: F821  (None: alpha < 1, where it does not act)
    alpha = float(snakemake.wildcards.alpha)  # noqa: F821
    doc = scales_file(Path(snakemake.input.stats).parent, alpha, Path(snakemake.output[0]), alpha_one)  # noqa: F821
    log.info("wrote %s: %d taps at alpha %s", snakemake.output[0], len(doc["taps"]), doc["alpha"])  # noqa: F821
