"""quamba: post-training quantization studies of Mamba language models (Quamba recipe)."""

from quamba.loading import load

__all__ = ["load"]
__version__ = "0.1.0"
