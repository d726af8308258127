# quamba-flow: FP16 checkpoint -> calibration statistics -> GPTQ models -> lm-eval -> report.
# The DAG and the results/ tree are described in README.md; the logic lives in quamba/.

configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/models.smk"


rule all:
    input:
        expand("results/{model}/fp16/model", model=MODELS),
    default_target: True
