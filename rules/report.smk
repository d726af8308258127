# Summaries, plots and the report: cheap jobs over the per-run files, run locally (localrules)
# even on a cluster. They read only results, so adding a run reruns only these after its own jobs.

SUMMARY_TABLES = ["runs", "accuracy", "aggregate", "clipping", "paired"]


localrules:
    summarize,
    plot_summary,
    plot_activations,


rule summarize:
    input:
        evals=expand(layout.EVAL, model=MODELS, variant=VARIANTS, task=TASK_BY_KEY),
        samples=expand(layout.SAMPLES, model=MODELS, variant=VARIANTS, task=TASK_BY_KEY),
        scales=[path for model in MODELS for path in study_scales(model)],
        models=expand(layout.VARIANT_MODEL, model=MODELS, variant=QUANTIZED_VARIANTS),
    output:
        runs=report(layout.path(layout.SUMMARY_TABLE, table="runs"), category="Tables", caption="../report/runs.rst"),
        accuracy=report(layout.path(layout.SUMMARY_TABLE, table="accuracy"), category="Tables",
                        caption="../report/accuracy.rst"),
        aggregate=report(layout.path(layout.SUMMARY_TABLE, table="aggregate"), category="Tables",
                         caption="../report/aggregate.rst"),
        clipping=report(layout.path(layout.SUMMARY_TABLE, table="clipping"), category="Tables",
                        caption="../report/clipping.rst"),
        paired=report(layout.path(layout.SUMMARY_TABLE, table="paired"), category="Tables",
                      caption="../report/paired.rst"),
    log:
        "logs/summary/summarize.log",
    benchmark:
        "benchmarks/summary/summarize.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        CONDA_ENV
    script:
        "../scripts/summarize.py"


rule plot_summary:
    input:
        accuracy=layout.path(layout.SUMMARY_TABLE, table="accuracy"),
        clipping=layout.path(layout.SUMMARY_TABLE, table="clipping"),
        paired=layout.path(layout.SUMMARY_TABLE, table="paired"),
    output:
        accuracy=report(layout.path(layout.SUMMARY_PLOT, plot="accuracy_vs_alpha"), category="Plots",
                        caption="../report/accuracy_vs_alpha.rst"),
        ranges=report(layout.path(layout.SUMMARY_PLOT, plot="clipping_ranges"), category="Plots",
                      caption="../report/clipping_ranges.rst"),
        paired=report(layout.path(layout.SUMMARY_PLOT, plot="paired_differences"), category="Plots",
                      caption="../report/paired_differences.rst"),
    log:
        "logs/summary/plot_summary.log",
    benchmark:
        "benchmarks/summary/plot_summary.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        CONDA_ENV
    script:
        "../scripts/plot_summary.py"


rule plot_activations:
    input:
        stats=lambda wc: layout.path(layout.STATS, model=wc.model, calib=STUDY_CALIBRATION),
        activations=lambda wc: layout.path(layout.ACTIVATIONS, model=wc.model, calib=STUDY_CALIBRATION),
        scales=lambda wc: study_scales(wc.model),
    output:
        report(layout.path(layout.SUMMARY_PLOT, plot="{model}_activations"), category="Plots",
               caption="../report/activations.rst"),
    log:
        "logs/summary/{model}_activations.log",
    benchmark:
        "benchmarks/summary/{model}_activations.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        CONDA_ENV
    script:
        "../scripts/plot_activations.py"
