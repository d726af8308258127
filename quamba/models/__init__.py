"""Pure-PyTorch Mamba1/Mamba2 language models and their checkpoint formats."""

from quamba.models.config import MambaConfig
from quamba.models.lm import CausalLMOutput, InferenceCache, MambaLMHeadModel

__all__ = ["CausalLMOutput", "InferenceCache", "MambaConfig", "MambaLMHeadModel"]
