"""The Triton kernel of `int4_matmul`: y (m, out) = x (m, in) @ dequant(packed (out, in / 2)).T.

Imported only where Triton is installed. The widths (in / 2, a group's bytes) are compile-time
constants: a model has a handful of them, and the loop and the group index compile to constants.
Each program owns BLOCK_N output columns and one 16-row tile of x. It walks the packed bytes of its
columns BLOCK_BYTES at a time (2 * BLOCK_BYTES codes, inside one scale group), splits each byte into
its low code (even input column) and high code (odd input column) with sign-extending shifts, scales
them in float32 and rounds to x's dtype as the reference does, and accumulates both halves' products
with x's even and odd columns in float32. TRITON_INTERPRET=1 runs it on the CPU
(tests/test_int4_matmul.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 16  # tl.dot's smallest row tile


@triton.jit
def _int4_matmul_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_sn, stride_ym,
                        K_HALF: tl.constexpr, GROUP_BYTES: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    steps = tl.arange(0, BLOCK_BYTES)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K_HALF, BLOCK_BYTES):
        byte = start + steps  # (BLOCK_BYTES,)
        byte_ok = byte < K_HALF
        packed = tl.load(w_ptr + cols[:, None] * stride_wn + byte[None, :],
                         mask=col_ok[:, None] & byte_ok[None, :], other=0)  # (BLOCK_N, BLOCK_BYTES) uint8
        codes = packed.to(tl.int8, bitcast=True)
        low = (codes << 4) >> 4  # arithmetic shifts sign-extend each nibble
        high = codes >> 4
        scale = tl.load(s_ptr + cols * stride_sn + start // GROUP_BYTES, mask=col_ok, other=0.0)  # (BLOCK_N,)
        w_even = (low.to(tl.float32) * scale[:, None]).to(x_ptr.dtype.element_ty)
        w_odd = (high.to(tl.float32) * scale[:, None]).to(x_ptr.dtype.element_ty)
        x_mask = row_ok[:, None] & byte_ok[None, :]
        x_even = tl.load(x_ptr + rows[:, None] * stride_xm + 2 * byte[None, :], mask=x_mask, other=0.0)
        x_odd = tl.load(x_ptr + rows[:, None] * stride_xm + 2 * byte[None, :] + 1, mask=x_mask, other=0.0)
        acc += tl.dot(x_even, tl.trans(w_even))
        acc += tl.dot(x_odd, tl.trans(w_odd))
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, block_n: int,
           block_bytes: int) -> torch.Tensor:
    """x (m, in) fp16, packed (out, in / 2) uint8, scales float32 (out | 1, groups) -> (m, out)."""
    x, scales = x.contiguous(), scales.contiguous()
    rows, out = x.shape[0], packed.shape[0]
    y = torch.empty(rows, out, dtype=x.dtype, device=x.device)
    stride_sn = 0 if scales.shape[0] == 1 else scales.stride(0)  # one scale for the tensor: every row reads it
    grid = (triton.cdiv(out, block_n), triton.cdiv(rows, BLOCK_M))
    _int4_matmul_kernel[grid](x, packed, scales, y, rows, out, x.stride(0), packed.stride(0), stride_sn, y.stride(0),
                              K_HALF=packed.shape[1], GROUP_BYTES=packed.shape[1] // scales.shape[-1],
                              BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_BYTES=block_bytes)
    return y
