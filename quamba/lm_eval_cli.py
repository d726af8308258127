"""lm-eval's own command line, with the `quamba` model registered.

lm-eval 0.4 discovers no models from other packages, so its stock `lm_eval` command cannot know
ours; this runs the same CLI after `import quamba`:

    python -m quamba.lm_eval_cli run --model quamba --model_args path=DIR,batch_size=8 \\
        --tasks quamba_cloze --include_path resources/tasks

lm-eval's CLI asks for cuda:0 when no --device is given; quamba never falls back from a device
that was asked for, so without --device this picks cuda when present and cpu otherwise.
"""

import sys

from lm_eval.__main__ import cli_evaluate

import quamba  # noqa: F401  registers the model name "quamba"


def main() -> None:
    if "run" in sys.argv[1:2] and not any(arg == "--device" or arg.startswith("--device=") for arg in sys.argv):
        import torch

        sys.argv += ["--device", "cuda" if torch.cuda.is_available() else "cpu"]
    cli_evaluate()


if __name__ == "__main__":
    main()
