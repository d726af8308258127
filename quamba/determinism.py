"""Deterministic execution: the settings under which the same inputs and seed give the same bits.

On CPU our paths are deterministic as they are. On CUDA, cuBLAS needs a fixed workspace and
PyTorch must refuse nondeterministic kernels; the RMSNorms already avoid mamba_ssm's Triton
RMSNorm, the cause of run-to-run drift the Quamba fork traced.
"""

from __future__ import annotations

import os

import torch


def enable_determinism() -> None:
    """Call before any CUDA work; safe (and a no-op in effect) on CPU."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
