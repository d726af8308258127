# Summaries, plots and the report: cheap jobs over the per-run files, run locally (localrules)
# even on a cluster. They read only results, so adding a run reruns only these after its own jobs.

SUMMARY = "results/summary"
SUMMARY_TABLES = ["runs", "accuracy", "aggregate", "clipping"]
STUDY_CALIBRATION = QUANTIZATION["calibration"]

localrules:
    summarize,
    plot_summary,
    plot_activations,


rule summarize:
    input:
        evals=expand("results/{model}/{variant}/eval/{task}.json", model=MODELS, variant=VARIANTS, task=TASK_BY_KEY),
        stats=expand("results/{model}/calib/{calib}/stats.json", model=MODELS, calib=CALIBRATIONS),
        models=expand("results/{model}/{variant}/model", model=MODELS, variant=QUANTIZED_VARIANTS),
    output:
        runs=report(f"{SUMMARY}/runs.csv", category="Tables", caption="../report/runs.rst"),
        accuracy=f"{SUMMARY}/accuracy.csv",
        aggregate=report(f"{SUMMARY}/aggregate.csv", category="Tables", caption="../report/aggregate.rst"),
        clipping=report(f"{SUMMARY}/clipping.csv", category="Tables", caption="../report/clipping.rst"),
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
        accuracy=f"{SUMMARY}/accuracy.csv",
        clipping=f"{SUMMARY}/clipping.csv",
    output:
        accuracy=report(f"{SUMMARY}/plots/accuracy_vs_alpha.png", category="Plots",
                        caption="../report/accuracy_vs_alpha.rst"),
        ranges=report(f"{SUMMARY}/plots/clipping_ranges.png", category="Plots",
                      caption="../report/clipping_ranges.rst"),
    params:
        calib=STUDY_CALIBRATION,
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
        stats=f"results/{{model}}/calib/{STUDY_CALIBRATION}/stats.json",
        activations=f"results/{{model}}/calib/{STUDY_CALIBRATION}/activations.npz",
    output:
        report(f"{SUMMARY}/plots/{{model}}_activations.png", category="Plots",
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
