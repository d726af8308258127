"""CUDA fast paths from mamba_ssm and causal_conv1d, with the signatures of `ops`.

These packages only build with nvcc (the `cuda` extra) and mamba_ssm does not even import on
a machine without CUDA, so everything here is optional. `backend_for` picks, per call, the
kernels for CUDA tensors when they import, and the pure-PyTorch reference otherwise. The
RMSNorms always use the reference: mamba_ssm's Triton RMSNorm is not deterministic.

The packages are imported on the first CUDA call, not with this module: importing mamba_ssm
(Triton and its kernels' definitions) costs seconds that a job which never runs a CUDA model
(normalize, scales, a CPU study) should not pay.

Before they import, TRITON_CACHE_AUTOTUNING is set to 1 unless the environment says otherwise:
mamba_ssm's Mamba2 kernels are autotuned, and without it every job process benchmarks every
candidate config again (seconds per job) and may pick another one than the previous job did
(another accumulation order: different low bits between the jobs of one study). With it the
first process's pick is kept in Triton's cache dir and every later process on the machine reads it.
"""

from __future__ import annotations

import math
import os
from types import ModuleType, SimpleNamespace

import torch

from quamba.models import ops

_AVAILABLE: bool | None = None  # tried once per process (a plain flag: torch.compile reads it as a constant)
_OPAQUE = False  # the kernels wrapped for torch.compile (prepare_for_compile)


def available() -> bool:
    """Whether mamba_ssm and causal_conv1d import here (tried once per process)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = _import_kernels()
    return _AVAILABLE


def _import_kernels() -> bool:
    global _conv_fn, _conv_update, _selective_scan, _state_update, _chunk_scan
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # read when the autotuned kernels are defined
    try:  # pragma: no cover - exercised only where the CUDA extras are installed
        from causal_conv1d import causal_conv1d_fn as _conv_fn
        from causal_conv1d import causal_conv1d_update as _conv_update
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _selective_scan
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update as _state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _chunk_scan
    except ImportError:  # no CUDA build here: the reference path runs
        return False
    return True


def prepare_for_compile() -> None:
    """Make the kernels opaque to torch.compile: a compiled block calls each as it is, between
    two compiled graphs, instead of tracing into mamba_ssm's Python and its Triton launches.
    Done when compiling, not at import (torch.compiler imports dynamo)."""
    global _conv_fn, _conv_update, _selective_scan, _state_update, _chunk_scan, _OPAQUE
    if _OPAQUE or not available():
        return
    disable = torch.compiler.disable
    _conv_fn, _conv_update = disable(_conv_fn), disable(_conv_update)
    _selective_scan, _state_update, _chunk_scan = disable(_selective_scan), disable(_state_update), disable(_chunk_scan)
    _OPAQUE = True


def causal_conv1d(x, weight, bias, activation="silu"):
    return _conv_fn(x.contiguous(), weight, bias, activation=activation)


def causal_conv1d_update(x, conv_state, weight, bias, activation="silu"):
    return _conv_update(x, conv_state, weight, bias, activation=activation)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    return _selective_scan(u.contiguous(), delta.contiguous(), A, B.contiguous(), C.contiguous(), D,
                           None if z is None else z.contiguous(), delta_bias, delta_softplus,
                           return_last_state)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    return _state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


def ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                   dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False):
    return _chunk_scan(x.contiguous(), dt.contiguous(), A, B.contiguous(), C.contiguous(), chunk_size,
                       D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                       dt_softplus=dt_softplus, dt_limit=dt_limit,
                       return_final_states=return_final_states)


def ssd_state_update(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False,
                     dt_limit=(0.0, math.inf)):
    # The Triton kernel takes per-(head, headdim) parameters; Mamba2 ties them across headdim.
    headdim, dstate = x.shape[-1], B.shape[-1]
    if dt_limit != (0.0, math.inf):  # the kernel has no clamp: fall back to the reference
        return ops.ssd_state_update(state, x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit)
    return _state_update(
        state, x, dt[:, :, None].expand(-1, -1, headdim),
        A[:, None, None].expand(-1, headdim, dstate).float(), B, C,
        D=None if D is None else D[:, None].expand(-1, headdim),
        dt_bias=None if dt_bias is None else dt_bias[:, None].expand(-1, headdim),
        dt_softplus=dt_softplus,
    )


_FAST = SimpleNamespace(
    causal_conv1d=causal_conv1d, causal_conv1d_update=causal_conv1d_update,
    selective_scan=selective_scan, selective_state_update=selective_state_update,
    ssd_chunk_scan=ssd_chunk_scan, ssd_state_update=ssd_state_update,
)


def backend_for(x: torch.Tensor, allow_kernels: bool = True) -> ModuleType | SimpleNamespace:
    """The kernels for a CUDA tensor when they are installed, else the reference `ops`."""
    if allow_kernels and x.is_cuda and available():
        return _FAST
    return ops
