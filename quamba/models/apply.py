"""The one step that turns an FP model into the quantized model: `apply_quantization`.

Assembly applies it to the FP16 model it derived the integers from and writes what the applied
model holds; loading a quantized dir applies it to a model whose integer layers were never
materialized (they stay on the meta device until this step replaces them). So the model a dir
describes and the model assembly made are the same by construction, and every activation scale
is derived in one place: threshold / qmax of the tap's bits (Quamba's float32 division, floored).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quamba.errors import CheckpointError
from quamba.formats.quantized_dir import QUANT_CONFIG, QuantPlan, read_plan
from quamba.models.checkpoint import build_model, read_config
from quamba.models.lm import MambaLMHeadModel
from quamba.models.quantized import INTEGER_MODULES, LINEAR_INPUT_TAPS, QuantEmbedding, QuantLinear
from quamba.models.taps import LM_HEAD_POINT, Tap, named_taps
from quamba.numerics.tensor_codecs import IntegerTensor, dequantize_tensor


def _linear_input_tap(name: str) -> str:
    """The full tap name whose scale quantizes a quantized Linear's input."""
    if name == "lm_head":
        return LM_HEAD_POINT
    layer = name.split(".")[2]  # backbone.layers.{i}.mixer.{kind}
    return f"layer_{layer}.{LINEAR_INPUT_TAPS[name.rsplit('.', 1)[1]]}"


# Mamba1's small int8 GEMMs under Quamba's module coverage (A8): weight -> (input tap, output tap,
# epilogue order). Without an input threshold (W4A16) their weights stay dequantized in nn.Linear.
SMALL_GEMMS = {"x_proj.weight": ("x_proj:input", "x_proj:output", "forward"),
               "dt_proj.weight": ("x_proj:output", "dt_proj:output", "seqlen_last")}


def _small_gemm_points(path: str, plan: QuantPlan) -> tuple[str, str, str] | None:
    """(input tap, output tap, epilogue) of x_proj / dt_proj at `path` when its input is quantized."""
    points = SMALL_GEMMS.get(".".join(path.split(".")[-2:]))
    if points is None or f"layer_{path.split('.')[2]}.{points[0]}" not in plan.thresholds:
        return None
    return points


def _swap_small_gemm(model: nn.Module, path: str, coded: IntegerTensor, plan: QuantPlan) -> None:
    in_point, out_point, epilogue = _small_gemm_points(path, plan)
    layer = f"layer_{path.split('.')[2]}"
    mixer_path, _, name = path.removesuffix(".weight").rpartition(".")
    mixer = model.get_submodule(mixer_path)
    bias = getattr(mixer, name).bias  # dt_proj's: the scan's delta bias, not added by the GEMM
    out_tap = f"{layer}.{out_point}"
    setattr(mixer, name, QuantLinear(
        coded.q, coded.scale, coded.bits, None if bias is None else bias.detach().clone(),
        plan.activation_scale(f"{layer}.{in_point}"), None, rounding=plan.rounding[in_point],
        qqq=plan.qqq and coded.bits == 4, epilogue=epilogue,
        out_scale=torch.tensor([plan.activation_scale(out_tap)]) if out_tap in plan.thresholds else None,
        out_rounding=plan.rounding[out_point], add_bias=False))


def _in_proj_output(config, layer: str, plan: QuantPlan) -> tuple[str, torch.Tensor | None, str | None]:
    """How in_proj's int8 GEMM ends, as Quamba's layer: (epilogue order, the int8 output's scale,
    the output tap point). Mamba1 writes x and z with one scale (in_proj:output); Mamba2's
    Parallel layer one per split z, x, B, C, dt (the taps after the split), laid out per row."""
    if config.layer == "Mamba1":
        points, sizes, epilogue = ["in_proj:output"], [], "seqlen_last"
    else:
        group = config.ngroups * config.d_state
        points = ["z_act:input", "x_conv_in:input", "B_conv_in:input", "C_conv_in:input", "dt_act:input"]
        sizes, epilogue = [config.d_inner, config.d_inner, group, group, config.nheads], "parallel"
    taps = [f"{layer}.{point}" for point in points]
    if any(tap not in plan.thresholds for tap in taps):
        return epilogue, None, None
    if epilogue == "seqlen_last":
        return epilogue, torch.tensor([plan.activation_scale(taps[0])]), points[0]
    scales = [torch.full((size,), plan.activation_scale(tap), dtype=torch.float32) for tap, size in zip(taps, sizes)]
    return epilogue, torch.cat(scales), points[0]


EMBEDDING_WEIGHT = "backbone.embedding.weight"


def _quantize_norm_outputs(model: MambaLMHeadModel) -> None:
    """Quamba's QRMSNorm: where the linear after a norm takes int8 (in_proj, and lm_head with
    quantize_lm_head), the norm writes that int8 grid from its float32 output (RMSNorm.int8_output,
    the linear's own scale and rounding)."""
    pairs = [(block.norm, block.mixer.in_proj, "in_proj:input") for block in model.backbone.layers]
    pairs.append((model.backbone.norm_f, model.lm_head, LM_HEAD_POINT))
    for norm, linear, point in pairs:
        if isinstance(linear, QuantLinear) and linear.quantizes_input and linear.rotate_input is None:
            grid = Tap(point)
            grid.scale, grid.rounding = linear.act_scale, linear.rounding
            norm.int8_output = grid


def _set_parameter(model: nn.Module, path: str, value: torch.Tensor) -> None:
    module_path, _, name = path.rpartition(".")
    model.get_submodule(module_path).register_parameter(name, nn.Parameter(value, requires_grad=False))


def apply_quantization(model: MambaLMHeadModel, plan: QuantPlan) -> MambaLMHeadModel:
    """Swap the plan's Linears for QuantLinear and a quantized embedding for QuantEmbedding, give
    the float modules their integer tensors' values, and set every tap's scale from its
    threshold; in place, returns the model."""
    small = {path: coded for path, coded in plan.tensors.items() if _small_gemm_points(path, plan)}
    for path, coded in plan.tensors.items():
        if path == EMBEDDING_WEIGHT:  # held as integers, dequantized per looked-up row
            dtype = model.backbone.embedding.weight.dtype
            model.backbone.embedding = QuantEmbedding(coded.q, coded.scale, coded.bits, dtype)
        elif path not in small:
            _set_parameter(model, path, dequantize_tensor(coded.q, coded.scale))
    for path, coded in small.items():  # after the biases: dt_proj's QuantLinear keeps its integer bias
        _swap_small_gemm(model, path, coded, plan)
    for name, coded in plan.linears.items():
        module_path, _, kind = name.rpartition(".")
        parent = model.get_submodule(module_path) if module_path else model
        linear = getattr(parent, kind)
        linear = getattr(linear, "linear", linear)  # a rotated out_proj wraps its Linear
        tap = _linear_input_tap(name)
        point = tap.rpartition(".")[2]  # "layer_3.in_proj:input" -> "in_proj:input"
        threshold = plan.thresholds.get(tap)
        bias = linear.bias
        epilogue, out_scale, out_point = "forward", None, point
        if kind == "in_proj" and threshold is not None:
            epilogue, out_scale, out_point = _in_proj_output(model.config, tap.partition(".")[0], plan)
        setattr(parent, kind, QuantLinear(
            coded.q, coded.scale, plan.w_bits, None if bias is None else bias.detach().clone(),
            None if threshold is None else plan.activation_scale(tap),
            rotate_input=plan.hadamard if kind == "out_proj" else None,
            rounding=plan.rounding[point], qqq=plan.qqq and (name != "lm_head" or threshold is not None),
            epilogue=epilogue, out_scale=out_scale, out_rounding=plan.rounding[out_point or point],
            gemv_rounding=plan.gemv_rounding if epilogue == "parallel" else None))
    _quantize_norm_outputs(model)
    for tap_name, tap in named_taps(model).items():
        if tap.point in LINEAR_INPUT_TAPS.values() or tap.point == LM_HEAD_POINT:
            continue  # quantized inside QuantLinear, so the tap stays identity
        tap.step_rounding = plan.step_rounding.get(tap.point)
        if tap_name in plan.group_thresholds:
            tap.scale, tap.rounding = plan.group_activation_scales(tap_name), plan.rounding[tap.point]
        elif tap_name in plan.thresholds:
            tap.scale, tap.rounding = plan.activation_scale(tap_name), plan.rounding[tap.point]
    return model


def check_thresholds_cover_the_taps(model: MambaLMHeadModel, plan: QuantPlan, source: str) -> None:
    """An A8 plan must hold a threshold for every tap of the model and every quantized projection's
    input: a missing one would leave that activation in float, a model that is not what its dir
    says. A16 plans hold none. lm_head's input is quantized only by its flag, so it is not asked."""
    if not plan.thresholds and not plan.group_thresholds:
        return
    needed = {name for name, tap in named_taps(model).items()
              if tap.point not in LINEAR_INPUT_TAPS.values() and tap.point != LM_HEAD_POINT}
    needed |= {_linear_input_tap(name) for name in plan.linears if name != "lm_head"}
    missing = sorted(needed - set(plan.thresholds) - set(plan.group_thresholds))
    if missing:
        raise CheckpointError(f"{source}: activation_thresholds lack {len(missing)} of the taps this model quantizes "
                              f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}; an edited or damaged "
                              f"file); rebuild the dir with `quamba quantize` (or rerun snakemake)")


def load_quantized(model_dir: Path, device: torch.device, dtype: torch.dtype) -> MambaLMHeadModel:
    """A quantized dir as a runnable model: its FP tensors loaded, the plan's weights left on the
    meta device, then the plan applied; integer layers' scales stay float32 whatever `dtype`."""
    config, _ = read_config(Path(model_dir))
    _, tensors, plan = read_plan(model_dir)
    model = build_model(config, tensors, source=str(model_dir), replaced=plan.replaced_weights())
    check_thresholds_cover_the_taps(model, plan, str(Path(model_dir) / QUANT_CONFIG))
    model = apply_quantization(model, plan)
    scales = {(layer, name): getattr(layer, name) for layer in model.modules()
              if isinstance(layer, INTEGER_MODULES) for name in layer.float32_buffers}
    model = model.to_dtype(device, dtype).eval()
    for (layer, name), fp32 in scales.items():  # as Quamba keeps them
        setattr(layer, name, fp32.to(layer.qweight.device))
    return model
