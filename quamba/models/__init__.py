"""Pure-PyTorch Mamba1/Mamba2 language models and their checkpoint formats."""

from quamba.models import kernels, ops
from quamba.models.config import MambaConfig
from quamba.models.lm import CausalLMOutput, InferenceCache, MambaLMHeadModel

__all__ = ["kernels", "ops", "CausalLMOutput", "InferenceCache", "MambaConfig", "MambaLMHeadModel"]
