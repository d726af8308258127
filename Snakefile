# quamba-flow: FP16 checkpoint -> calibration statistics -> GPTQ models -> lm-eval -> report.
# The DAG and the results/ tree are described in README.md; the logic lives in quamba/.

configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/calibrate.smk"
include: "rules/quantize.smk"
include: "rules/evaluate.smk"


rule all:
    input:
        expand("results/{model}/fp16/model", model=MODELS),
        expand("results/{model}/calib/{calib}/stats.json", model=MODELS, calib=CALIBRATIONS),
        expand("results/{model}/{scheme}/pa{alpha}/seed{seed}/model", model=MODELS, scheme=SCHEMES,
               alpha=ALPHAS, seed=SEEDS),
        expand("results/{model}/fp16/eval/{task}.json", model=MODELS, task=config["tasks"]),
    default_target: True
