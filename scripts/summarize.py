"""Snakemake wrapper: the study's CSV tables from the per-run files (see quamba.stages.summarize)."""

from pathlib import Path

from quamba.logs import job_log
from quamba.stages.summarize import write_summary

with job_log(snakemake.log[0]) as log:  # noqa: F821
    out_dir = Path(snakemake.output.runs).parent  # noqa: F821
    tables = write_summary(Path("results"), [Path(p) for p in snakemake.input.evals],  # noqa: F821
                           [Path(p) for p in snakemake.input.scales], out_dir)  # noqa: F821
    for name, frame in tables.items():
        log.info("%s.csv: %d rows", name, len(frame))
