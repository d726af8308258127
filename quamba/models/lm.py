"""The Mamba language model: embedding, a stack of pre-norm residual blocks, final norm, lm_head.

Module names reproduce the state-spaces checkpoint keys (`backbone.layers.N.mixer.in_proj.weight`,
...), so a mamba_ssm state dict loads without renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from quamba.models import ops
from quamba.models.config import MambaConfig
from quamba.models.mamba1 import Mamba1Mixer
from quamba.models.mamba2 import Mamba2Mixer
from quamba.models.taps import LM_HEAD_POINT, Tap

# The parameters Quamba's modules keep in float32 whatever the model's dtype (QUAMBA.md section 1:
# its loader copies a checkpoint into modules built in fp16, and these are made float32): Mamba1's
# A_log and D, Mamba2's D. Every other tensor takes the model's dtype (fp16 on a GPU).
FLOAT32_PARAMETERS = {"Mamba1": frozenset({"mixer.A_log", "mixer.D"}), "Mamba2": frozenset({"mixer.D"})}


def is_float32_parameter(key: str, layer: str) -> bool:
    """Whether a state-dict key (`backbone.layers.3.mixer.A_log`) is one of FLOAT32_PARAMETERS."""
    parts = key.split(".", 3)
    return parts[:2] == ["backbone", "layers"] and len(parts) == 4 and parts[3] in FLOAT32_PARAMETERS[layer]


def stored_dtype(key: str, layer: str, dtype: torch.dtype = torch.float16) -> torch.dtype:
    """The dtype a state-dict tensor has in a model of `dtype` (default: as an FP16 dir stores it)."""
    return torch.float32 if is_float32_parameter(key, layer) else dtype


def as_fp16_dir(state: dict[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
    """A state dict in the dtypes an FP16 dir stores (fp16, FLOAT32_PARAMETERS in float32), on the
    CPU, contiguous."""
    return {k: v.detach().to("cpu", stored_dtype(k, layer)).contiguous() for k, v in state.items()}


class RMSNorm(nn.Module):
    """RMSNorm in float32. With `int8_output` (a Tap with a scale: Quamba's QRMSNorm, whose kernel
    writes int8 from the float32 norm) the float32 output is snapped to that int8 grid before the
    cast to x's dtype, so the layer after it quantizes exactly these integers back (|q| <= 127:
    fp16's rounding of q * s stays far from half a step) instead of the fp16-rounded norm's."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps
        self.int8_output: Tap | None = None  # set by quamba.models.apply for A8 schemes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_output is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return self.int8_output(ops.rms_norm(x.float(), self.weight, self.eps)).to(x.dtype)


class Block(nn.Module):
    """residual += mixer(norm(residual)), the residual stream kept in fp32 when configured."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_epsilon)
        self.mixer = Mamba1Mixer(config) if config.layer == "Mamba1" else Mamba2Mixer(config)
        self.residual_in_fp32 = config.residual_in_fp32

    def forward(self, residual: torch.Tensor, conv_state: torch.Tensor | None = None,
                ssm_state: torch.Tensor | None = None, step: bool = False) -> torch.Tensor:
        hidden = self.norm(residual).to(self.norm.weight.dtype)  # (b, l, d_model)
        mixer = self.mixer.step if step else self.mixer
        out = mixer(hidden, conv_state, ssm_state)
        return residual + out.to(residual.dtype)


class Backbone(nn.Module):
    def __init__(self, config: MambaConfig):
        super().__init__()
        # Zeros until reset_parameters() or a checkpoint fills it: nn.Embedding's own normal_ init
        # would, under the meta device that checkpoint loading builds on, import torch._dynamo (1 s).
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model,
                                      _weight=torch.zeros(config.padded_vocab_size, config.d_model))
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_epsilon)


@dataclass
class InferenceCache:
    """Decoding state per layer: conv_states[i] holds the last d_conv conv inputs, ssm_states[i]
    the recurrent SSM state (Quamba quantizes it, so it is kept reachable here)."""

    conv_states: list[torch.Tensor] = field(default_factory=list)
    ssm_states: list[torch.Tensor] = field(default_factory=list)
    seqlen_offset: int = 0


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (b, l, padded_vocab_size)


class MambaLMHeadModel(nn.Module):
    """A Mamba1 or Mamba2 LM. `model(input_ids)` returns `.logits` of shape (b, l, padded vocab)."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head_input = Tap(LM_HEAD_POINT)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in: its embedding's (a quantized one says it too)."""
        embedding = self.backbone.embedding
        return embedding.weight.dtype if isinstance(embedding, nn.Embedding) else embedding.dtype

    @property
    def device(self) -> torch.device:
        embedding = self.backbone.embedding
        return embedding.weight.device if isinstance(embedding, nn.Embedding) else embedding.device

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """mamba_ssm's initialisation for training from scratch, drawn from `seed`."""
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            nn.init.normal_(self.backbone.embedding.weight, std=0.02)
            for block in self.backbone.layers:
                mixer = block.mixer
                for linear in (mixer.in_proj, mixer.out_proj, getattr(mixer, "x_proj", None)):
                    if linear is not None:
                        nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
                        if linear.bias is not None:
                            nn.init.zeros_(linear.bias)
                mixer.conv1d.reset_parameters()
                mixer.reset_ssm_parameters()
                # Keep the residual stream's variance from growing with depth (GPT-2 scheme).
                mixer.out_proj.weight /= math.sqrt(self.config.n_layer)
            if not self.config.tie_embeddings:
                nn.init.normal_(self.lm_head.weight, std=0.02)
        finally:
            torch.random.set_rng_state(generator_state)

    def compile_blocks(self) -> MambaLMHeadModel:
        """torch.compile each block in place (regional compilation): inductor fuses the norms, the
        taps' quantize-dequantize chains, the Hadamard stages and the glue between the GEMMs and
        the scan into few kernels. Every value that differs between blocks is a tensor input, so
        the blocks share one compiled graph per call kind (prefill, step) and shape. Compiled under
        `eager_numerics()` (each float operation rounded as eager rounds it), yet not bit-equal to
        the eager blocks where inductor reorders a reduction (a norm's sum) and a rounded tap then
        flips one step: within the CUDA-vs-CPU bounds (tests/test_quantize.py). Call it after
        moving the model: the tensors the layers would make on their first call are made here, on
        the model's device (made inside the first compiled call, a block's scales would be
        constants of it)."""
        from quamba.models import kernels
        from quamba.numerics import hadamard
        from quamba.numerics.quantizers import allow_many_variants, eager_numerics

        allow_many_variants()  # the blocks' graphs (prefill, step, each model) all count for Block.forward
        hadamard.prepare_for_compile()
        if self.device.type == "cuda":
            kernels.prepare_for_compile()
        for module in self.modules():
            materialize = getattr(module, "materialize", None)  # Tap, QuantLinear
            if materialize is not None:
                materialize(self.device, self.dtype)
        for block in self.backbone.layers:
            block.compile(options=eager_numerics())
        return self

    def to_dtype(self, device: str | torch.device, dtype: torch.dtype | None) -> MambaLMHeadModel:
        """model.to(device, dtype), with FLOAT32_PARAMETERS kept in float32 as Quamba's modules keep
        them (their values never rounded to `dtype` on the way); in place, returns the model."""
        if dtype is None:
            return self.to(device=device)
        kept = {name: p.detach().to(device=device, dtype=torch.float32) for name, p in self.named_parameters()
                if is_float32_parameter(name, self.config.layer)}
        self.to(device=device, dtype=dtype)
        for name, value in kept.items():
            self.get_parameter(name).data = value
        return self

    def use_kernels(self, enabled: bool) -> MambaLMHeadModel:
        """Switch the CUDA kernels on or off (off: the pure-PyTorch reference runs on any device)."""
        for block in self.backbone.layers:
            block.mixer.use_kernels = enabled
        return self

    def allocate_cache(self, batch_size: int) -> InferenceCache:
        """Zeroed decoding states in the model's device and dtype."""
        cache = InferenceCache()
        for block in self.backbone.layers:
            conv_shape, ssm_shape = block.mixer.state_shapes(batch_size)
            cache.conv_states.append(torch.zeros(conv_shape, device=self.device, dtype=self.dtype))
            cache.ssm_states.append(torch.zeros(ssm_shape, device=self.device, dtype=torch.float32))
        return cache

    def forward(self, input_ids: torch.Tensor, cache: InferenceCache | None = None) -> CausalLMOutput:
        """input_ids (b, l). With a fresh cache the states after the prompt are stored in it;
        with a used one (seqlen_offset > 0) the tokens are decoded one step at a time."""
        if cache is not None and cache.seqlen_offset > 0:
            logits = [self._step(input_ids[:, t:t + 1], cache) for t in range(input_ids.shape[1])]
            return CausalLMOutput(logits=torch.cat(logits, dim=1))
        residual = self.backbone.embedding(input_ids)  # (b, l, d_model)
        if self.config.residual_in_fp32:
            residual = residual.float()
        for i, block in enumerate(self.backbone.layers):
            states = (cache.conv_states[i], cache.ssm_states[i]) if cache is not None else (None, None)
            residual = block(residual, *states)
        if cache is not None:
            cache.seqlen_offset += input_ids.shape[1]
        return CausalLMOutput(logits=self._head(residual))

    def _step(self, input_ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        residual = self.backbone.embedding(input_ids)  # (b, 1, d_model)
        if self.config.residual_in_fp32:
            residual = residual.float()
        for i, block in enumerate(self.backbone.layers):
            residual = block(residual, cache.conv_states[i], cache.ssm_states[i], step=True)
        cache.seqlen_offset += 1
        return self._head(residual)

    def _head(self, residual: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.norm_f(residual).to(self.dtype)
        return self.lm_head(self.lm_head_input(hidden))  # (b, l, padded_vocab_size)
