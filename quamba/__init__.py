"""quamba: post-training quantization studies of Mamba language models (Quamba recipe).

Importing the package is cheap (no torch): `quamba.load` is imported on first use, and the
lm-eval model "quamba" is registered as a lazy placeholder that lm-eval resolves to
quamba.lm_eval_model.QuambaLM when it is asked for.
"""

from typing import Any

import lm_eval.models  # noqa: F401  lm-eval's own models first: its registry fills itself only while empty
from lm_eval.api.registry import model_registry

model_registry.register("quamba", target="quamba.lm_eval_model:QuambaLM")

__all__ = ["load"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "load":
        from quamba.models.load import load

        return load
    raise AttributeError(f"module 'quamba' has no attribute {name!r}")
