# Quantization: GPTQ per (model, w_bits, seed), independent of alpha; then one assembled model per
# (scheme, alpha, seed) for schemes that quantize activations, and per (scheme, seed) for w4a16,
# which has no activation scales and so no alpha.


rule gptq:
    input:
        unpack(reorder_stats),
        model=layout.FP16_MODEL,
        data=data_files(config["gptq"].get("data")),
    output:
        directory(layout.GPTQ_DIR),
    params:
        settings=canonical(config["gptq"]),
        recipe=recipe_options("gptq"),
        device=DEVICE,
    log:
        layout.log(layout.GPTQ_DIR, "gptq"),
    benchmark:
        layout.benchmark(layout.GPTQ_DIR, "gptq")
    priority: 2  # after calibration, before the evaluations of FP16 (rules/calibrate.smk)
    threads: 2
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=GPUS,
    conda:
        CONDA_ENV
    script:
        "../scripts/gptq.py"


rule assemble:
    input:
        model=layout.FP16_MODEL,
        stats=study_stats,
        scales=lambda wc: layout.path(layout.SCALES, model=wc.model, calib=STUDY_CALIBRATION, alpha=wc.alpha),
        gptq=lambda wc: layout.path(layout.GPTQ_DIR, model=wc.model, bits=SCHEME_BITS[wc.scheme], seed=wc.seed),
    output:
        directory(layout.ACTIVATION_QUANTIZED_MODEL),
    wildcard_constraints:
        scheme="|".join(ACTIVATION_SCHEMES) or "(?!)",
    params:
        recipe=recipe_options("assemble"),
    log:
        layout.log(layout.ACTIVATION_QUANTIZED_MODEL, "assemble"),
    benchmark:
        layout.benchmark(layout.ACTIVATION_QUANTIZED_MODEL, "assemble")
    priority: 1  # its evaluations wait for it
    threads: 4  # rotating every weight of a 2.7b model: 237 s on one core of the H200 box
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        CONDA_ENV
    script:
        "../scripts/assemble.py"


rule assemble_weight_only:
    input:
        unpack(reorder_stats),
        model=layout.FP16_MODEL,
        gptq=lambda wc: layout.path(layout.GPTQ_DIR, model=wc.model, bits=SCHEME_BITS[wc.scheme], seed=wc.seed),
    output:
        directory(layout.WEIGHT_ONLY_MODEL),
    wildcard_constraints:
        scheme="|".join(WEIGHT_ONLY_SCHEMES) or "(?!)",
    params:
        recipe=recipe_options("assemble"),
    log:
        layout.log(layout.WEIGHT_ONLY_MODEL, "assemble"),
    benchmark:
        layout.benchmark(layout.WEIGHT_ONLY_MODEL, "assemble")
    priority: 1  # its evaluations wait for it
    threads: 4  # rotating every weight of a 2.7b model: 237 s on one core of the H200 box
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        CONDA_ENV
    script:
        "../scripts/assemble.py"
