"""Snakemake wrapper: SSM-input activation histograms with the clipping thresholds (see quamba.report.plots)."""

from quamba.logs import job_log
from quamba.report.plots import activation_histograms

with job_log(snakemake.log[0]) as log:  # noqa: F821
    activation_histograms(snakemake.input.stats, snakemake.input.activations, list(snakemake.input.scales),  # noqa: F821
                          snakemake.output[0])  # noqa: F821
    log.info("wrote %s", snakemake.output[0])  # noqa: F821
