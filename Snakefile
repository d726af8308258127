# quamba-flow: FP16 checkpoint -> calibration statistics -> GPTQ models -> lm-eval -> report.
# The DAG and the results/ tree are described in README.md; the logic lives in quamba/.

# The default study, unless --configfile names others (to layer on top of it, name both:
# --configfile config.yaml my.yaml); a study file is then complete on its own.
if not workflow.config_settings.configfiles:
    from quamba.formats.study import read_study_file

    read_study_file("config.yaml")  # a YAML error names the file and line (`quamba check-study FILE` for others)

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
        expand(layout.STATS, model=MODELS, calib=CALIBRATIONS),
        expand(layout.EVAL, model=MODELS, variant=VARIANTS, task=TASK_BY_KEY),
        expand(layout.SUMMARY_TABLE, table=SUMMARY_TABLES),
        layout.path(layout.SUMMARY_PLOT, plot="accuracy_vs_alpha"),
        layout.path(layout.SUMMARY_PLOT, plot="clipping_ranges"),
        expand(layout.SUMMARY_PLOT, plot=[f"{m}_activations" for m in MODELS]),
    default_target: True
