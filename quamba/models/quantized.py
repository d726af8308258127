"""The quantized model's modules (quamba.models.apply puts them in place).

`QuantLinear` runs an integer weight: int8 weights with int8 activations (w8a8, and w4a8 as QQQ's
int8 weights) through the exact int8 GEMM and Quamba's epilogue on CPU and CUDA alike, the others
through a float weight: int4 weights stay packed two per byte and are dequantized inside the GEMM
(`int4_matmul`; the float weight is never kept), int8 ones are dequantized once. `QuantEmbedding`
keeps a quantized embedding's integer rows and dequantizes only the rows it looks up. Taps
fake-quantize activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quamba.models.lm import MambaLMHeadModel
from quamba.numerics import quantizers
from quamba.numerics.hadamard import hadamard_transform, quantized_hadamard_factor, quantized_hadamard_transform
from quamba.numerics.int4_matmul import int4_linear
from quamba.numerics.quantizers import (
    HALF_EVEN,
    compiled,
    dequantize,
    dequantize_packed_int4,
    expand_scales,
    pack_int4,
    quantize,
    round_to_integer,
    unpack_int4,
)
from quamba.numerics.tensor_codecs import qqq_int8_weight

MIN_INT_MM_ROWS = 16  # torch._int_mm on CUDA needs more rows than this
LINEAR_INPUT_TAPS = {"in_proj": "in_proj:input", "out_proj": "out_proj:input"}


# The int8 GEMM's epilogue as Quamba's layers call it (QUAMBA.md section 8): the exact int32
# accumulator times two float32 factors, in this order, v = (acc * first) * second:
#   forward (out_proj, lm_head, Mamba1 x_proj)     first = s_w,          second = s_in / s_out
#   seqlen_last (Mamba1 in_proj, dt_proj)          first = s_in / s_out, second = s_w
#   parallel (Mamba2 in_proj, a scale per split)   first = s_w / s_out,  second = s_in
#   QQQ (W4A8, s_c a scale per output row)         first = s_c / s_out,  second = s_in
# s_in / s_out is a double rounded to float32 (Quamba passes a Python float); without an int8
# output s_out is 1 and v is cast to the model's dtype (fp16 on a GPU).
EPILOGUES = ("forward", "seqlen_last", "parallel")


def _epilogue(acc: torch.Tensor, first: torch.Tensor, second: torch.Tensor, dtype: torch.dtype,
              out_scale: torch.Tensor | None, rounding: str) -> torch.Tensor:
    v = (acc.to(torch.float32) * first) * second
    if out_scale is None:
        return v.to(dtype)
    q = round_to_integer(v, rounding).clamp_(-128, 127)  # the kernel's saturating int8 output
    return (q * out_scale).to(dtype)  # dequantized: the next tap takes back exactly these integers


def _fused_epilogue(acc, first, second, dtype, out_scale, rounding) -> torch.Tensor:
    """The epilogue as one kernel on CUDA where the activation quantizers are fused."""
    if quantizers.FUSE_ON_CUDA and acc.is_cuda:
        fn = compiled(_epilogue, dtype=dtype, rounding=rounding)
        return fn(acc, first, second, out_scale=out_scale)
    return _epilogue(acc, first, second, dtype, out_scale, rounding)


def int8_matmul(x2d: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """The exact int32 product x2d (m, in) @ qweight (out, in).T of int8 values, as the GEMM
    accumulates it: torch._int_mm on CPU (any shape) and CUDA (m > 16, padded with zero rows;
    dims multiples of 8), float64 elsewhere (exact: |acc| < 2^53).

    Inside torch.compile it is one opaque operator (`quamba::int8_matmul`): inductor would
    otherwise lower the padding and `_int_mm` itself and may hand cuBLAS a column-major int8
    operand, a layout its int8 GEMM refuses (CUBLAS_STATUS_NOT_SUPPORTED on an H200)."""
    if torch.compiler.is_compiling():
        return torch.ops.quamba.int8_matmul(x2d, qweight)
    return _int8_matmul(x2d, qweight)


def _int8_matmul(x2d: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    rows = x2d.shape[0]
    if not x2d.is_cuda:
        return torch._int_mm(x2d, qweight.t())
    if x2d.shape[1] % 8 or qweight.shape[0] % 8:
        return (x2d.double() @ qweight.double().t()).to(torch.int32)
    x2d = x2d.contiguous()  # row-major: cuBLAS's int8 GEMM takes no other layout of this operand
    if rows <= MIN_INT_MM_ROWS:
        x2d = F.pad(x2d, (0, 0, 0, MIN_INT_MM_ROWS + 1 - rows))
    return torch._int_mm(x2d, qweight.t())[:rows]


@torch.library.custom_op("quamba::int8_matmul", mutates_args=())
def _int8_matmul_op(x2d: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    return _int8_matmul(x2d, qweight)


@_int8_matmul_op.register_fake
def _(x2d: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    return x2d.new_empty((x2d.shape[0], qweight.shape[0]), dtype=torch.int32)


class QuantLinear(nn.Module):
    """y = dequant(q) applied to x, with x quantized to int8 with a static scale (schemes with
    8-bit activations); out_proj's input is Hadamard-rotated first, and with 8-bit activations
    rotated and quantized in one step as Quamba's QHadamard (`quantized_hadamard_transform`).

    Int8 weights with int8 activations (W8A8, and W4A8 once QQQ has turned its int4 codes into
    int8 with a scale per row) compute as Quamba's kernels do, on CPU and CUDA alike: the exact
    int32 accumulator (`int8_matmul`), then the epilogue's two float32 multiplies in the order of
    the layer's call (`epilogue`), and, where the next op takes int8 (`out_scale`: Mamba1's
    in_proj, Mamba2's in_proj splits), the saturating int8 output; no float copy of the weight is
    kept on CUDA. Other layers multiply a float weight: int4 ones (W4A16; W4A8 with w4_layout
    gptq_codes) hold their codes packed two per byte (`pack_int4`) and multiply through
    `int4_linear` (on CUDA the weight is made inside the GEMM), so a 4-bit model stays 4-bit in
    memory; int8 ones dequantize once per device and dtype.
    """

    plan_buffers = ("qweight", "scales")  # the plan's integers: a dir writes them from the plan
    float32_buffers = ("scales",)  # float32 whatever the model's dtype, as Quamba keeps them

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bits: int, bias: torch.Tensor | None,
                 act_scale: float | None, rotate_input: str | None, rounding: str = HALF_EVEN, qqq: bool = False,
                 epilogue: str = "forward", out_scale: torch.Tensor | None = None, out_rounding: str = HALF_EVEN,
                 add_bias: bool = True, gemv_rounding: str | None = None):
        super().__init__()
        if epilogue not in EPILOGUES:
            raise ValueError(f"epilogue: {epilogue!r}; allowed: {list(EPILOGUES)}")
        self.bits, self.act_scale, self.rotate_input = bits, act_scale, rotate_input
        self.quantizes_input = act_scale is not None  # forward tests this, never the float itself
        self.rounding = rounding  # of the int8 input: the norm's (ties to even) or the Hadamard's (away)
        self.epilogue, self.out_rounding, self.qqq = epilogue, out_rounding, qqq
        self.gemv_rounding = gemv_rounding  # of the int8 output at one row (Mamba2 in_proj's GEMV), None: the same
        self.out_features, self.in_features = qweight.shape
        if qqq:  # W4A8 as QQQ's kernel: the int4 codes turned into int8 with one scale per row
            qweight, scales = qqq_int8_weight(qweight.to(torch.int8), scales)
        self.int8_weight = bits == 8 or qqq  # qweight holds int8 values the GEMM can take as they are
        self.packed = bits == 4 and not qqq  # qweight holds two int4 codes per byte
        qweight = qweight.to(torch.int8)
        self.register_buffer("qweight", pack_int4(qweight) if self.packed else qweight)  # (out, in | in / 2)
        self.register_buffer("scales", scales.float())  # (out, groups), (out, 1) or (1, 1)
        # the int8 output's scale per output row (None: the layer writes the model's dtype)
        self.out_scale = None if out_scale is None else out_scale.float().reshape(-1)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.add_bias = add_bias  # False: the bias belongs to a later op (Mamba1's dt_proj: the scan's delta bias)
        self._reference: torch.Tensor | None = None  # the float weight, made when a path needs it
        self._factors: tuple[torch.Tensor, ...] | None = None  # the epilogue's, on the layer's device
        self._act_scale_tensor: torch.Tensor | None = None  # act_scale in float32 on the layer's device
        self._rotation_factor: torch.Tensor | None = None  # the quantized Hadamard's, on the layer's device

    def reference_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight on the layer's device in `dtype`: made for this call from packed
        int4 codes, made once and kept for int8 ones."""
        if self.packed:
            return dequantize_packed_int4(self.qweight, self.scales).to(dtype)
        cached = self._reference
        if cached is None or cached.device != self.qweight.device or cached.dtype != dtype:
            self._reference = dequantize(self.qweight, expand_scales(self.scales, self.in_features)).to(dtype)
        return self._reference

    def epilogue_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(first, second, out_scale) of the epilogue, float32 on the layer's device, made once."""
        device = self.qweight.device
        if self._factors is None or self._factors[0].device != device:
            s_w = self.scales.to(device=device, dtype=torch.float32).reshape(-1)  # (1,) or (out,)
            s_in = self.act_scale_on(device)
            out = None if self.out_scale is None else self.out_scale.to(device)
            if self.qqq or self.epilogue == "parallel":
                factors = (s_w if out is None else s_w / out, s_in, out)
            else:
                ratio = s_in if out is None else torch.tensor(  # a double rounded to float32, as Quamba's
                    self.act_scale / float(self.out_scale[0]), dtype=torch.float32, device=device)
                factors = (ratio, s_w, out) if self.epilogue == "seqlen_last" else (s_w, ratio, out)
            self._factors = factors
        return self._factors

    def act_scale_on(self, device: torch.device) -> torch.Tensor:
        """act_scale as a float32 tensor on `device`, made once (as Tap.scale_on: the same values,
        and an input, not a constant, of a compiled block)."""
        cached = self._act_scale_tensor
        if cached is None or cached.device != device:
            self._act_scale_tensor = cached = torch.tensor(self.act_scale, dtype=torch.float32, device=device)
        return cached

    def rotation_factor_on(self, device: torch.device) -> torch.Tensor:
        """The quantized Hadamard's factor (1 / sqrt(in)) / act_scale, float32 on `device`, made once."""
        cached = self._rotation_factor
        if cached is None or cached.device != device:
            factor = quantized_hadamard_factor(self.in_features, self.act_scale)
            self._rotation_factor = cached = torch.tensor(factor, dtype=torch.float32, device=device)
        return cached

    def materialize(self, device: torch.device, dtype: torch.dtype) -> None:
        """Make now, on `device`, the tensors this layer's forward would make on its first call
        (MambaLMHeadModel.compile_blocks): the input scale, the epilogue's factors, an int8 float copy."""
        if self.quantizes_input:
            self.act_scale_on(device)
            if self.rotate_input is not None:
                self.rotation_factor_on(device)
        if self.integer_path():
            self.epilogue_factors()
        elif not self.packed:
            self.reference_weight(dtype)

    def integer_path(self) -> bool:
        """Whether forward runs the int8 GEMM (int8 weights, int8 input, one scale per row)."""
        return self.int8_weight and self.quantizes_input and self.scales.shape[-1] == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None or not self.add_bias else self.bias.to(x.dtype)
        if not self.quantizes_input:
            if self.rotate_input is not None:  # the Hadamard kind of out_proj's input rotation (W4A16)
                x = hadamard_transform(x, self.rotate_input)
            return self._float_linear(x, bias)
        act_scale = self.act_scale_on(x.device)
        if self.rotate_input is not None:  # Quamba's QHadamard: rotated and quantized in one step
            x_q = quantized_hadamard_transform(x, self.rotation_factor_on(x.device), self.rotate_input, self.rounding)
        else:
            x_q = quantize(x, act_scale, 8, self.rounding)  # (..., in) int8
        if self.integer_path():
            acc = int8_matmul(x_q.reshape(-1, self.in_features), self.qweight)  # (m, out) int32, exact
            first, second, out_scale = self.epilogue_factors()
            rounding = self.gemv_rounding if acc.shape[0] == 1 and self.gemv_rounding else self.out_rounding
            y = _fused_epilogue(acc, first, second, x.dtype, out_scale, rounding)
            y = y.view(*x.shape[:-1], -1)
            return y if bias is None else y + bias
        return self._float_linear(dequantize(x_q, act_scale).to(x.dtype), bias)

    def _float_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x times the float weight: packed int4 codes through `int4_linear` (on CUDA the weight is
        made inside the GEMM, or once per call for many rows), int8 ones through their kept copy."""
        if self.packed:
            return int4_linear(x, self.qweight, self.scales, bias)
        return F.linear(x, self.reference_weight(x.dtype), bias)

    def weight_bytes(self) -> int:
        """Bytes this layer holds on its device for its weight: integers, scales, any float copy."""
        held = self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * 4
        if self._reference is not None:
            held += self._reference.numel() * self._reference.element_size()
        return held


class QuantEmbedding(nn.Module):
    """Quamba's W8O16 / W4O16 embedding (QUAMBA.md section 6): integer rows with a float32 scale
    per row, dequantized on lookup, so the vocabulary matrix stays integer in memory (int4 codes
    packed two per byte). A looked-up row is float32(q) * scale cast to the model's dtype, the
    value the dequantized matrix held before: the scale is an fp16 value, so in fp16 this is
    Quamba's fp16 multiply exactly.

    The model's dtype and device follow `.to()` through `like`, an empty buffer, since there is
    no float weight to read them from.
    """

    plan_buffers = ("qweight", "scale")
    float32_buffers = ("scale",)

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"QuantEmbedding: bits {bits}; allowed: 4, 8")
        self.bits = bits
        self.num_embeddings, self.embedding_dim = q.shape
        q = q.to(torch.int8)
        self.register_buffer("qweight", pack_int4(q) if bits == 4 else q)  # (vocab, d | d / 2)
        self.register_buffer("scale", scale.float().reshape(-1, 1))  # (vocab, 1)
        self.register_buffer("like", torch.empty(0, dtype=dtype, device=q.device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.like.dtype

    @property
    def device(self) -> torch.device:
        return self.like.device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[input_ids]  # (..., d | d / 2)
        q = unpack_int4(rows) if self.bits == 4 else rows
        return (q.to(torch.float32) * self.scale[input_ids].float()).to(self.dtype)


INTEGER_MODULES = (QuantLinear, QuantEmbedding)


def quantized_linears(model: MambaLMHeadModel) -> dict[str, torch.nn.Linear]:
    """The Linears Quamba quantizes, by state-dict path: every block's in_proj and out_proj."""
    linears = {}
    for i, block in enumerate(model.backbone.layers):
        out_proj = block.mixer.out_proj
        linears[f"backbone.layers.{i}.mixer.in_proj"] = block.mixer.in_proj
        linears[f"backbone.layers.{i}.mixer.out_proj"] = getattr(out_proj, "linear", out_proj)
    return linears
