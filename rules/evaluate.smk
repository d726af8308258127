# Evaluation: one job per (model, variant, task), where variant is fp16 or a quantized run
# ({scheme}/pa{alpha}/seed{seed}, or {scheme}/seed{seed} for w4a16); {task} is the task as a file
# name (task_key). Each job writes the results JSON and, beside it, lm-eval's per-item results.
# A job reads only its model dir and its task's data, so adding a task runs only
# that task's jobs, and a rebuilt model reruns only its own evaluations.


rule evaluate:
    input:
        task_files,
        model=layout.VARIANT_MODEL,
    output:
        results=layout.EVAL,
        samples=layout.SAMPLES,  # per-item results, for the paired statistics
    wildcard_constraints:
        variant=VARIANT_PATTERN,
        task="|".join(re.escape(key) for key in TASK_BY_KEY),
    params:
        task=lambda wc: TASK_BY_KEY[wc.task],
        batch_size=config["eval"]["batch_size"],
        limit=lambda wc: task_limit(TASK_BY_KEY[wc.task]),
        perplexity_tokens=lambda wc: perplexity_tokens(TASK_BY_KEY[wc.task]),
        softmax_dtype=config["eval"].get("softmax_dtype"),
        device=DEVICE,
    log:
        layout.log(layout.EVAL),
    benchmark:
        layout.benchmark(layout.EVAL)
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=GPUS,
    conda:
        CONDA_ENV
    script:
        "../scripts/evaluate.py"
