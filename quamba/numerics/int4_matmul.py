"""x @ W.T for 4-bit weights kept packed two per byte (`quantizers.pack_int4`): W4A16's GEMM.

The reference (CPU, float32, and wherever Triton is missing) dequantizes the codes into the float
weight, `dequantize_packed_int4(packed, scales).to(x.dtype)`, and calls F.linear. On CUDA the same
weight values are made inside the GEMM instead of in memory:

- few rows in fp16 (m <= FUSED_MAX_ROWS; one row by a split-K GEMV with GEMV_ON_CUDA): a Triton
  kernel reads the packed bytes and the scales, turns each code into (q * s) rounded to fp16 in
  registers, exactly the reference's weight, and accumulates x times it in float32. It reads a quarter of the fp16 weight's bytes,
  which is what a memory-bound GEMV is worth; only the order of the float32 sums differs from cuBLAS.
- otherwise (prefill, other dtypes): the dequantization as one compiled elementwise kernel (the
  reference's float32 multiply and cast, bit-equal to it) into a transient weight, then cuBLAS: the
  weight pass is a few percent of a prefill GEMM, and this path gives the reference's bits.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from quamba.numerics.quantizers import compiled, dequantize_packed_int4

FUSED_MAX_ROWS = 16  # rows up to which the fused kernel runs (one 16-row tile)
FUSED_ON_CUDA = True  # False: every CUDA call takes the dequantize-then-cuBLAS path (comparisons)
# One row (batch-1 decode) through the split-K GEMV kernel (`int4_kernel.gemv`). Off until its CUDA
# test and `bench.quantized_model --int4-gemv` have run on a GPU: only the interpreter has run it.
GEMV_ON_CUDA = False
BLOCK_N, BLOCK_BYTES = 32, 64  # a program's output columns and packed bytes per step (128 codes)


@functools.cache
def _triton():
    """The Triton kernel, built on first use (importing triton costs a second a CPU job never needs);
    None where Triton does not import."""
    try:
        from quamba.numerics import int4_kernel
    except ImportError:
        return None
    return int4_kernel


def _dequantized(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_packed_int4(packed, scales).to(dtype)


def fused_applies(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether `int4_linear` takes the fused kernel for this call."""
    rows = x.numel() // x.shape[-1]
    in_half = packed.shape[-1]
    groups = scales.shape[-1]  # a step of the kernel must not straddle two groups
    aligned = groups == 1 or (in_half // groups) % BLOCK_BYTES == 0
    return (FUSED_ON_CUDA and x.is_cuda and x.dtype == torch.float16 and rows <= FUSED_MAX_ROWS
            and aligned and _triton() is not None)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, dequantize_packed_int4(packed, scales).to(x.dtype), bias) for x (..., in),
    packed (out, in / 2) uint8 and float32 scales (out, groups), (out, 1) or (1, 1)."""
    if fused_applies(x, packed, scales):
        rows = x.reshape(-1, x.shape[-1])
        if GEMV_ON_CUDA and rows.shape[0] == 1:
            y = _triton().gemv(rows, packed, scales)
        else:
            y = _triton().matmul(rows, packed, scales, BLOCK_N, BLOCK_BYTES)
        y = y.view(*x.shape[:-1], -1)
        return y if bias is None else y + bias
    if x.is_cuda:
        weight = compiled(_dequantized, dtype=x.dtype)(packed, scales)
    else:
        weight = _dequantized(packed, scales, x.dtype)
    return F.linear(x, weight, bias)
