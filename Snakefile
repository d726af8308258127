# quamba-flow: FP16 checkpoint -> calibration statistics -> GPTQ models -> lm-eval -> report.
# The DAG and the results/ tree are described in README.md; the logic lives in quamba/.

# The default study, unless --configfile names others (to layer on top of it, name both:
# --configfile config.yaml my.yaml); a study file is then complete on its own.
if not workflow.config_settings.configfiles:

    configfile: "config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/calibrate.smk"
include: "rules/quantize.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    input:
        expand("results/{model}/calib/{calib}/stats.json", model=MODELS, calib=CALIBRATIONS),
        expand("results/{model}/{variant}/eval/{task}.json", model=MODELS, variant=VARIANTS, task=TASK_BY_KEY),
        expand(f"{SUMMARY}/{{table}}.csv", table=SUMMARY_TABLES),
        f"{SUMMARY}/plots/accuracy_vs_alpha.png",
        f"{SUMMARY}/plots/clipping_ranges.png",
        expand(f"{SUMMARY}/plots/{{model}}_activations.png", model=MODELS),
    default_target: True
