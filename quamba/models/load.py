"""`quamba.load`: one entry point for every model directory the project reads or writes."""

from __future__ import annotations

from pathlib import Path

import torch

from quamba.errors import ConfigError
from quamba.formats.quantized_dir import QUANT_CONFIG
from quamba.models.checkpoint import load_fp_model, resolve_model_dir
from quamba.models.lm import MambaLMHeadModel

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not supported; allowed: {sorted(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device asked for, or CUDA when present and CPU otherwise when none was named. A CUDA
    device asked for on a machine without one fails: nothing ever falls back silently."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device: {device!r} is not a device; allowed: cpu, cuda, cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {str(device)!r} was asked for, but torch sees no CUDA device on this machine; "
                          f"use device cpu (config `device: cpu`, CLI `--device cpu`) or run on a GPU machine")
    return device


def load(path_or_hub_id: str | Path, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None) -> MambaLMHeadModel:
    """A runnable model from a local dir or hub id (FP or quantized); `model(input_ids).logits`
    is (b, l, padded vocab).

    device defaults to CUDA when present, else CPU; dtype to float16 on CUDA and float32 on CPU
    (CPU half-precision matmuls are slow and less accurate).
    """
    device = resolve_device(device)
    dtype = parse_dtype(dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    model_dir = resolve_model_dir(path_or_hub_id)
    if (model_dir / QUANT_CONFIG).is_file():
        from quamba.models.apply import load_quantized  # imports the quantized modules

        return load_quantized(model_dir, device=device, dtype=dtype)
    return load_fp_model(model_dir, device=device, dtype=dtype)
