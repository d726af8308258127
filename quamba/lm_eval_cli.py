"""lm-eval's own command line, with the `quamba` model registered.

lm-eval 0.4 discovers no models from other packages, so its stock `lm_eval` command cannot know
ours; this runs the same CLI after `import quamba`:

    python -m quamba.lm_eval_cli run --model quamba --model_args path=DIR,batch_size=8 \\
        --tasks quamba_cloze --include_path resources/tasks
"""

from lm_eval.__main__ import cli_evaluate

import quamba  # noqa: F401  registers the model name "quamba"

if __name__ == "__main__":
    cli_evaluate()
