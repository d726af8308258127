"""The Triton kernels of `int4_matmul`: y (m, out) = x (m, in) @ dequant(packed (out, in / 2)).T.

Imported only where Triton is installed. The widths (in / 2, a group's bytes) are compile-time
constants: a model has a handful of them, and the loop and the group index compile to constants.
Each program owns BLOCK_N output columns and one 16-row tile of x. It walks the packed bytes of its
columns BLOCK_BYTES at a time (2 * BLOCK_BYTES codes, inside one scale group), splits each byte into
its low code (even input column) and high code (odd input column) with sign-extending shifts, scales
them in float32 and rounds to x's dtype as the reference does, and accumulates both halves' products
with x's even and odd columns in float32.

`gemv` is the one-row case (batch-1 decode): there the tile kernel's 16-row `tl.dot` programs walk
whole rows 64 bytes at a time and are bound by latency (on an H100, 35 us for mamba2-2.7b's in_proj,
slower than cuBLAS's fp16 GEMV of four times the bytes: bench/README.md). It splits the inputs so
that about GEMV_PROGRAMS programs stream the weight at once, makes the same weight values, sums
exact float32 products with `tl.sum`, and adds the splits' partial sums in a fixed order in a second
kernel. TRITON_INTERPRET=1 runs both on the CPU (tests/test_int4_matmul.py).
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


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, part_ptr, N, stride_wn, stride_sn,
                      K_HALF: tl.constexpr, GROUP_BYTES: tl.constexpr, SPLIT_BYTES: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    """One row: program (n, k) sums its BLOCK_N columns over the packed bytes [k SPLIT_BYTES,
    (k + 1) SPLIT_BYTES) into part[k, cols] (float32). Each step reads a (BLOCK_N, BLOCK_BYTES)
    tile inside one scale group; the products of fp16 values are exact in float32."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    steps = tl.arange(0, BLOCK_BYTES)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for offset in range(0, SPLIT_BYTES, BLOCK_BYTES):
        start = pid_k * SPLIT_BYTES + offset
        byte = start + steps  # (BLOCK_BYTES,)
        byte_ok = byte < K_HALF
        packed = tl.load(w_ptr + cols[:, None] * stride_wn + byte[None, :],
                         mask=col_ok[:, None] & byte_ok[None, :], other=0)  # (BLOCK_N, BLOCK_BYTES) uint8
        codes = packed.to(tl.int8, bitcast=True)
        low = (codes << 4) >> 4
        high = codes >> 4
        group = tl.minimum(start // GROUP_BYTES, K_HALF // GROUP_BYTES - 1)  # a step past the end: codes 0
        scale = tl.load(s_ptr + cols * stride_sn + group, mask=col_ok, other=0.0)
        w_even = (low.to(tl.float32) * scale[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
        w_odd = (high.to(tl.float32) * scale[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
        x_even = tl.load(x_ptr + 2 * byte, mask=byte_ok, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + 2 * byte + 1, mask=byte_ok, other=0.0).to(tl.float32)
        acc += tl.sum(w_even * x_even[None, :], axis=1) + tl.sum(w_odd * x_odd[None, :], axis=1)
    tl.store(part_ptr + pid_k * N + cols, acc, mask=col_ok)


@triton.jit
def _sum_splits_kernel(part_ptr, y_ptr, N, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """y[cols] = sum over k of part[k, cols], in k's order (deterministic), cast to y's dtype."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(SPLITS):
        total += tl.load(part_ptr + k * N + cols, mask=ok, other=0.0)
    tl.store(y_ptr + cols, total.to(y_ptr.dtype.element_ty), mask=ok)


GEMV_BLOCK_N, GEMV_BLOCK_BYTES = 128, 64  # a step: 128 columns x 64 packed bytes (8 KB; one group of 128 codes)
GEMV_PROGRAMS = 528  # split-K until about this many programs (4 per SM of an H100's 132)


def gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """One row: x (1, in) fp16, packed (out, in / 2) uint8, scales float32 (out | 1, groups) ->
    (1, out). The weight is split along its inputs so that many programs stream it at once (a
    16-row tile walking whole rows leaves one row's GEMV bound by latency); the partial sums are
    added in a fixed order, so the result is the same on every run."""
    x, scales = x.contiguous(), scales.contiguous()
    out, k_half = packed.shape
    column_blocks = triton.cdiv(out, GEMV_BLOCK_N)
    steps = triton.cdiv(k_half, GEMV_BLOCK_BYTES)
    splits = max(1, min(steps, triton.cdiv(GEMV_PROGRAMS, column_blocks)))
    split_bytes = triton.cdiv(steps, splits) * GEMV_BLOCK_BYTES
    splits = triton.cdiv(k_half, split_bytes)
    partial = torch.empty(splits, out, dtype=torch.float32, device=x.device)
    stride_sn = 0 if scales.shape[0] == 1 else scales.stride(0)
    _int4_gemv_kernel[(column_blocks, splits)](
        x, packed, scales, partial, out, packed.stride(0), stride_sn, K_HALF=k_half,
        GROUP_BYTES=k_half // scales.shape[-1], SPLIT_BYTES=split_bytes, BLOCK_N=GEMV_BLOCK_N,
        BLOCK_BYTES=GEMV_BLOCK_BYTES)
    y = torch.empty(1, out, dtype=x.dtype, device=x.device)
    _sum_splits_kernel[(triton.cdiv(out, 1024),)](partial, y, out, SPLITS=splits, BLOCK=1024)
    return y


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
