"""Integer formats of the project: signed integers with float scales, and the rounding modes.

Rounding (recipe option `rounding`): Quamba rounds differently by operation (QUAMBA.md section 8):
ties to even (torch.round, rint, cvt.rni) for every weight, for the norm's int8 output and for
int8 GEMM outputs; ties away from zero (CUDA roundf) for the conv's int8 output, the quantized
Hadamard's output and the prefill SSM state. `ROUNDING_BY_POINT` says which each tap is;
`rounding: half_away` (the project's earlier choice) uses ties away from zero everywhere.

Values: q = clamp(round(x / scale), qmin, qmax) with (qmin, qmax) = (-2^(b-1), 2^(b-1) - 1).
Grids (recipe option `int4_grid`, and GPTQ at 8 bits): Quamba's (GPTQ's symmetric quantizer)
s = 2 absmax / (2^b - 1), so +absmax lands on 7.5 -> 7 at 4 bits and -absmax on -8: levels -8..7;
"symmetric" s = absmax / (2^(b-1) - 1): levels -7..7. Integers of any width up to 8 bits live in
torch.int8; int4 is packed two per byte only for storage (`pack_int4`).

Weight granularities (W is (out_features, in_features), as in nn.Linear):
- "tensor": one scale (Quamba's W8A8 weights); scales (1, 1).
- "channel": one scale per output row; scales (out, 1).
- "group": one scale per row and per `group_size` consecutive input columns; scales
  (out, in / group_size); per-channel when in_features <= group_size, as Quamba does.
"""

from __future__ import annotations

import functools

import torch

WEIGHT_SCALE_FLOOR = 1e-8  # an all-zero row or group still gets a finite, positive scale
ACTIVATION_SCALE_FLOOR = 1e-6  # Quamba floors every activation scale here (its observers' scale = value / 127)
PER_TENSOR_ABSMAX_FLOOR = 1e-5  # Quamba's per-tensor W8 scale: clamp(absmax, 1e-5) / 127
GRANULARITIES = ("tensor", "channel", "group")
ROUNDINGS = ("half_even", "half_away")
GRIDS = ("quamba", "symmetric")
HALF_EVEN, HALF_AWAY = ROUNDINGS
# Quamba's rounding of the int8 value each tap's quantizer writes (QUAMBA.md section 8)
ROUNDING_BY_POINT = {
    "in_proj:input": HALF_EVEN,  # QRMSNorm -> int8: rint
    "lm_head:input": HALF_EVEN,  # norm_f as QRMSNorm
    "in_proj:output": HALF_EVEN,  # int8 GEMM epilogue: cvt.rni
    "x_proj:output": HALF_EVEN,
    "dt_proj:output": HALF_EVEN,
    "z_act:input": HALF_EVEN,  # Mamba2's in_proj splits, GEMM outputs
    "x_conv_in:input": HALF_EVEN,
    "B_conv_in:input": HALF_EVEN,
    "C_conv_in:input": HALF_EVEN,
    "dt_act:input": HALF_EVEN,
    "x_proj:input": HALF_AWAY,  # conv1d + SiLU -> int8: roundf
    "x_conv_out:input": HALF_AWAY,
    "B_conv_out:input": HALF_AWAY,
    "C_conv_out:input": HALF_AWAY,
    "out_proj:input": HALF_AWAY,  # the quantized Hadamard: roundf
    "ssm_state_act:input": HALF_AWAY,  # the int8 state: roundf
}


# Where Quamba's rounding depends on more than the point (QUAMBA.md section 8). The state's int8
# values: Mamba1's prefill scan writes them with roundf (above), Mamba2's prefill final state
# (quant_ssm_states) with rint, and every decoding step requantizes the state with rint in both
# families (selective_state_update). Mamba2's in_proj at one row is the Parallel GEMV, which rounds
# its int8 outputs with roundf where the GEMM uses rint. (The requantizations compute (v k) / (s k)
# with k = 1e2 or 1e6; QUAMBA.md does not say which k where, so we divide v / s.)
MAMBA2_ROUNDING_BY_POINT = {"ssm_state_act:input": HALF_EVEN}
STEP_ROUNDING_BY_POINT = {"ssm_state_act:input": HALF_EVEN}
GEMV_ROUNDING = HALF_AWAY


def point_rounding(point: str, rounding_option: str, layer: str = "Mamba1") -> str:
    """The rounding of a tap's quantizer in the prefill, under the recipe's `rounding` option."""
    if rounding_option == HALF_AWAY:
        return HALF_AWAY
    if layer == "Mamba2" and point in MAMBA2_ROUNDING_BY_POINT:
        return MAMBA2_ROUNDING_BY_POINT[point]
    return ROUNDING_BY_POINT[point]


def step_rounding(rounding_option: str) -> dict[str, str]:
    """tap point -> the rounding of its quantizer in a decoding step, where it is not the prefill's."""
    return {point: HALF_AWAY if rounding_option == HALF_AWAY else mode
            for point, mode in STEP_ROUNDING_BY_POINT.items()}


def gemv_rounding(rounding_option: str) -> str:
    """The rounding of Mamba2 in_proj's int8 outputs at one row (the Parallel GEMV)."""
    return HALF_AWAY if rounding_option == HALF_AWAY else GEMV_ROUNDING


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest integer, ties away from zero (CUDA roundf); same dtype as x.

    Exact for every float: x - trunc(x) is exact, so the tie test never sees a rounded sum
    (floor(|x| + 0.5) would send 0.49999997 to 1 in float32; roundf sends it to 0).
    """
    whole = torch.trunc(x)
    fraction = x - whole  # exact; |fraction| < 1 with the sign of x
    return whole + torch.where(fraction.abs() >= 0.5, torch.sign(fraction), torch.zeros_like(fraction))


def round_to_integer(x: torch.Tensor, rounding: str) -> torch.Tensor:
    """x rounded to integers: ties to even (torch.round) or away from zero."""
    if rounding == HALF_EVEN:
        return torch.round(x)
    if rounding == HALF_AWAY:
        return round_half_away(x)
    raise ValueError(f"rounding: {rounding!r} is not a rounding mode; allowed: {list(ROUNDINGS)}")


def qrange(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of a signed two's-complement integer of `bits`: int8 (-128, 127), int4 (-8, 7)."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits: {bits!r} is not supported; allowed: integers 2..8 (stored in int8)")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


OBSERVED_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                   "float64": torch.float64}  # the dtypes an observer may have seen, by name


def observed_dtype(name: str) -> torch.dtype:
    """The torch dtype of an observed-dtype name (stats.json, scales.json, quant_config.json)."""
    if name not in OBSERVED_DTYPES:
        raise ValueError(f"observed dtype: {name!r}; allowed: {list(OBSERVED_DTYPES)}")
    return OBSERVED_DTYPES[name]


def activation_scale(threshold: float, bits: int = 8, scale_dtype: str = "float32") -> float:
    """A static activation scale as Quamba's observer derives it from its value: threshold / qmax
    computed in `scale_dtype`, then cast to float32 and floored at 1e-6 (a float32 value, returned as
    a Python float). Its min/max observer keeps the running max in the observed tensor's dtype and
    divides there (fp16 on its fp16 model: the scale is rounded to fp16 first); its percentile
    observer's EMA is float32."""
    qmax = qrange(bits)[1]
    value = torch.tensor(threshold, dtype=observed_dtype(scale_dtype)) / qmax
    return float(value.to(torch.float32).clamp(min=ACTIVATION_SCALE_FLOOR))


def activation_scales(thresholds: torch.Tensor, bits: int = 8, scale_dtype: str = "float32") -> torch.Tensor:
    """`activation_scale` of every element (float32): grouped scales, one per group's threshold,
    divided in `scale_dtype` (Quamba2's per-SSD-group observer of B and C keeps the observed dtype;
    its grouped x and state observers cast to float32 first)."""
    scales = thresholds.to(observed_dtype(scale_dtype)) / qrange(bits)[1]
    return scales.to(torch.float32).clamp(min=ACTIVATION_SCALE_FLOOR)


def _quantize(x: torch.Tensor, scale: torch.Tensor | float, bits: int, rounding: str) -> torch.Tensor:
    qmin, qmax = qrange(bits)
    compute = torch.promote_types(x.dtype, torch.float32)
    scaled = x.to(compute) / (scale.to(compute) if isinstance(scale, torch.Tensor) else scale)
    return round_to_integer(scaled, rounding).clamp_(qmin, qmax).to(torch.int8)


def _fake_quantize(x: torch.Tensor, scale: torch.Tensor | float, bits: int, rounding: str) -> torch.Tensor:
    return dequantize(_quantize(x, scale, bits, rounding), scale).to(x.dtype)


# On CUDA the chain of elementwise kernels above (cast, divide, round, clamp, cast, multiply, cast)
# runs as one kernel compiled by torch.compile (Triton), with the same float32 arithmetic, so its
# results equal the eager ones bit for bit (tests/test_cuda_quant.py). The CPU reference stays
# eager. FUSE_ON_CUDA = False turns it off (bench/quantized_model.py measures both).
FUSE_ON_CUDA = True


def allow_many_variants(limit: int = 256) -> None:
    """Raise dynamo's limit on the graphs it keeps per Python function (8 by default).

    Every variant (dtype, rank, scale shape, bits, rounding, grad or inference mode; for a compiled
    block also prefill or step, with or without a cache, and each model's module structure) compiles
    the same Python function, and dynamo counts them per function. Past the limit a call runs
    eagerly, with a warning only (the same bits, more kernels; fullgraph=True would raise): a
    process that meets many variants (the CUDA tests, a benchmark of several models) would time
    eager code as compiled code."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


@functools.cache
def compiled(fn, **constants):
    """fn compiled once per set of constant arguments (bits, rounding: fixed in the kernel), with
    the tensors' sizes dynamic from the start: every shape of a rank shares one kernel (sizes 0 and
    1 still specialize). torch's default compiles a first shape static and recompiles at the second,
    so each evaluation process paid two compilations per variant; on this CPU the second was 1 s of
    4. The sizes are marked per call (`torch._dynamo.maybe_mark_dynamic`), not by `dynamic=True`:
    that also turns the int constants into symbols, and torch 2.11 then fails on qrange's shift."""
    import torch._dynamo

    allow_many_variants()
    plain = functools.partial(fn, **constants) if constants else fn
    kernel = torch.compile(plain, options=eager_numerics())

    def call(*args, **kwargs):
        if torch.compiler.is_compiling():  # traced into a compiled block: inlined there, under its settings
            return plain(*args, **kwargs)  # (dynamo forbids marking sizes dynamic while it traces)
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                for dim in range(value.dim()):
                    torch._dynamo.maybe_mark_dynamic(value, dim)
        # Every variant is the same Python function to dynamo, so after a second value of an int
        # constant (the Hadamard's m and p, bits) its automatic dynamic shapes would make the int a
        # symbol: slow symbolic compiles (20-157 s a variant on this CPU, against 1-3 s) and the
        # shift that fails on torch 2.11. Off for the call (4.6 us; config.patch costs 22 us).
        config = torch._dynamo.config
        automatic = config.automatic_dynamic_shapes
        config.automatic_dynamic_shapes = False
        try:
            return kernel(*args, **kwargs)
        finally:
            config.automatic_dynamic_shapes = automatic

    return call


def eager_numerics() -> dict[str, bool]:
    """Inductor options under which a compiled kernel does each float operation as eager does:
    without them Triton divides approximately (div.full.f32), contracts a * b + c into one fma and
    keeps fused fp16 intermediates in float32; each can move a value by an ulp and so flip a
    rounding to integers. Not covered: off the CPU, inductor turns a division by a constant into a
    multiplication by its reciprocal whatever the options, so code meant to compile bit-equal
    divides by tensors or multiplies by constants. The division option's name differs between
    torch releases."""
    from torch._inductor import config

    options = {"emulate_precision_casts": True}  # also turns off fp fusion (fma) in Triton kernels
    if hasattr(config, "emulate_divison_rounding"):  # torch <= 2.10 spells it so
        options["emulate_divison_rounding"] = True
    elif hasattr(getattr(config, "eager_numerics", None), "division_rounding"):
        options["eager_numerics.division_rounding"] = True
    return options


def _fused(fn, x: torch.Tensor, scale: torch.Tensor | float, bits: int, rounding: str) -> torch.Tensor:
    if not (FUSE_ON_CUDA and x.is_cuda):
        return fn(x, scale, bits, rounding)
    if not isinstance(scale, torch.Tensor):  # a Python float would be baked into the kernel: one per value
        scale = torch.full((), scale, dtype=torch.float32, device=x.device)
    return compiled(fn, bits=bits, rounding=rounding)(x, scale.to(x.device))


def quantize(x: torch.Tensor, scale: torch.Tensor | float, bits: int, rounding: str = HALF_AWAY) -> torch.Tensor:
    """Integers clamp(round(x / scale), qmin, qmax) as torch.int8, shape of x.

    scale broadcasts against x. Computed in at least float32 (fp16 x / scale would round the
    quotient before the rounding to integers does). We divide by the scale; a kernel that
    multiplies by 1 / scale can differ by one step on values within an ulp of a tie.
    """
    return _fused(_quantize, x, scale, bits, rounding)


def dequantize(q: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Floats q * scale: float32 for float32 or Python-float scales (torch's type promotion)."""
    return q.to(torch.float32) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor | float, bits: int, rounding: str = HALF_AWAY) -> torch.Tensor:
    """x snapped to its quantization grid (dequantize(quantize(x))), in the dtype of x."""
    return _fused(_fake_quantize, x, scale, bits, rounding)


def grid_scale(absmax: torch.Tensor, bits: int, grid: str) -> torch.Tensor:
    """The scale of a weight group from its absmax: Quamba's 2 absmax / (2^b - 1), whose all-zero
    groups get absmax 1 as in GPTQ's quantizer, or the symmetric absmax / (2^(b-1) - 1)."""
    if grid == "quamba":
        return torch.where(absmax == 0, torch.ones_like(absmax), absmax) * (2 / (2 ** bits - 1))
    if grid == "symmetric":
        return (absmax / qrange(bits)[1]).clamp_(min=WEIGHT_SCALE_FLOOR)
    raise ValueError(f"grid: {grid!r} is not a weight grid; allowed: {list(GRIDS)}")


def per_tensor_w8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quamba's per-tensor int8 weight, in the weight's dtype (fp16 for its linears): s =
    clamp(absmax, 1e-5) / 127, q = clamp(round_half_even(w / s), -128, 127); s as float32 (1, 1)."""
    s = weight.abs().amax().clamp(min=PER_TENSOR_ABSMAX_FLOOR) / 127  # in weight's dtype
    q = torch.round(weight / s).clamp_(-128, 127).to(torch.int8)
    return q, s.float().reshape(1, 1)


def group_width(in_features: int, granularity: str, group_size: int = 128) -> int:
    """How many consecutive input columns share one scale; validates the granularity."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: {granularity!r} is not supported; allowed: {list(GRANULARITIES)}")
    if group_size <= 0:
        raise ValueError(f"group_size: must be positive, got {group_size}")
    if granularity != "group" or in_features <= group_size:
        return in_features
    if in_features % group_size != 0:
        raise ValueError(f"group_size: in_features {in_features} is not a multiple of group_size "
                         f"{group_size}; allowed: a divisor of in_features, or >= in_features (per-channel)")
    return group_size


def weight_scales(weight: torch.Tensor, bits: int, granularity: str, group_size: int = 128,
                  grid: str = "symmetric") -> torch.Tensor:
    """Absmax scales of a weight (out, in): float32 (1, 1), (out, 1) or (out, in / group_size).

    Use `expand_scales` to get one scale per weight entry.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight: expected (out_features, in_features), got shape {tuple(weight.shape)}")
    n_out, n_in = weight.shape
    width = group_width(n_in, granularity, group_size)
    magnitude = weight.detach().to(torch.float32).abs()  # (out, in)
    if granularity == "tensor":
        absmax = magnitude.amax().reshape(1, 1)  # (1, 1)
    else:
        absmax = magnitude.reshape(n_out, n_in // width, width).amax(dim=-1)  # (out, n_groups)
    return grid_scale(absmax, bits, grid)


def expand_scales(scales: torch.Tensor, in_features: int) -> torch.Tensor:
    """Scales (rows, n_groups) repeated along columns to (rows, in_features), group-major."""
    n_groups = scales.shape[-1]
    if in_features % n_groups != 0:
        raise ValueError(f"scales: {n_groups} groups do not divide in_features {in_features}")
    return scales.repeat_interleave(in_features // n_groups, dim=-1)  # (rows, in_features)


def dequantize_packed_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 q * s of `pack_int4` codes (rows, in / 2) with scales (rows, groups), (rows, 1) or
    (1, 1): the values of dequantize(q, expand_scales(scales, in)), without the (rows, in) scale
    tensor (each group is multiplied by its scale in place of a repeated copy)."""
    q = unpack_int4(packed)  # (rows, in) int8
    rows, n_in = q.shape
    groups = scales.shape[-1]
    if n_in % groups:
        raise ValueError(f"scales: {groups} groups do not divide in_features {n_in}")
    grouped = q.view(rows, groups, n_in // groups).to(torch.float32) * scales.float().unsqueeze(-1)
    return grouped.view(rows, n_in)


def _check_int4(q: torch.Tensor) -> None:
    if q.dtype != torch.int8:
        raise ValueError(f"pack_int4: expected torch.int8 values, got {q.dtype}")
    if q.dim() == 0 or q.shape[-1] % 2 != 0:
        raise ValueError(f"pack_int4: the last dimension must be even, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"pack_int4: values must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values (..., n) in int8, n even -> torch.uint8 (..., n / 2), two per byte.

    Layout: byte j holds q[..., 2j] in its low nibble and q[..., 2j + 1] in its high nibble,
    each as a 4-bit two's-complement pattern (-8 -> 0x8, -1 -> 0xF, 7 -> 0x7). This is a
    storage format; kernel layouts (Marlin's interleaving) are produced from it when needed.
    """
    _check_int4(q)
    low = q[..., 0::2].to(torch.uint8) & 0x0F  # (..., n/2); int8 -> uint8 keeps the bit pattern
    high = q[..., 1::2].to(torch.uint8) & 0x0F
    return low | (high << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The exact inverse of `pack_int4`: torch.uint8 (..., m) -> int8 values (..., 2m) in [-8, 7]."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: expected torch.uint8, got {packed.dtype}")
    as_int8 = packed.contiguous().view(torch.int8)
    low = (packed << 4).contiguous().view(torch.int8) >> 4  # arithmetic shift sign-extends the nibble
    high = as_int8 >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)  # (..., 2m), even index from the low nibble
