"""The quantized model dir's tensors and record: model.safetensors and quant_config.json.

In memory a quantized model is an FP model plus a `QuantPlan` (its integer tensors and
activation thresholds; quamba.models.apply makes the model from both). On disk,
model.safetensors holds the FP tensors as they are and the plan's integers under fixed keys:

- `{linear}.qweight` (int8, or two int4 codes per uint8) and `{linear}.scales` (float32) of
  each Linear that becomes a QuantLinear (in_proj, out_proj, lm_head);
- `{tensor}.q` and `{tensor}.scale` of each other integer tensor: those of float modules (conv,
  x_proj, dt_proj, A_log, D, dt_bias) and the embedding (a QuantEmbedding once applied);
- `{mixer}.group_thresholds.{tap key}`: Quamba2's grouped thresholds of one tap.

quant_config.json records the rest (scheme, bits, rounding per tap point, the Hadamard kind,
the per-tensor activation thresholds, what each integer tensor is); scales are never stored:
they are derived from the thresholds where the plan is applied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quamba.errors import CheckpointError
from quamba.io import check_finite_document
from quamba.numerics.quantizers import (
    activation_scale,
    activation_scales,
    gemv_rounding,
    pack_int4,
    step_rounding,
    unpack_int4,
)
from quamba.numerics.tensor_codecs import IntegerTensor

QUANT_CONFIG = "quant_config.json"
TENSORS_FILE = "model.safetensors"  # the name an FP16 dir uses too (models.checkpoint.SAFETENSORS_FILE)
# 6: each grouped tap's scale dtype (group_activation_thresholds[tap].scale_dtype);
# 5: each threshold's scale dtype (activation_scale_dtypes: where Quamba divides threshold / 127);
# 4: activation thresholds instead of scales (the scale is derived where the plan is applied);
# 3: integer tensors beyond the projections ({path}.q, {path}.scale), grouped tap scales
QUANT_CONFIG_VERSION = 6
GROUP_THRESHOLDS = "group_thresholds"


@dataclass(frozen=True, eq=False)
class QuantPlan:
    """Everything a quantized model is made of beyond its FP weights.

    linears: module path -> integer weight of the Linears that become QuantLinear; tensors:
    parameter path -> integer values of the other tensors (float modules compute with their
    dequantized values; the embedding becomes a QuantEmbedding); thresholds: tap name ->
    per-tensor threshold; scale_dtypes: tap name -> the dtype its threshold / 127 is computed in;
    group_thresholds: tap name -> thresholds laid over the tap's trailing dims (Quamba2's grouped
    scales); group_scale_dtypes: tap name -> the dtype those are divided in.
    """

    w_bits: int
    rounding: dict[str, str]  # tap point -> rounding of its int8 values (the prefill's)
    hadamard: str  # the Hadamard kind of out_proj's input rotation
    qqq: bool = False  # W4A8 as QQQ: int4 codes turned into int8 weights with a scale per row
    step_rounding: dict[str, str] = field(default_factory=dict)  # tap point -> in a decoding step, where it differs
    gemv_rounding: str | None = None  # Mamba2 in_proj's int8 outputs at one row (None: as at many rows)
    linears: dict[str, IntegerTensor] = field(default_factory=dict)
    tensors: dict[str, IntegerTensor] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    scale_dtypes: dict[str, str] = field(default_factory=dict)
    group_thresholds: dict[str, torch.Tensor] = field(default_factory=dict)
    group_scale_dtypes: dict[str, str] = field(default_factory=dict)

    def activation_scale(self, tap: str) -> float:
        """A per-tensor tap's scale from its threshold, divided in its scale dtype as Quamba's observer."""
        return activation_scale(self.thresholds[tap], scale_dtype=self.scale_dtypes[tap])

    def group_activation_scales(self, tap: str) -> torch.Tensor:
        """A grouped tap's scales (float32, laid as its thresholds), divided in its scale dtype."""
        return activation_scales(self.group_thresholds[tap], scale_dtype=self.group_scale_dtypes[tap])

    def replaced_weights(self) -> frozenset[str]:
        """State-dict keys of FP tensors the plan replaces (a loader never materializes them)."""
        return frozenset(f"{name}.weight" for name in self.linears) | frozenset(self.tensors)


def group_thresholds_key(tap_name: str) -> str:
    """The model.safetensors key of one tap's grouped thresholds (`layer_3.x_conv_out:input` ->
    `backbone.layers.3.mixer.group_thresholds.x_conv_out__input`)."""
    layer, _, point = tap_name.partition(".")
    return f"backbone.layers.{layer.removeprefix('layer_')}.mixer.{GROUP_THRESHOLDS}.{point.replace(':', '__')}"


def _tap_name(key: str) -> str:
    layer = key.split(".")[2]
    return f"layer_{layer}.{key.rsplit('.', 1)[1].replace('__', ':')}"


def _packed(coded: IntegerTensor) -> torch.Tensor:
    return pack_int4(coded.q) if coded.bits == 4 else coded.q.to(torch.int8)


def plan_tensors(float_state: dict[str, torch.Tensor], plan: QuantPlan) -> dict[str, torch.Tensor]:
    """model.safetensors' content: the FP tensors the plan does not replace, and its integers."""
    replaced = plan.replaced_weights()
    tensors = {k: v for k, v in float_state.items() if k not in replaced}
    for name, coded in plan.linears.items():
        tensors[f"{name}.qweight"], tensors[f"{name}.scales"] = _packed(coded), coded.scale.float()
    for path, coded in plan.tensors.items():
        tensors[f"{path}.q"], tensors[f"{path}.scale"] = _packed(coded), coded.scale.float()
    for tap_name, thresholds in plan.group_thresholds.items():
        tensors[group_thresholds_key(tap_name)] = thresholds.float()
    return tensors


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "quamba-quantized"})


def read_quant_config(model_dir: Path) -> dict:
    path = Path(model_dir) / QUANT_CONFIG
    try:
        quant_config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable quant_config ({err})") from err
    check_finite_document(quant_config, str(path), CheckpointError)
    thresholds = quant_config.get("activation_thresholds", {})
    bad = sorted(tap for tap, value in thresholds.items() if not isinstance(value, (int, float)) or value < 0)
    if bad:
        raise CheckpointError(f"{path}: activation_thresholds of {bad} are not numbers >= 0 (an edited or "
                              f"damaged file); rebuild the dir with `quamba quantize` (or rerun snakemake)")
    if quant_config.get("schema_version") != QUANT_CONFIG_VERSION:
        raise CheckpointError(f"{path}: schema_version {quant_config.get('schema_version')!r}, but this "
                              f"quamba-flow reads version {QUANT_CONFIG_VERSION}; rebuild the dir with "
                              f"`quamba quantize` (or rerun snakemake)")
    return quant_config


def _integer(q: torch.Tensor, scale: torch.Tensor, entry: dict) -> IntegerTensor:
    return IntegerTensor(unpack_int4(q) if q.dtype == torch.uint8 else q, scale, entry["bits"], entry["codec"])


def read_plan(model_dir: Path) -> tuple[dict, dict[str, torch.Tensor], QuantPlan]:
    """(quant_config, the FP tensors, the plan) of a quantized dir."""
    model_dir = Path(model_dir)
    quant_config = read_quant_config(model_dir)
    try:
        tensors = load_file(model_dir / TENSORS_FILE)
    except Exception as err:
        raise CheckpointError(f"{model_dir / TENSORS_FILE}: unreadable quantized model ({err})") from err
    integer = quant_config["integer_tensors"]

    def take(key: str) -> torch.Tensor:
        if key not in tensors:
            raise CheckpointError(f"{model_dir / TENSORS_FILE}: no tensor {key!r}, which {QUANT_CONFIG} lists (an "
                                  f"edited or damaged dir); rebuild it with `quamba quantize` (or rerun snakemake)")
        return tensors.pop(key)

    linears, coded = {}, {}
    for name in quant_config["quantized_linears"]:
        linears[name] = _integer(take(f"{name}.qweight"), take(f"{name}.scales"), integer[name])
    for path in [p for p in integer if p not in linears]:
        coded[path] = _integer(take(f"{path}.q"), take(f"{path}.scale"), integer[path])
    grouped = {_tap_name(k): tensors.pop(k) for k in [k for k in tensors if f".mixer.{GROUP_THRESHOLDS}." in k]}
    scales = [(f"{name}.scales", c.scale) for name, c in linears.items()]
    scales += [(f"{path}.scale", c.scale) for path, c in coded.items()]
    scales += [(group_thresholds_key(tap), values) for tap, values in grouped.items()]
    for key, values in scales:
        if not bool(torch.isfinite(values).all()):  # signs are the codec's (an embedding row's maximum may be < 0)
            raise CheckpointError(f"{model_dir / TENSORS_FILE}: {key} holds NaN or infinite values (an "
                                  f"edited or damaged file); rebuild the dir with `quamba quantize`")
    options = quant_config["recipe"]["options"]
    option = options.get("rounding", "quamba")  # dirs written before the step roundings were recorded: derived
    plan = QuantPlan(
        w_bits=quant_config["w_bits"], rounding=quant_config["rounding"], hadamard=quant_config["hadamard"]["kind"],
        step_rounding=quant_config.get("step_rounding", step_rounding(option)),
        gemv_rounding=quant_config.get("gemv_rounding", gemv_rounding(option)),
        qqq=quant_config["w_bits"] == 4 and quant_config["a_bits"] == 8 and options.get("w4_layout") == "quamba",
        linears=linears, tensors=coded, thresholds=quant_config["activation_thresholds"],
        scale_dtypes=quant_config["activation_scale_dtypes"], group_thresholds=grouped,
        group_scale_dtypes={tap: entry["scale_dtype"]
                            for tap, entry in quant_config.get("group_activation_thresholds", {}).items()})
    return quant_config, tensors, plan
