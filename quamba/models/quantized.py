"""The quantized model's modules (quamba.models.apply puts them in place).

`QuantLinear` runs an integer weight: on CPU the reference (dequantize, then a float matmul), on
CUDA int8 GEMMs (torch._int_mm) for w8a8 and w4a8 (QQQ's int8 weights); taps fake-quantize activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quamba.models.lm import MambaLMHeadModel
from quamba.numerics import quantizers
from quamba.numerics.hadamard import hadamard_transform
from quamba.numerics.quantizers import HALF_EVEN, compiled, dequantize, expand_scales, quantize
from quamba.numerics.tensor_codecs import qqq_int8_weight

MIN_INT_MM_ROWS = 16  # torch._int_mm on CUDA needs more rows than this
LINEAR_INPUT_TAPS = {"in_proj": "in_proj:input", "out_proj": "out_proj:input"}


def _epilogue(acc: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (acc.float() * scale).to(dtype)  # int32 accumulator -> float32 -> the model's dtype


def _fused_epilogue(acc: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The int8 GEMM's dequantization as one kernel where the activation quantizers are fused."""
    return compiled(_epilogue, dtype=dtype)(acc, scale) if quantizers.FUSE_ON_CUDA else _epilogue(acc, scale, dtype)


class QuantLinear(nn.Module):
    """y = dequant(q) applied to x, with x Hadamard-rotated first (out_proj) and quantized to
    int8 with a static scale (schemes with 8-bit activations).

    On CUDA, int8 weights with int8 activations (W8A8, and W4A8 once QQQ has turned its int4
    codes into int8 with a scale per row) run as an int8 GEMM (torch._int_mm; M <= 16 padded)
    and no float copy of the weight is kept. The reference path (CPU, or CUDA without an
    integer kernel: W4A16) multiplies a float weight dequantized once per device and dtype.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bits: int, bias: torch.Tensor | None,
                 act_scale: float | None, rotate_input: str | None, rounding: str = HALF_EVEN, qqq: bool = False):
        super().__init__()
        self.bits, self.act_scale, self.rotate_input = bits, act_scale, rotate_input
        self.rounding = rounding  # of the int8 input: the norm's (ties to even) or the Hadamard's (away)
        self.out_features, self.in_features = qweight.shape
        if qqq:  # W4A8 as QQQ's kernel: the int4 codes turned into int8 with one scale per row
            qweight, scales = qqq_int8_weight(qweight.to(torch.int8), scales)
        self.int8_weight = bits == 8 or qqq  # qweight holds int8 values the GEMM can take as they are
        self.register_buffer("qweight", qweight.to(torch.int8))  # (out, in) integer values
        self.register_buffer("scales", scales.float())  # (out, groups), (out, 1) or (1, 1)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._reference: torch.Tensor | None = None  # the float weight, made when a path needs it

    def reference_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight on the layer's device in `dtype`, made once and kept."""
        cached = self._reference
        if cached is None or cached.device != self.qweight.device or cached.dtype != dtype:
            self._reference = dequantize(self.qweight, expand_scales(self.scales, self.in_features)).to(dtype)
        return self._reference

    def _int8_gemm_ok(self, x2d: torch.Tensor) -> bool:
        return (x2d.is_cuda and self.int8_weight and self.act_scale is not None and self.scales.shape[-1] == 1
                and self.in_features % 8 == 0 and self.out_features % 8 == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotate_input is not None:  # the Hadamard kind of out_proj's input rotation
            x = hadamard_transform(x, self.rotate_input)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.act_scale is None:
            return F.linear(x, self.reference_weight(x.dtype), bias)
        x_q = quantize(x, self.act_scale, 8, self.rounding)  # (..., in) int8
        x2d = x_q.reshape(-1, self.in_features)
        if self._int8_gemm_ok(x2d):
            rows = x2d.shape[0]
            if rows <= MIN_INT_MM_ROWS:  # torch._int_mm wants more than 16 rows: pad with zeros
                x2d = F.pad(x2d, (0, 0, 0, MIN_INT_MM_ROWS + 1 - rows))
            acc = torch._int_mm(x2d, self.qweight.t())[:rows]  # (m, out) int32, exact
            y = _fused_epilogue(acc, self.act_scale * self.scales.reshape(1, -1), x.dtype).view(*x.shape[:-1], -1)
            return y if bias is None else y + bias
        x_dq = dequantize(x_q, self.act_scale).to(x.dtype)
        return F.linear(x_dq, self.reference_weight(x.dtype), bias)

    def weight_bytes(self) -> int:
        """Bytes this layer holds on its device for its weight: integers, scales, any float copy."""
        held = self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * 4
        if self._reference is not None:
            held += self._reference.numel() * self._reference.element_size()
        return held


def quantized_linears(model: MambaLMHeadModel) -> dict[str, torch.nn.Linear]:
    """The Linears Quamba quantizes, by state-dict path: every block's in_proj and out_proj."""
    linears = {}
    for i, block in enumerate(model.backbone.layers):
        out_proj = block.mixer.out_proj
        linears[f"backbone.layers.{i}.mixer.in_proj"] = block.mixer.in_proj
        linears[f"backbone.layers.{i}.mixer.out_proj"] = getattr(out_proj, "linear", out_proj)
    return linears
