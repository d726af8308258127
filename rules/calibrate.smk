# Calibration: one pass over the FP16 model per (model, calibration setting). Every alpha of the
# setting comes out of the same pass, so alpha is not a wildcard here.


rule calibrate:
    input:
        model="results/{model}/fp16/model",
    output:
        stats="results/{model}/calib/{calib}/stats.json",
        activations="results/{model}/calib/{calib}/activations.npz",
    params:
        settings=lambda wc: calibration_setting(wc.calib),
        transforms=effective_transforms(),
        device=DEVICE,
    log:
        "logs/{model}/calib/{calib}/calibrate.log",
    benchmark:
        "benchmarks/{model}/calib/{calib}/calibrate.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=GPUS,
    conda:
        CONDA_ENV
    script:
        "../scripts/calibrate.py"
