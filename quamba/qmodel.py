"""The quantized model: FP16 weights + GPTQ integer weights + activation scales, its
self-describing directory, and the modules that run it (reference on CPU, int8 GEMMs on CUDA).

A quantized dir holds config.json, quant_config.json (scheme, bits, group size, alpha, seed,
GPTQ settings, activation scales), model.safetensors (int8 / packed int4 weights and their
scales, the rest fp16), stats.json (the calibration statistics it was built from, so they
are never lost), provenance.json (input hashes, versions, command) and the tokenizer.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from quamba.calibration import alpha_key
from quamba.errors import CheckpointError, ConfigError
from quamba.gptq_model import ROUNDING, load_gptq, model_sha256, quantized_linears
from quamba.hadamard import hadamard_transform
from quamba.io import atomic_dir, package_versions, sha256_file, write_json
from quamba.models.checkpoint import CONFIG_FILE, SAFETENSORS_FILE, build_model, load_fp_model, read_config
from quamba.models.lm import MambaLMHeadModel
from quamba.quantizers import dequantize, expand_scales, pack_int4, quantize, unpack_int4
from quamba.reorder import REORDER_TAP, ReorderPlan, check_reorderable, plan_sha256, prepare_model
from quamba.schemes import get_scheme
from quamba.stats import read_stats
from quamba.taps import LM_HEAD_POINT, named_taps

QUANT_CONFIG = "quant_config.json"
X_GROUP_SCALES = "x_group_scales"  # model.safetensors key (per mixer) of x's per-channel reorder-cell scales
LINEAR_INPUT_TAPS = {"in_proj": "in_proj:input", "out_proj": "out_proj:input"}


class QuantLinear(nn.Module):
    """y = dequant(q) applied to x, with x Hadamard-rotated first (out_proj) and quantized to
    int8 with a static scale (schemes with 8-bit activations). On CUDA, per-tensor int8 weights
    with int8 activations run as an int8 GEMM (torch._int_mm) where its shape rules allow."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bits: int, bias: torch.Tensor | None,
                 act_scale: float | None, rotate_input: bool):
        super().__init__()
        self.bits, self.act_scale, self.rotate_input = bits, act_scale, rotate_input
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.to(torch.int8))  # (out, in) integer values
        self.register_buffer("scales", scales.float())  # (out, groups) or (1, 1)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("weight", dequantize(self.qweight, expand_scales(self.scales, self.in_features)),
                             persistent=False)  # the reference path's float weight

    def _int8_gemm_ok(self, x2d: torch.Tensor) -> bool:
        return (x2d.is_cuda and self.bits == 8 and self.act_scale is not None and self.scales.numel() == 1
                and x2d.shape[0] > 16 and self.in_features % 8 == 0 and self.out_features % 8 == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotate_input:
            x = hadamard_transform(x)
        if self.act_scale is None:
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        x_q = quantize(x, self.act_scale, 8)  # (..., in) int8
        x2d = x_q.reshape(-1, self.in_features)
        if self._int8_gemm_ok(x2d):
            acc = torch._int_mm(x2d, self.qweight.t())  # (m, out) int32, exact
            y = (acc.float() * (self.act_scale * self.scales.float().item())).to(x.dtype).view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        x_dq = dequantize(x_q, self.act_scale).to(x.dtype)
        return F.linear(x_dq, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


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


def is_quantized_dir(model_dir: Path) -> bool:
    return (Path(model_dir) / QUANT_CONFIG).is_file()


def load_quantized(model_dir: Path, device: torch.device, dtype: torch.dtype) -> MambaLMHeadModel:
    """A runnable quantized model: QuantLinear for in_proj/out_proj, int8 fake-quant at the taps."""
    model_dir = Path(model_dir)
    config, _ = read_config(model_dir)
    try:
        quant_config = json.loads((model_dir / QUANT_CONFIG).read_text())
        tensors = load_file(model_dir / SAFETENSORS_FILE)
    except Exception as err:
        raise CheckpointError(f"{model_dir}: unreadable quantized model ({err})") from err
    group_scales = {k: tensors.pop(k) for k in [k for k in tensors if k.endswith(f".{X_GROUP_SCALES}")]}
    integer = {k.rpartition(".")[0]: {} for k in tensors if k.endswith(".qweight")}
    for name in integer:
        for field in ("qweight", "scales"):
            integer[name][field] = tensors.pop(f"{name}.{field}")
        tensors[f"{name}.weight"] = torch.zeros(1)  # placeholder, replaced below
    with torch.device("meta"):
        shapes = MambaLMHeadModel(config).state_dict()
    for name in integer:
        tensors[f"{name}.weight"] = torch.empty(shapes[f"{name}.weight"].shape, dtype=torch.float16)
    model = build_model(config, tensors, source=str(model_dir))
    act_scales = quant_config["activation_scales"]
    linears = quantized_linears(model)
    for i, block in enumerate(model.backbone.layers):
        for kind in ("in_proj", "out_proj"):
            name = f"backbone.layers.{i}.mixer.{kind}"
            if name not in integer:
                continue
            qweight = integer[name]["qweight"]
            if quant_config["w_bits"] == 4:
                qweight = unpack_int4(qweight)
            bias = linears[name].bias
            setattr(block.mixer, kind, QuantLinear(
                qweight, integer[name]["scales"], quant_config["w_bits"],
                None if bias is None else bias.detach().clone(),
                act_scales.get(f"layer_{i}.{LINEAR_INPUT_TAPS[kind]}"), rotate_input=kind == "out_proj"))
    if "lm_head" in integer:  # its input quantized inside QuantLinear, so its tap stays identity
        qweight = integer["lm_head"]["qweight"]
        model.lm_head = QuantLinear(unpack_int4(qweight) if quant_config["w_bits"] == 4 else qweight,
                                    integer["lm_head"]["scales"], quant_config["w_bits"], None,
                                    act_scales.get(LM_HEAD_POINT), rotate_input=False)
    for tap_name, tap in named_taps(model).items():
        if tap.point not in LINEAR_INPUT_TAPS.values() and tap.point != LM_HEAD_POINT:
            tap.scale = act_scales.get(tap_name)
    for i, block in enumerate(model.backbone.layers):
        scales = group_scales.get(f"backbone.layers.{i}.mixer.{X_GROUP_SCALES}")
        if scales is not None:  # Quamba2: x quantized per reorder cell
            block.mixer.taps.by_key[REORDER_TAP.replace(":", "__")].scale = scales.float()
    return model.to(device=device, dtype=dtype).eval()
