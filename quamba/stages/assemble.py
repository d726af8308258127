"""The quantized model: FP16 weights + GPTQ integer weights + activation scales, its
self-describing directory, and the modules that run it (reference on CPU, int8 GEMMs on CUDA).

A quantized dir holds config.json, quant_config.json (scheme, bits, group size, alpha, seed,
GPTQ settings, activation scales), model.safetensors (int8 / packed int4 weights and their
scales, the rest fp16), stats.json (the calibration statistics it was built from, so they
are never lost), provenance.json (input hashes, versions, command) and the tokenizer.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quamba.errors import ConfigError
from quamba.formats.gptq_dir import load_gptq
from quamba.formats.layout import alpha_key
from quamba.formats.stats import read_stats
from quamba.io import atomic_dir, package_versions, sha256_file, write_json
from quamba.models.checkpoint import CONFIG_FILE, SAFETENSORS_FILE, load_fp_model, model_sha256, read_config
from quamba.models.quantized import QUANT_CONFIG, X_GROUP_SCALES
from quamba.models.taps import LM_HEAD_POINT
from quamba.numerics.quantizers import pack_int4
from quamba.schemes import get_scheme
from quamba.stages.gptq import ROUNDING
from quamba.transforms.reorder import REORDER_TAP, ReorderPlan, check_reorderable, plan_sha256, prepare_model


def _check_transforms(config, stats: dict | None, gptq_info: dict, reorder: bool, rotate_residual: bool) -> None:
    """Scales, GPTQ weights and the stored model must all come from the same transformed model."""
    asked = {"rotate_residual": rotate_residual, "reorder": reorder}
    for key, value in asked.items():
        built = bool(gptq_info["settings"].get(key, False))
        if built != value:
            raise ConfigError(f"{key}: the GPTQ dir was built with {key}={built}, but quantize asks for {value}; "
                              f"run calibration, GPTQ and quantize with the same {key}")
        if stats is not None and bool(stats.get(key, False)) != value:
            raise ConfigError(f"{key}: stats.json was calibrated with {key}={bool(stats.get(key, False))}, but "
                              f"quantize asks for {value}; run calibration, GPTQ and quantize with the same {key}")
    if reorder:
        check_reorderable(config, 1, 1)
        if stats is None:
            raise ConfigError("stats: reorder needs the stats.json holding the reorder plan (calibrated with reorder on)")
        if plan_sha256(stats["reorder"]) != gptq_info["reorder"]["plan_sha256"]:
            raise ConfigError(f"stats: its reorder plan is not the one the GPTQ dir was built with "
                              f"({gptq_info['reorder']['stats']}); use that stats.json")


def _check_inputs(fp16_dir: Path, stats: dict | None, gptq_info: dict, scheme_name: str, alpha: float) -> None:
    """Everything that can be wrong with the inputs, before any work."""
    scheme = get_scheme(scheme_name)
    if scheme.w_bits is None:
        raise ConfigError(f"scheme: {scheme_name!r} has nothing to quantize; allowed: w8a8, w4a8, w4a16")
    if not 0.0 < alpha <= 1.0:
        raise ConfigError(f"alpha: {alpha} is outside (0, 1]; 1.0 means no clipping")
    fp16_sha = model_sha256(fp16_dir)
    if gptq_info["model"]["sha256"] != fp16_sha:
        raise ConfigError(f"gptq: the GPTQ dir was made from another model ({gptq_info['model']['path']}), "
                          f"not {fp16_dir}")
    if gptq_info["settings"]["w_bits"] != scheme.w_bits:
        raise ConfigError(f"gptq: the GPTQ dir holds w{gptq_info['settings']['w_bits']} weights; scheme "
                          f"{scheme_name} needs w{scheme.w_bits}")
    if scheme.needs_stats:
        if stats is None:
            raise ConfigError(f"stats: scheme {scheme_name} quantizes activations and needs a stats.json")
        if stats["model"]["sha256"] != fp16_sha:
            raise ConfigError(f"stats: stats.json was calibrated on another model ({stats['model']['path']}), "
                              f"not {fp16_dir}")
        if alpha_key(alpha) not in next(iter(stats["taps"].values()))["alphas"]:
            raise ConfigError(f"alpha: {alpha} is not in stats.json's alphas {stats['alphas']}; "
                              f"calibrate with it first")


def _transformed_fp16_tensors(fp16_dir: Path, rotate_residual: bool, reorder: dict | None) -> tuple[dict, object]:
    """The FP16 weights of the model in the basis calibration and GPTQ saw, and its config."""
    model = prepare_model(load_fp_model(fp16_dir, dtype=torch.float32), rotate_residual, reorder)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight")
    return tensors, model.config


def _x_group_scales(plan_record: dict) -> torch.Tensor:
    """Quamba2's grouped min/max scales of x, one per channel (d_inner,) of the reordered layout."""
    cell_scales = torch.tensor([max(v, 1e-5 * 127) / 127 for v in plan_record["group_absmax_after"]],
                               dtype=torch.float32)  # (cells,)
    return cell_scales[ReorderPlan.from_record(plan_record).cell_of_channel()]  # (d_inner,)


def quantize_model_dir(fp16_dir: Path, out_dir: Path, gptq_dir: Path, scheme_name: str,
                       alpha: float, stats_path: Path | None = None, reorder: bool = False,
                       rotate_residual: bool = False) -> dict:
    """`quamba quantize`: FP16 dir + GPTQ dir (+ stats.json) -> a self-describing quantized dir.

    reorder (Mamba2) and rotate_residual must match how stats.json and the GPTQ dir were made;
    both default to off, which gives byte-identical output to the versions before them. With
    reorder and 8-bit activations, x (the SSM input) gets one scale per reorder cell (Quamba2's
    grouped min/max) instead of one per tensor. A GPTQ dir holding lm_head quantizes it too.
    """
    fp16_dir, out_dir = Path(fp16_dir), Path(out_dir)
    config, _ = read_config(fp16_dir)
    stats = read_stats(stats_path) if stats_path is not None else None
    gptq_layers, gptq_info = load_gptq(gptq_dir)
    _check_inputs(fp16_dir, stats, gptq_info, scheme_name, alpha)
    _check_transforms(config, stats, gptq_info, reorder, rotate_residual)
    scheme = get_scheme(scheme_name)

    if reorder or rotate_residual:
        tensors, config = _transformed_fp16_tensors(fp16_dir, rotate_residual, stats["reorder"] if reorder else None)
    else:
        tensors = {k: v.to(torch.float16) for k, v in load_file(fp16_dir / SAFETENSORS_FILE).items()}
    for name, entry in gptq_layers.items():
        tensors.pop(f"{name}.weight", None)  # a tied lm_head has no weight of its own
        q = entry["qweight"]
        tensors[f"{name}.qweight"] = pack_int4(q) if scheme.w_bits == 4 else q.to(torch.int8)
        tensors[f"{name}.scales"] = entry["scales"].float()
    act_scales, group_scales = {}, {}
    if scheme.needs_stats:
        key = alpha_key(alpha)
        act_scales = {tap: entry["alphas"][key]["scale"] for tap, entry in stats["taps"].items()
                      if not tap.startswith("lm_head") or (tap == LM_HEAD_POINT and "lm_head" in gptq_layers)}
        if reorder:
            for layer, plan_record in stats["reorder"]["layers"].items():
                tensors[f"backbone.layers.{int(layer.removeprefix('layer_'))}.mixer.{X_GROUP_SCALES}"] = _x_group_scales(plan_record)
                group_scales[f"{layer}.{REORDER_TAP}"] = [max(v, 1e-5 * 127) / 127
                                                          for v in plan_record["group_absmax_after"]]
    quant_config = {
        "schema_version": 1, "kind": "quamba-quantized", "scheme": scheme.name,
        "w_bits": scheme.w_bits, "a_bits": scheme.a_bits, "weight_granularity": scheme.weight_granularity,
        "group_size": scheme.group_size, "alpha": alpha, "seed": gptq_info["settings"]["seed"],
        "gptq": {"settings": gptq_info["settings"], "data": gptq_info["data"]},
        "rounding": ROUNDING, "hadamard": "out_proj input rotated; inverse fused into out_proj's weight",
        "quantized_linears": sorted(gptq_layers),
        "activation_scales": act_scales,
    }
    if rotate_residual:
        quant_config["rotate_residual"] = True
        quant_config["hadamard"] += ("; residual stream rotated: embedding and lm_head (untied, norm_f fused) "
                                     "rotated, block norms fused into in_proj, out_proj writes the rotated basis")
    if reorder:
        quant_config["reorder"] = {"head_clusters": stats["reorder"]["head_clusters"],
                                   "channel_clusters": stats["reorder"]["channel_clusters"],
                                   "plan_sha256": plan_sha256(stats["reorder"])}
        if group_scales:
            quant_config["group_activation_scales"] = group_scales
    with atomic_dir(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / SAFETENSORS_FILE,
                  metadata={"format": "quamba-quantized"})
        if rotate_residual:  # lm_head is untied now
            write_json(tmp / CONFIG_FILE, config.to_state_spaces())
        else:
            shutil.copy(fp16_dir / CONFIG_FILE, tmp / CONFIG_FILE)
        for tokenizer_file in fp16_dir.glob("tokenizer*"):
            shutil.copy(tokenizer_file, tmp / tokenizer_file.name)
        write_json(tmp / QUANT_CONFIG, quant_config)
        if stats is not None:
            write_json(tmp / "stats.json", stats)
        fp16_bytes = (fp16_dir / SAFETENSORS_FILE).stat().st_size
        size = (tmp / SAFETENSORS_FILE).stat().st_size
        write_json(tmp / "provenance.json", {
            "fp16_model": {"path": str(fp16_dir), "sha256": model_sha256(fp16_dir)},
            "stats": None if stats_path is None else {"path": str(stats_path), "sha256": sha256_file(Path(stats_path))},
            "gptq": {"path": str(gptq_dir), "sha256": sha256_file(Path(gptq_dir) / "gptq.safetensors")},
            "size_bytes": {"model": size, "fp16_model": fp16_bytes, "ratio": round(size / fp16_bytes, 4)},
            "versions": package_versions(),
            "command": "quamba quantize " + " ".join(sys.argv[1:]) if "quamba" in sys.argv[0] else None,
        })
    return quant_config


