"""Snakemake wrapper: accuracy vs alpha, clipping ranges and the paired differences from the summary tables (see quamba.report.plots)."""

import pandas as pd

from quamba.logs import job_log
from quamba.report.plots import accuracy_vs_alpha, clipping_ranges, paired_differences

with job_log(snakemake.log[0]) as log:  # noqa: F821
    accuracy_vs_alpha(pd.read_csv(snakemake.input.accuracy), snakemake.output.accuracy)  # noqa: F821
    clipping_ranges(pd.read_csv(snakemake.input.clipping), snakemake.output.ranges)  # noqa: F821
    paired_differences(pd.read_csv(snakemake.input.paired), snakemake.output.paired)  # noqa: F821
    log.info("wrote %s, %s and %s", snakemake.output.accuracy, snakemake.output.ranges,  # noqa: F821
             snakemake.output.paired)  # noqa: F821
