"""The `assemble` stage: FP16 weights + GPTQ integer weights + one alpha's activation thresholds ->
a self-describing quantized model dir.

Assembly derives every integer tensor as Quamba's layers build them, puts them in a QuantPlan and
applies it to the FP16 model with quamba.models.apply, the step loading uses too. A quantized dir
holds config.json, quant_config.json (scheme, recipe, bits, group widths, alpha, seed, GPTQ
settings, activation thresholds), model.safetensors (quamba.formats.quantized_dir: integer
tensors and their scales, the rest fp16), stats.json and scales.json (the calibration statistics
and thresholds it was built from, so they are never lost), provenance.json (input hashes,
versions, command) and the tokenizer.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from quamba.errors import ConfigError
from quamba.formats.calibration import STATS_FILE, read_stats, stats_path
from quamba.formats.gptq_dir import load_gptq
from quamba.formats.quantized_dir import (
    QUANT_CONFIG,
    QUANT_CONFIG_VERSION,
    TENSORS_FILE,
    QuantPlan,
    plan_tensors,
    write_tensors,
)
from quamba.formats.scales import SCALES_FILE, read_scales
from quamba.io import atomic_dir, check_output_dir, package_versions, sha256_file, write_json
from quamba.models.apply import apply_quantization
from quamba.models.checkpoint import (
    CONFIG_FILE,
    SAFETENSORS_FILE,
    build_model,
    load_fp_model,
    model_sha256,
    record_model_sha256,
    require_fp16_dir,
)
from quamba.models.lm import as_fp16_dir
from quamba.models.quantized import INTEGER_MODULES, QuantLinear
from quamba.models.taps import LM_HEAD_POINT
from quamba.numerics.gptq import rtn
from quamba.numerics.observers import ABSMAX_FLOOR
from quamba.numerics.quantizers import (
    HALF_AWAY,
    HALF_EVEN,
    ROUNDING_BY_POINT,
    dequantize,
    expand_scales,
    gemv_rounding,
    observed_dtype,
    per_tensor_w8,
    point_rounding,
    step_rounding,
)
from quamba.numerics.tensor_codecs import (
    IntegerTensor,
    embedding_int,
    ssm_param_int8,
    w4_from_values,
    w4_marlin,
    w8_per_part,
    w8_per_tensor,
)
from quamba.recipe import Recipe, known_departures, merge_records
from quamba.schemes import get_scheme, mixer_integer_tensors
from quamba.transforms.reorder import REORDER_TAP, ReorderPlan, plan_sha256, prepare_model


def _check_inputs(fp16_dir: Path, recipe: Recipe, scheme_name: str, gptq_info: dict, gptq_dir: Path,
                  stats: dict | None, stats_file: Path | None, scales: dict | None, scales_path: Path | None,
                  n_layer: int) -> None:
    """Everything that can be wrong with the inputs, before any work: each input must come from
    this model and from the same model transforms, and the scheme must find what it needs."""
    scheme = get_scheme(scheme_name)
    if scheme.w_bits is None:
        raise ConfigError(f"scheme: {scheme_name!r} has nothing to quantize; allowed: w8a8, w4a8, w4a16")
    fp16_sha = model_sha256(fp16_dir)
    if gptq_info["model"]["sha256"] != fp16_sha:
        raise ConfigError(f"gptq: {gptq_dir} was made from another model ({gptq_info['model']['path']}), "
                          f"not {fp16_dir}")
    missing = [f"backbone.layers.{i}.mixer.{kind}" for i in range(n_layer) for kind in ("in_proj", "out_proj")
               if f"backbone.layers.{i}.mixer.{kind}" not in gptq_info["layers"]]
    if missing:
        raise ConfigError(f"gptq: {gptq_dir} lacks {missing[:3]}{'...' if len(missing) > 3 else ''}: a GPTQ dir holds "
                          f"every block's in_proj and out_proj; rerun the gptq job")
    if gptq_info["settings"]["w_bits"] != scheme.w_bits:
        raise ConfigError(f"gptq: {gptq_dir} holds w{gptq_info['settings']['w_bits']} weights; scheme "
                          f"{scheme_name} needs w{scheme.w_bits}")
    recipe.check_built_alike(gptq_info["recipe"], f"the GPTQ dir {gptq_dir}", "assemble")
    if (scheme.needs_stats or recipe.reorder) and stats is None:
        raise ConfigError(f"calib: scheme {scheme_name}" + (" with reorder" if recipe.reorder else "")
                          + " needs the calibration dir (stats.json) of this model")
    if stats is not None:
        if stats["model"]["sha256"] != fp16_sha:
            raise ConfigError(f"calib: {stats_file} was calibrated on another model ({stats['model']['path']}), "
                              f"not {fp16_dir}")
        recipe.check_built_alike(stats["recipe"], str(stats_file), "assemble")
    if recipe.reorder and plan_sha256(stats["reorder"]) != gptq_info["reorder"]["plan_sha256"]:
        raise ConfigError(f"calib: the reorder plan of {stats_file} is not the one {gptq_dir} was built with "
                          f"({gptq_info['reorder']['stats']}); use that calibration")
    if scheme.needs_stats:
        if scales is None:
            raise ConfigError(f"scales: scheme {scheme_name} quantizes activations and needs one alpha's scales.json "
                              f"(`quamba scales CALIB_DIR --alpha A --out FILE`)")
        if scales["calibration"]["stats_sha256"] != sha256_file(stats_file):
            raise ConfigError(f"scales: {scales_path} was not derived from {stats_file}; derive it again")
        missing = sorted(set(stats["taps"]) - set(scales["taps"]))
        if missing:
            raise ConfigError(f"scales: {scales_path} lacks the taps {missing[:5]}{'...' if len(missing) > 5 else ''}"
                              f" that {scheme_name} quantizes; derive it again from {stats_file}")


def _transformed_fp16_tensors(fp16_dir: Path, recipe: Recipe, reorder: dict | None,
                              replaced: frozenset[str] = frozenset()) -> tuple[dict, object]:
    """The FP16 weights of the model in the basis calibration and GPTQ saw, and its config;
    without the `replaced` ones (the GPTQ dir's), which are never rotated (prepare_model's
    `discarded`: at mamba2-2.7b most of the rotation work)."""
    model = prepare_model(load_fp_model(fp16_dir, dtype=torch.float32), recipe, reorder, replaced)
    tensors = as_fp16_dir({k: v for k, v in model.state_dict().items() if k not in replaced}, model.config.layer)
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors, model.config


def gptq_replaced(gptq_layers: dict, method: str) -> frozenset[str]:
    """The FP16 weights a GPTQ dir's values replace in the assembled model, so their own values
    are never needed: every layer it holds (lm_head too), except after round-to-nearest, where
    Mamba2's in_proj takes its per-split scales from the FP16 weight itself."""
    return frozenset() if method == "rtn" else frozenset(f"{name}.weight" for name in gptq_layers)


def _thresholds(absmax, dtype: str = "float32") -> torch.Tensor:
    """Quamba's min/max thresholds from group absmax values, floored as its observer floors each
    batch, in the dtype it observes them in; returned as float32 (exact)."""
    return torch.tensor(absmax, dtype=observed_dtype(dtype)).clamp(min=ABSMAX_FLOOR).float()


def _group_thresholds(plan_record: dict, config, tap_dtypes: dict[str, str]
                      ) -> dict[str, tuple[torch.Tensor, str, int, str]]:
    """Quamba2's grouped thresholds of one reordered layer, per tap: a tensor laid over the tap's
    trailing dims in the reordered layout, what one threshold covers, how many there are, and the
    dtype its scales are divided in. Quamba2's per-SSD-group observer (B, C) keeps the observed
    dtype (`tap_dtypes`: point -> stats.json's dtype of the layer's tap); its x and state
    observers cast to float32 first."""
    cell = ReorderPlan.from_record(plan_record).cell_of_channel()  # (d_inner,)
    x, state = _thresholds(plan_record["group_absmax_after"]), _thresholds(plan_record["state_group_absmax"])
    b_dtype, c_dtype = tap_dtypes["B_conv_out:input"], tap_dtypes["C_conv_out:input"]
    b, c = _thresholds(plan_record["B_group_absmax"], b_dtype), _thresholds(plan_record["C_group_absmax"], c_dtype)
    return {
        REORDER_TAP: (x[cell], "reorder cell", x.numel(), "float32"),
        "B_conv_out:input": (b.repeat_interleave(config.d_state), "SSD group", b.numel(), b_dtype),
        "C_conv_out:input": (c.repeat_interleave(config.d_state), "SSD group", c.numel(), c_dtype),
        "ssm_state_act:input": (state[cell].reshape(config.nheads, config.headdim, config.d_state),
                                "reorder cell and state index", state.numel(), "float32"),
    }


def _float_state(model) -> dict[str, torch.Tensor]:
    """The applied model's FP tensors as model.safetensors holds them: fp16 (Quamba's float32
    parameters in float32), a tied lm_head once."""
    buffers = {f"{name}.{buffer}" for name, module in model.named_modules() if isinstance(module, INTEGER_MODULES)
               for buffer in module.plan_buffers}
    state = {k: v for k, v in model.state_dict().items() if k not in buffers}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    return as_fp16_dir(state, model.config.layer)


def _gemms(model) -> dict[str, dict]:
    """How each integer layer of the applied model computes: int8 GEMM or a dequantized float
    weight, its epilogue order, and whether it writes int8 (the record of quamba.models.apply)."""
    return {name: {"int8_gemm": layer.integer_path(), "epilogue": layer.epilogue if layer.integer_path() else None,
                   "output": "int8" if layer.integer_path() and layer.out_scale is not None else "float"}
            for name, layer in model.named_modules() if isinstance(layer, QuantLinear)}


def _gptq_fp16(entry: dict) -> torch.Tensor:
    """GPTQ's result as fp16 values: the fake-quantized weights Quamba's GPTQ solve hands to its layers."""
    return dequantize(entry["qweight"], expand_scales(entry["scales"], entry["qweight"].shape[1])).to(torch.float16)


def _in_proj_splits(config) -> list[int]:
    """Mamba2's in_proj output splits z, x, B, C, dt."""
    group = config.ngroups * config.d_state
    return [config.d_inner, config.d_inner, group, group, config.nheads]


def _integer_linear(name: str, entry: dict, tensors: dict, scheme, recipe: Recipe, config, method: str
                    ) -> IntegerTensor:
    """The integer weight of one quantized Linear as Quamba's layer builds it from the GPTQ dir.

    W8: GPTQ on the per-tensor grid (w8_gptq: per_tensor) as it is; else GPTQ's group-128 fp16
    values re-rounded to one per-tensor scale, or one per split for Mamba2's in_proj (its
    round-to-nearest taken from the fp16 weight itself). W4 (w4_layout: quamba): Marlin's codes
    recovered from GPTQ's fp16 values; gptq_codes: GPTQ's codes and scales as they are.
    """
    per_split = (recipe.module_coverage == "quamba" and config.layer == "Mamba2" and name.endswith(".in_proj"))
    if scheme.w_bits == 8:
        if per_split:
            source = tensors[f"{name}.weight"] if method == "rtn" else _gptq_fp16(entry)
            if method == "rtn" or entry["scales"].numel() > 1:
                return w8_per_part(source, _in_proj_splits(config), torch.float16)
        if entry["scales"].numel() == 1:
            return IntegerTensor(entry["qweight"], entry["scales"], 8, "w8 per tensor (GPTQ's grid)")
        return w8_per_tensor(_gptq_fp16(entry), torch.float16)
    if recipe.w4_layout == "quamba":
        return w4_from_values(_gptq_fp16(entry), entry["scales"])
    return IntegerTensor(entry["qweight"], entry["scales"], 4, "w4 GPTQ's codes and scales")


def _mixer_tensor(codec: str, value: torch.Tensor, config) -> IntegerTensor:
    if codec == "w8":
        return w8_per_tensor(value, torch.float16)
    if codec == "w8_fp32":
        return w8_per_tensor(value, torch.float32)
    if codec == "ssm":
        return ssm_param_int8(value)
    if codec == "w4":
        return w4_marlin(value)
    group = config.ngroups * config.d_state  # w8_conv_parts
    return w8_per_part(value, [config.d_inner, group, group], torch.float32)


def _lm_head_weight(entry: dict | None, tensors: dict, recipe: Recipe, w_bits: int) -> dict | None:
    """lm_head as the recipe makes it: GPTQ's values (fp16 and integer), or, with quantize_lm_head
    and no GPTQ of it, round-to-nearest of the fp16 weight; None when it stays as it is."""
    if entry is not None:
        fp16 = dequantize(entry["qweight"], expand_scales(entry["scales"], entry["qweight"].shape[1]))
        return {**entry, "fp16": fp16.to(torch.float16)}
    if not recipe.quantize_lm_head:
        return None
    weight = tensors.get("lm_head.weight", tensors["backbone.embedding.weight"]).to(torch.float16)
    if w_bits == 8:
        q, s = per_tensor_w8(weight)
    else:
        result = rtn(weight.float(), 4, "group", 128, recipe.int4_grid, HALF_AWAY if recipe.rounding == "half_away"
                     else HALF_EVEN)
        q, s = result.q, result.scales
    return {"qweight": q, "scales": s, "fp16": weight}


def _group_size(group_widths: dict[str, int | None]) -> int | str | None:
    """quant_config's one-line group size: the width every weight uses (None: per tensor), or
    "per layer" when they differ (Quamba: per channel where in_features <= 128); group_widths
    has each weight's."""
    widths = set(group_widths.values())
    return widths.pop() if len(widths) == 1 else ("per layer" if widths else None)


def quantize_model_dir(fp16_dir: Path, out_dir: Path, gptq_dir: Path, scheme_name: str, recipe: Recipe = Recipe(),
                       calib_dir: Path | None = None, scales_path: Path | None = None,
                       made_by: dict | None = None) -> dict:
    """`quamba quantize`: FP16 dir + GPTQ dir (+ calibration dir + one alpha's scales.json) -> a
    self-describing quantized dir.

    The recipe's model transforms must match how the calibration and the GPTQ dir were built.
    Activation scales are each tap's threshold / 127 at the scales file's alpha (divided in its
    scale dtype as Quamba's observer divides, then float32 floored at 1e-6); with reorder,
    Quamba2's grouped min/max scales: x (the SSM input) one per reorder cell, B and C one per SSD
    group, the final state one per (cell, state index).
    A GPTQ dir holding lm_head quantizes it too. `made_by` goes into provenance.json (the workflow
    records its rule, wildcards and parameters; the CLI its command line).
    """
    fp16_dir, out_dir = Path(fp16_dir), Path(out_dir)
    check_output_dir(out_dir, QUANT_CONFIG)
    config = require_fp16_dir(fp16_dir, "quantize")
    recipe = recipe.for_model(config.layer)
    stats_file = stats_path(calib_dir) if calib_dir is not None else None
    stats = read_stats(stats_file) if stats_file is not None else None
    scales = read_scales(scales_path) if scales_path is not None else None
    gptq_layers, gptq_info = load_gptq(gptq_dir)
    _check_inputs(fp16_dir, recipe, scheme_name, gptq_info, Path(gptq_dir), stats, stats_file, scales, scales_path,
                  config.n_layer)
    scheme = get_scheme(scheme_name)
    if not scheme.needs_stats:
        scales = None  # w4a16 has no activation scales, so no alpha

    if recipe.rotate_residual or recipe.reorder:
        tensors, config = _transformed_fp16_tensors(fp16_dir, recipe, stats["reorder"] if recipe.reorder else None,
                                                    gptq_replaced(gptq_layers, gptq_info["method"]))
    else:
        tensors = as_fp16_dir(load_file(fp16_dir / SAFETENSORS_FILE), config.layer)
    weights = {name: entry for name, entry in gptq_layers.items() if name != "lm_head"}
    head = _lm_head_weight(gptq_layers.get("lm_head"), tensors, recipe, scheme.w_bits)
    if head is not None and not recipe.quantize_lm_head:  # Quamba: an fp16 lm_head holding GPTQ's values
        tensors["lm_head.weight"] = head["fp16"]
        config = config.replace(tie_embeddings=False)
    elif head is not None:
        weights["lm_head"] = head
    group_widths = {}  # input columns one scale covers: None for W8 (per tensor, or per split of Mamba2's in_proj)
    linears: dict[str, IntegerTensor] = {}
    for name, entry in weights.items():
        coded = _integer_linear(name, entry, tensors, scheme, recipe, config, gptq_info["method"])
        linears[name] = coded
        group_widths[name] = None if coded.bits == 8 else coded.q.shape[1] // coded.scale.shape[-1]
    coded_tensors: dict[str, IntegerTensor] = {}
    for i in range(config.n_layer):
        for tensor, codec in mixer_integer_tensors(config.layer, scheme.name, recipe.module_coverage).items():
            path = f"backbone.layers.{i}.mixer.{tensor}"
            if path in tensors:  # a conv without bias has none
                coded_tensors[path] = _mixer_tensor(codec, tensors[path], config)
    if recipe.quantize_embedding:
        if "lm_head.weight" not in tensors and "lm_head" not in weights:  # tied, fp16 lm_head: it keeps the values
            tensors["lm_head.weight"] = tensors["backbone.embedding.weight"].clone()
            config = config.replace(tie_embeddings=False)
        coded_tensors["backbone.embedding.weight"] = embedding_int(tensors["backbone.embedding.weight"], scheme.w_bits)
    if recipe.quantize_lm_head or "lm_head" in gptq_layers:
        config = config.replace(tie_embeddings=False)
    thresholds, scale_dtypes, group_thresholds, group_scale_dtypes, grouped = {}, {}, {}, {}, {}
    if scales is not None:
        thresholds = {tap: float(entry["threshold"]) for tap, entry in scales["taps"].items()
                      if tap != LM_HEAD_POINT or "lm_head" in weights}
        if recipe.reorder:
            for layer, plan_record in stats["reorder"]["layers"].items():
                tap_dtypes = {point: stats["taps"][f"{layer}.{point}"]["dtype"]
                              for point in ("B_conv_out:input", "C_conv_out:input")}
                for point, (values, granularity, groups, dtype) in _group_thresholds(
                        plan_record, config, tap_dtypes).items():
                    group_thresholds[f"{layer}.{point}"], group_scale_dtypes[f"{layer}.{point}"] = values, dtype
                    grouped[f"{layer}.{point}"] = {"granularity": granularity, "groups": groups,
                                                   "shape": list(values.shape), "scale_dtype": dtype}
                    thresholds.pop(f"{layer}.{point}", None)  # grouped, not per tensor
        scale_dtypes = {tap: scales["taps"][tap]["scale_dtype"] for tap in thresholds}
    rounding = {point: point_rounding(point, recipe.rounding, config.layer) for point in sorted(ROUNDING_BY_POINT)}
    steps, gemv = step_rounding(recipe.rounding), gemv_rounding(recipe.rounding)
    plan = QuantPlan(w_bits=scheme.w_bits, rounding=rounding, hadamard=recipe.hadamard,
                     step_rounding=steps, gemv_rounding=gemv,
                     qqq=scheme.w_bits == 4 and scheme.a_bits == 8 and recipe.w4_layout == "quamba",
                     linears=linears, tensors=coded_tensors, thresholds=thresholds, scale_dtypes=scale_dtypes,
                     group_thresholds=group_thresholds, group_scale_dtypes=group_scale_dtypes)
    # the quantized model, made by the step loading uses too: the dir holds this model's tensors
    replaced = plan.replaced_weights()
    kept = {k: v for k, v in tensors.items() if k not in replaced}
    model = apply_quantization(build_model(config, kept, str(fp16_dir), replaced=replaced), plan)
    integer = {path: {"bits": c.bits, "codec": c.codec, "scale_shape": list(c.scale.shape)}
               for path, c in {**linears, **coded_tensors}.items()}
    records = [gptq_info["recipe"], recipe.record("assemble")]
    records += [stats["recipe"]] if stats is not None else []
    records += [scales["recipe"]] if scales is not None else []
    quant_config = {
        "schema_version": QUANT_CONFIG_VERSION, "kind": "quamba-quantized", "scheme": scheme.name,
        "recipe": merge_records(records),
        "w_bits": scheme.w_bits, "a_bits": scheme.a_bits, "weight_granularity": scheme.weight_granularity,
        "group_size": _group_size(group_widths), "alpha": None if scales is None else scales["alpha"],
        "seed": gptq_info["settings"]["seed"],
        "gptq": {"settings": gptq_info["settings"], "data": gptq_info["data"]},
        "rounding": rounding,
        "step_rounding": steps,  # where a decoding step rounds otherwise (the requantized state)
        "gemv_rounding": gemv,  # Mamba2 in_proj's int8 outputs at one row (Quamba's Parallel GEMV)
        "weights": {"grids": gptq_info["grids"], "method": gptq_info["method"],
                    "w8": "re-rounded to one per-tensor scale from GPTQ's fp16 values" if scheme.w_bits == 8 else None,
                    "lm_head": None if head is None else ("integer" if recipe.quantize_lm_head else
                                                          "fp16, holding its quantized values")},
        "hadamard": {"kind": recipe.hadamard, "out_proj_input": True, "residual_stream": recipe.rotate_residual},
        "quantized_linears": sorted(weights),
        "group_widths": dict(sorted(group_widths.items())),
        "integer_tensors": dict(sorted(integer.items())),
        "gemms": _gemms(model),
        "activation_thresholds": thresholds,  # scale = threshold / 127, derived at apply:
        "activation_scale_dtypes": scale_dtypes,  # computed in this dtype, then float32, floored at 1e-6
        # int8 activations reach the conv, the scan and the decoding state: where those compute otherwise
        "known_departures": known_departures(["conv_scan_dequantized", "state_requantization"]
                                             if scheme.a_bits == 8 else []),
    }
    if recipe.reorder:
        quant_config["reorder"] = {"method": stats["reorder"]["method"],
                                   "head_clusters": stats["reorder"]["head_clusters"],
                                   "channel_clusters": stats["reorder"]["channel_clusters"],
                                   "plan_sha256": plan_sha256(stats["reorder"])}
        if grouped:
            quant_config["group_activation_thresholds"] = grouped
    with atomic_dir(out_dir, QUANT_CONFIG) as tmp:
        write_tensors(tmp / TENSORS_FILE, plan_tensors(_float_state(model), plan))
        write_json(tmp / CONFIG_FILE, config.to_state_spaces())  # lm_head untied by rotation or quantization
        for tokenizer_file in fp16_dir.glob("tokenizer*"):
            shutil.copy(tokenizer_file, tmp / tokenizer_file.name)
        write_json(tmp / QUANT_CONFIG, quant_config)
        if stats is not None:  # the calibration statistics it was built from, never lost again
            shutil.copy(stats_file, tmp / STATS_FILE)
        if scales is not None:
            shutil.copy(scales_path, tmp / SCALES_FILE)
        fp16_bytes = (fp16_dir / SAFETENSORS_FILE).stat().st_size
        size = (tmp / SAFETENSORS_FILE).stat().st_size
        write_json(tmp / "provenance.json", {
            "fp16_model": {"path": str(fp16_dir), "sha256": model_sha256(fp16_dir)},
            "recipe": quant_config["recipe"],
            "stats": None if stats is None else {"path": str(stats_file), "sha256": sha256_file(stats_file)},
            "scales": None if scales is None else {"path": str(scales_path), "sha256": sha256_file(Path(scales_path))},
            "gptq": {"path": str(gptq_dir), "sha256": sha256_file(Path(gptq_dir) / "gptq.safetensors")},
            "size_bytes": {"model": size, "fp16_model": fp16_bytes, "ratio": round(size / fp16_bytes, 4)},
            "versions": package_versions(),
            "command": made_by or {"command": "quamba " + " ".join(sys.argv[1:]) if "quamba" in sys.argv[0]
                                   else f"python: {__name__}.quantize_model_dir"},
        })
        record_model_sha256(tmp)  # last: evaluation jobs read the dir's hash from it instead of rehashing
    return quant_config


