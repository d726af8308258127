# Evaluation: one job per (model, variant, task), where variant is fp16 or a quantized run
# {scheme}/pa{alpha}/seed{seed}. A job reads only its model dir, so adding a task runs only that
# task's jobs, and a rebuilt model reruns only its own evaluations.


rule evaluate:
    input:
        model="results/{model}/{variant}/model",
    output:
        "results/{model}/{variant}/eval/{task}.json",
    wildcard_constraints:
        variant=VARIANT_PATTERN,
        task="|".join(re.escape(t) for t in EVAL_TASKS),
    params:
        batch_size=config["eval"]["batch_size"],
        limit=lambda wc: task_limit(wc.task),
        perplexity_tokens=config["eval"]["perplexity_tokens"],
        device=DEVICE,
    log:
        "logs/{model}/{variant}/eval/{task}.log",
    benchmark:
        "benchmarks/{model}/{variant}/eval/{task}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=GPUS,
    conda:
        CONDA_ENV
    script:
        "../scripts/evaluate.py"
