"""A GPTQ dir: gptq.safetensors (integer weights, int4 packed two per byte, and their scales) and
gptq.json (settings, data, model hash, per-layer error). Written by the gptq stage, read by assembly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load, save_file

from quamba.errors import ConfigError
from quamba.io import atomic_dir, sha256_file, write_json
from quamba.numerics.gptq import QuantizedLinearWeight
from quamba.numerics.quantizers import pack_int4, unpack_int4

GPTQ_WEIGHTS = "gptq.safetensors"
GPTQ_INFO = "gptq.json"
# what readers of gptq.json use
INFO_KEYS = ("model", "settings", "recipe", "method", "data", "grids", "layers", "weights_sha256")


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
        write_json(tmp / GPTQ_INFO, {**info, "weights_sha256": sha256_file(tmp / GPTQ_WEIGHTS)})


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
    if not isinstance(info, dict) or not all(key in info for key in INFO_KEYS):
        raise ConfigError(f"{gptq_dir / GPTQ_INFO}: not a GPTQ record (it needs {list(INFO_KEYS)}); rerun the gptq job "
                          f"that writes it")
    payload = (gptq_dir / GPTQ_WEIGHTS).read_bytes()
    if hashlib.sha256(payload).hexdigest() != info["weights_sha256"]:
        raise ConfigError(f"{gptq_dir / GPTQ_WEIGHTS}: not the file its {GPTQ_INFO} was written with (edited, or of "
                          f"another GPTQ run); rerun the gptq job that writes it")
    try:
        tensors = load(payload)
    except Exception as err:  # safetensors raises its own SafetensorError for a truncated file
        raise ConfigError(f"{gptq_dir / GPTQ_WEIGHTS}: unreadable ({err}); rerun the gptq job that writes it") from None
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        layer, _, field = key.rpartition(".")
        layers.setdefault(layer, {})[field] = value
    if sorted(layers) != sorted(info["layers"]):
        raise ConfigError(f"{gptq_dir}: {GPTQ_WEIGHTS} holds layers {sorted(set(layers) ^ set(info['layers']))[:4]} "
                          f"that {GPTQ_INFO} does not list, or lacks ones it lists; rerun the gptq job")
    for name, entry in layers.items():  # int4 is stored packed as uint8 (lm_head can be 4-bit in a w8 dir)
        if "qweight" not in entry or "scales" not in entry:
            raise ConfigError(f"{gptq_dir / GPTQ_WEIGHTS}: layer {name} lacks its qweight or scales; "
                              f"rerun the gptq job")
        if not bool(torch.isfinite(entry["scales"]).all()) or not bool((entry["scales"] > 0).all()):
            raise ConfigError(f"{gptq_dir / GPTQ_WEIGHTS}: layer {name}'s scales are not all finite and > 0; "
                              f"rerun the gptq job")
        packed = entry["qweight"].dtype == torch.uint8
        if name != "lm_head" and packed != (info["settings"].get("w_bits") == 4):  # lm_head: 4 bits in any dir
            raise ConfigError(f"{gptq_dir}: layer {name} holds {'4' if packed else '8'}-bit codes, but "
                              f"{GPTQ_INFO} says w_bits {info['settings'].get('w_bits')!r}; rerun the gptq job")
        if packed:
            entry["qweight"] = unpack_int4(entry["qweight"])
    return layers, info
