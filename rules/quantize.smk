# Quantization: GPTQ per (model, w_bits, seed), independent of alpha; then one assembled model
# per (scheme, alpha, seed) from the FP16 weights, the GPTQ weights and the calibration stats.


rule gptq:
    input:
        unpack(gptq_stats),
        model="results/{model}/fp16/model",
    output:
        directory("results/{model}/gptq/w{bits}/seed{seed}"),
    params:
        settings=config["gptq"],
        transforms=effective_transforms(),
        device=DEVICE,
    log:
        "logs/{model}/gptq/w{bits}/seed{seed}/gptq.log",
    benchmark:
        "benchmarks/{model}/gptq/w{bits}/seed{seed}/gptq.tsv"
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
        model="results/{model}/fp16/model",
        stats=study_stats,
        gptq=lambda wc: f"results/{wc.model}/gptq/w{SCHEME_BITS[wc.scheme]}/seed{wc.seed}",
    output:
        directory("results/{model}/{scheme}/pa{alpha}/seed{seed}/model"),
    params:
        transforms=effective_transforms(),
    log:
        "logs/{model}/{scheme}/pa{alpha}/seed{seed}/assemble.log",
    benchmark:
        "benchmarks/{model}/{scheme}/pa{alpha}/seed{seed}/assemble.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        CONDA_ENV
    script:
        "../scripts/assemble.py"
