"""A GPTQ dir: gptq.safetensors (integer weights, int4 packed two per byte, and their scales) and
gptq.json (settings, data, model hash, per-layer error). Written by the gptq stage, read by assembly."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quamba.errors import ConfigError
from quamba.io import atomic_dir, write_json
from quamba.numerics.gptq import QuantizedLinearWeight
from quamba.numerics.quantizers import pack_int4, unpack_int4

GPTQ_WEIGHTS = "gptq.safetensors"
GPTQ_INFO = "gptq.json"


def save_gptq(out_dir: Path, results: dict[str, QuantizedLinearWeight], info: dict) -> None:
    """gptq.safetensors (integer weights, int4 packed two per byte, and scales) + gptq.json."""
    tensors = {}
    for name, result in results.items():
        q = result.q.to(torch.int8).cpu().contiguous()
        tensors[f"{name}.qweight"] = pack_int4(q) if result.bits == 4 else q
        tensors[f"{name}.scales"] = result.scales.float().cpu().contiguous()
        if result.perm is not None:
            tensors[f"{name}.perm"] = result.perm.cpu().contiguous()
    with atomic_dir(Path(out_dir), GPTQ_INFO) as tmp:
        save_file(tensors, tmp / GPTQ_WEIGHTS, metadata={"format": "quamba-gptq"})
        write_json(tmp / GPTQ_INFO, info)


def load_gptq(gptq_dir: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Integer weights (unpacked to int8 values) and scales by layer, and gptq.json."""
    gptq_dir = Path(gptq_dir)
    for name in (GPTQ_WEIGHTS, GPTQ_INFO):
        if not (gptq_dir / name).is_file():
            raise ConfigError(f"{gptq_dir / name}: missing; not a GPTQ output dir")
    try:
        info = json.loads((gptq_dir / GPTQ_INFO).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{gptq_dir / GPTQ_INFO}: unreadable ({err}); rerun the gptq job that writes it") from None
    try:
        tensors = load_file(gptq_dir / GPTQ_WEIGHTS)
    except Exception as err:  # safetensors raises its own SafetensorError for a truncated file
        raise ConfigError(f"{gptq_dir / GPTQ_WEIGHTS}: unreadable ({err}); rerun the gptq job that writes it") from None
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        layer, _, field = key.rpartition(".")
        layers.setdefault(layer, {})[field] = value
    for entry in layers.values():  # int4 is stored packed as uint8 (lm_head can be 4-bit in a w8 dir)
        if entry["qweight"].dtype == torch.uint8:
            entry["qweight"] = unpack_int4(entry["qweight"])
    return layers, info
