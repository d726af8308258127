"""W4A16's GEMM on packed int4 weights: the CPU reference, and the Triton kernel run by Triton's
interpreter on the CPU (skipped where Triton is not installed; tests/test_cuda_quant.py runs it
compiled on a GPU) against it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quamba.numerics import int4_matmul
from quamba.numerics.quantizers import dequantize_packed_int4, pack_int4

# (rows, out, in, groups): group 128, per channel (one group, in / 2 not a multiple of the step:
# a masked tail), per tensor ("tensor": one scale), out not a multiple of the kernel's 32 columns,
# and a GEMV split 16 ways (1024 packed bytes, 3 column blocks of 128)
CASES = [(1, 96, 512, 4), (5, 70, 320, 1), (16, 40, 256, "tensor"), (3, 33, 384, 3), (1, 300, 2048, 16)]


def layer(out, n_in, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (out, n_in), generator=g, dtype=torch.int8)
    scales = torch.rand(1, 1, generator=g) if groups == "tensor" else torch.rand(out, groups, generator=g) * 0.1
    return pack_int4(q), scales


def reference(x, packed, scales, bias=None):
    return F.linear(x, dequantize_packed_int4(packed, scales).to(x.dtype), bias)


def test_the_cpu_path_is_the_reference_bit_for_bit():
    packed, scales = layer(48, 256, 2)
    x = torch.randn(2, 7, 256, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(48, generator=torch.Generator().manual_seed(2))
    assert torch.equal(int4_matmul.int4_linear(x, packed, scales, bias), reference(x, packed, scales, bias))
    assert not int4_matmul.fused_applies(x.half(), packed, scales)  # the fused kernel is CUDA's


def check_kernel_cases(device: str = "cpu", cases=CASES) -> None:
    """The kernel against the reference on every case (on the CPU under TRITON_INTERPRET=1, below;
    compiled on a GPU in tests/test_cuda_quant.py)."""
    from quamba.numerics import int4_kernel

    block = dict(block_n=int4_matmul.BLOCK_N, block_bytes=int4_matmul.BLOCK_BYTES)
    for rows, out, n_in, groups in cases:
        packed, scales = (t.to(device) for t in layer(out, n_in, groups))
        # one-hot rows pick single columns (even and odd codes): each output is one weight value, exactly
        columns = torch.tensor([0, 1, 2, 127, 128, n_in - 2, n_in - 1], device=device)
        picked = int4_kernel.matmul(F.one_hot(columns, n_in).half(), packed, scales, **block)
        assert torch.equal(picked, dequantize_packed_int4(packed, scales).half()[:, columns].t()), (rows, out, n_in)
        x = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(3)).half().to(device)
        y = int4_kernel.matmul(x, packed, scales, **block)
        want = F.linear(x.float(), dequantize_packed_int4(packed, scales).half().float())  # float32 sums
        assert y.dtype == torch.float16 and y.shape == (rows, out)
        diff = ((y.float() - want).norm() / want.norm()).item()
        assert diff <= 1e-3, (rows, out, n_in, groups, diff)  # fp16 output rounding
        # the one-row GEMV (split along the inputs): the same weight values, the same product
        one_hot = F.one_hot(columns, n_in).half()
        picked = torch.cat([int4_kernel.gemv(one_hot[i:i + 1], packed, scales) for i in range(len(columns))])
        assert torch.equal(picked, dequantize_packed_int4(packed, scales).half()[:, columns].t()), (out, n_in)
        row = int4_kernel.gemv(x[:1], packed, scales)
        assert row.dtype == torch.float16 and row.shape == (1, out)
        assert ((row.float() - want[:1]).norm() / want[:1].norm()).item() <= 1e-3, (out, n_in, groups)
        assert torch.equal(int4_kernel.gemv(x[:1], packed, scales), row)  # partial sums in a fixed order


def test_the_kernel_makes_the_reference_weight_and_its_product():
    """Triton's interpreter must be on before triton is imported at all: a fresh process."""
    pytest.importorskip("triton")
    script = "import sys; sys.path.insert(0, sys.argv[1]); import test_int4_matmul as t; t.check_kernel_cases()"
    run = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], capture_output=True,
                         text=True, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
