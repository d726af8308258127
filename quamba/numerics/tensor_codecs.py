"""Quamba's integer formats for the tensors beyond in_proj and out_proj, and its W4 layers.

QUAMBA.md sections 6-8: what Quamba's W8A8 / W4A8 / W4A16 layers store and how they compute,
as formulas in its dtypes (fp16 where its code computes in fp16). Every codec here returns
integer values with a float32 scale that broadcasts over them (`dequantize_tensor` gives the
values the kernels compute with); which tensor gets which codec is `quamba.schemes`' table.

- `w8_per_tensor`: s = clamp(absmax, 1e-5) / 127 in the tensor's dtype, ties to even (linears,
  Mamba1's conv weight and bias in fp16; Mamba2's conv parts in fp32).
- `ssm_param_int8`: A_log, D, dt_bias: s = max(absmax / 127, 1e-5) in fp32, ties to even.
- `w4_marlin`: Marlin's int4 from fp16 values: groups of 128 with s = 2 absmax / 15, codes
  clamp(round(w / s) + 8, 0, 15) (levels -8..7); per channel where in_features <= 128 with
  s = absmax / 7, levels -7..7.
- `qqq_int8_weight`: W4A8's QQQ layer turns int4 group codes into int8 by an fp16 multiply with
  fp16(s_g / s_c), s_c = absmax_row(fp16 values) / 127, rounded ties to even; y = acc s_c s_in.
- `embedding_int`: the embedding per row by its signed maximum (not absmax): W8 s = max / 127,
  W4 s = max / 8 with codes clamp(round(e / s + 8), 0, 15).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quamba.errors import ConfigError
from quamba.numerics.quantizers import expand_scales, per_tensor_w8

SSM_PARAM_SCALE_FLOOR = 1e-5  # Quamba's scan: the scale of A_log, D, dt_bias clamped here
MARLIN_GROUP = 128  # Marlin's group; in_features <= 128 goes per channel


@dataclass(frozen=True, eq=False)
class IntegerTensor:
    """Integer values (torch.int8, in the codec's range) and float32 scales that broadcast over
    them, or (rows, groups) scales of a grouped 2-D weight."""

    q: torch.Tensor
    scale: torch.Tensor
    bits: int
    codec: str

    def dequantize(self) -> torch.Tensor:
        return dequantize_tensor(self.q, self.scale)


def dequantize_tensor(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 q * scale; (rows, groups) scales of a 2-D q are spread over each group's columns."""
    if q.dim() == 2 and scale.dim() == 2 and scale.shape[1] not in (1, q.shape[1]):
        scale = expand_scales(scale, q.shape[1])
    return q.to(torch.float32) * scale.to(torch.float32)


def _broadcast(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return scale.float().reshape((1,) * like.dim())


def w8_per_tensor(tensor: torch.Tensor, dtype: torch.dtype = torch.float16) -> IntegerTensor:
    """Quamba's per-tensor int8 weight, computed in `dtype`."""
    t = tensor.to(dtype)
    q, s = per_tensor_w8(t)
    return IntegerTensor(q, _broadcast(s, t), 8, f"w8 per tensor ({str(dtype).removeprefix('torch.')})")


def w8_per_part(tensor: torch.Tensor, sizes: list[int], dtype: torch.dtype) -> IntegerTensor:
    """One per-tensor int8 scale per consecutive block of rows (Mamba2's in_proj splits z, x, B,
    C, dt in fp16; its conv's x, B, C parts in fp32); scales (rows, 1, ...)."""
    qs, scales = [], []
    for part in tensor.split(sizes, dim=0):
        coded = w8_per_tensor(part, dtype)
        qs.append(coded.q)
        scales.append(coded.scale.reshape(1).expand(part.shape[0]))
    scale = torch.cat(scales).reshape(-1, *([1] * (tensor.dim() - 1)))
    return IntegerTensor(torch.cat(qs), scale, 8, f"w8 per part {sizes} ({str(dtype).removeprefix('torch.')})")


def ssm_param_int8(tensor: torch.Tensor) -> IntegerTensor:
    """A_log, D, dt_bias as Quamba's scan takes them: int8 per tensor in fp32."""
    t = tensor.to(torch.float32)
    s = (t.abs().amax() / 127).clamp(min=SSM_PARAM_SCALE_FLOOR)
    q = torch.round(t / s).clamp_(-128, 127).to(torch.int8)
    return IntegerTensor(q, _broadcast(s, t), 8, "int8 per tensor (fp32)")


def w4_marlin(weight: torch.Tensor) -> IntegerTensor:
    """Marlin's int4 weight (out, in) from its fp16 values: groups of 128 on the -8..7 grid, or
    per channel on -7..7 where in_features <= 128; scales (out, groups) from fp16."""
    w = weight.to(torch.float16)
    out, n_in = w.shape
    if n_in <= MARLIN_GROUP:
        s = w.abs().amax(dim=1, keepdim=True) / 7  # (out, 1), fp16
        q = torch.round(w / s).clamp_(-7, 7)
        return IntegerTensor(q.to(torch.int8), s.float(), 4, "w4 per channel, levels -7..7 (fp16)")
    if n_in % MARLIN_GROUP:
        raise ConfigError(f"w4: in_features {n_in} is not a multiple of Marlin's group of {MARLIN_GROUP}")
    groups = w.reshape(out, n_in // MARLIN_GROUP, MARLIN_GROUP)
    s = groups.abs().amax(dim=-1) * 2 / 15  # (out, groups), fp16
    codes = torch.round(groups / s.unsqueeze(-1)) + 8
    q = (codes.clamp_(0, 15) - 8).reshape(out, n_in)
    return IntegerTensor(q.to(torch.int8), s.float(), 4, "w4 groups of 128, levels -8..7 (fp16)")


def w4_from_values(values: torch.Tensor, scales: torch.Tensor) -> IntegerTensor:
    """Marlin's W4 layer from GPTQ's fp16 values (out, in) and group scales: codes recovered as
    round(W / s_g + 8) in fp16 for groups of 128; re-rounded per channel where in_features <= 128."""
    w = values.to(torch.float16)
    if w.shape[1] <= MARLIN_GROUP:
        return w4_marlin(w)
    s = scales.to(torch.float16)  # (out, groups)
    codes = torch.round(w / expand_scales(s, w.shape[1]) + 8).clamp_(0, 15)
    return IntegerTensor((codes - 8).to(torch.int8), s.float(), 4, "w4 groups of 128, levels -8..7 (fp16)")


def qqq_int8_weight(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W4A8's int8 weight as QQQ's kernel forms it from int4 codes q (out, in) and scales:
    (w_int8 (out, in) int8, s_c (out, 1) float32), the layer computing acc(x_int8, w_int8) s_c s_in.

    Groups: w_ref = fp16(q s_g); s_c = fp16(absmax_row(w_ref) / 127); s_hat = fp16(s_g / s_c)
    (NaN -> 0); w_int8 = rint(fp16(q s_hat)). Per channel (levels -7..7): the nibble shift makes
    w_int8 = 16 q with s_c = s / 16, so the weight is q s exactly.
    """
    if scales.shape[1] == 1:  # per channel
        s = scales.to(torch.float16)
        return (q.to(torch.int16) * 16).to(torch.int8), (s / 16).float()
    s_g = expand_scales(scales.to(torch.float16), q.shape[1])  # (out, in), fp16
    w_ref = q.to(torch.float16) * s_g
    s_c = w_ref.abs().amax(dim=1, keepdim=True) / 127  # (out, 1), fp16
    s_hat = torch.nan_to_num(s_g / s_c, nan=0.0)
    w_int8 = torch.round(q.to(torch.float16) * s_hat).clamp_(-128, 127).to(torch.int8)
    return w_int8, s_c.float()


def embedding_int(embedding: torch.Tensor, bits: int) -> IntegerTensor:
    """Quamba's W8O16 / W4O16 embedding (vocab, d): per row by the row's signed maximum, in fp16."""
    e = embedding.to(torch.float16)
    row_max = e.amax(dim=1, keepdim=True)  # (vocab, 1): amax, not absmax
    if bool((row_max <= 0).any()):
        rows = int((row_max <= 0).sum())
        raise ConfigError(f"quantize_embedding: {rows} embedding rows have no positive entry; Quamba's per-row "
                          f"signed-maximum scale needs one (set quantize_embedding: false)")
    if bits == 8:
        s = row_max / 127
        q = torch.round(e / s).clamp_(-128, 127)
    else:
        s = row_max / 8
        q = torch.round(e / s + 8).clamp_(0, 15) - 8
    return IntegerTensor(q.to(torch.int8), s.float(), bits, f"w{bits} per row by its signed maximum (fp16)")
