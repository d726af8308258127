# Calibration: one pass over the FP16 model per (model, calibration setting), alpha-free: it keeps
# what every alpha >= min_alpha needs. A cheap scales job per alpha derives that alpha's thresholds,
# so a new alpha runs only its scales job and what reads it.


rule calibrate:
    input:
        model=layout.FP16_MODEL,
        data=lambda wc: data_files(calibration_setting(wc.calib).get("data")),
    output:
        stats=layout.STATS,
        store=layout.STORE,
        activations=layout.ACTIVATIONS,
    params:
        settings=lambda wc: calibration_setting(wc.calib),
        recipe=recipe_options("calibrate"),
        device=DEVICE,
    log:
        layout.log(layout.STATS, "calibrate"),
    benchmark:
        layout.benchmark(layout.STATS, "calibrate")
    priority: 3  # among ready jobs the longest chain first (calibrate, scales > gptq > assemble > evaluate)
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=GPUS,
    conda:
        CONDA_ENV
    script:
        "../scripts/calibrate.py"


rule scales:
    input:
        stats=layout.STATS,
        store=layout.STORE,
    output:
        layout.SCALES,
    params:
        alpha_one=alpha_one,
    log:
        layout.log(layout.SCALES, "scales"),
    benchmark:
        layout.benchmark(layout.SCALES, "scales")
    priority: 3  # what assemble waits for
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        CONDA_ENV
    script:
        "../scripts/scales.py"
