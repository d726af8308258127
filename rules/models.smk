# FP16 checkpoints: normalize each configured source into results/{model}/fp16/model/.


rule normalize_fp16:
    input:
        local_model_files,
    output:
        directory(layout.FP16_MODEL),
    params:
        source=lambda wc: model_source(wc.model),
        tokenizer=lambda wc: model_tokenizer(wc.model),
    log:
        layout.log(layout.FP16_MODEL, "normalize"),
    benchmark:
        layout.benchmark(layout.FP16_MODEL, "normalize")
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        CONDA_ENV
    script:
        "../scripts/normalize.py"
