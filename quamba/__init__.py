"""quamba: post-training quantization studies of Mamba language models (Quamba recipe)."""

from quamba.loading import load
from quamba import eval as _eval  # noqa: F401  importing registers the lm-eval model "quamba"

__all__ = ["load"]
__version__ = "0.1.0"
