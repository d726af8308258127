"""Quantization schemes as data: what is quantized, to how many bits, at what granularity."""

from __future__ import annotations

from dataclasses import dataclass

from quamba.errors import ConfigError


@dataclass(frozen=True)
class Scheme:
    """One of Quamba's schemes. Weights of in_proj and out_proj are GPTQ-quantized to w_bits;
    activations, when a_bits is set, are quantized to static per-tensor symmetric int8 at the
    block taps with scales from the chosen alpha's scales.json."""

    name: str
    w_bits: int | None  # None: fp16 weights
    a_bits: int | None  # None: fp16 activations
    weight_granularity: str = "tensor"  # "tensor" (Quamba's int8 weights) or "group" (int4); GPTQ sets the group size

    @property
    def needs_stats(self) -> bool:
        return self.a_bits is not None

    @property
    def needs_gptq(self) -> bool:
        return self.w_bits is not None


SCHEMES = {
    "fp16": Scheme("fp16", None, None),
    "w8a8": Scheme("w8a8", 8, 8, "tensor"),
    # Quamba's W4A8 adds a per-output-channel scale on top of the groups (the Marlin layout);
    # the group scales alone carry the same information in our reference format.
    "w4a8": Scheme("w4a8", 4, 8, "group"),
    "w4a16": Scheme("w4a16", 4, None, "group"),
}


def get_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise ConfigError(f"scheme: {name!r} is not supported; allowed: {sorted(SCHEMES)}")
    return SCHEMES[name]


# What Quamba stores as integers beyond in_proj and out_proj (QUAMBA.md section 6), per mixer:
# tensor (its state-dict path inside the mixer) -> codec (quamba.numerics.tensor_codecs).
# "w8": per-tensor int8 in fp16; "w8_fp32": the same formula in fp32; "w4": Marlin int4
# round-to-nearest (no GPTQ); "ssm": Mamba1's scan parameters A_log, D, dt_bias int8 per tensor in
# fp32 (its selective scan's own quantizer); "w8_conv_parts": Mamba2's conv, one int8 scale per x,
# B, C part. Mamba2's A_log and D go through the per-tensor W8 formula in the dtype each parameter
# has in Quamba's model: A_log fp16, D fp32 (QUAMBA.md sections 1 and 7).
_MAMBA1_A8 = {"conv1d.weight": "w8", "conv1d.bias": "w8", "dt_proj.weight": "w8",
              "A_log": "ssm", "D": "ssm", "dt_proj.bias": "ssm"}
_MAMBA2_A8 = {"conv1d.weight": "w8_conv_parts", "conv1d.bias": "w8_conv_parts", "A_log": "w8", "D": "w8_fp32"}
MIXER_INTEGER_TENSORS = {
    ("Mamba1", "w8a8"): {"x_proj.weight": "w8", **_MAMBA1_A8},
    ("Mamba1", "w4a8"): {"x_proj.weight": "w4", **_MAMBA1_A8},  # x_proj QQQ W4 (RTN), dt_proj stays W8A8
    ("Mamba1", "w4a16"): {"x_proj.weight": "w4"},  # Marlin W4 (RTN); conv, dt_proj and the scan stay fp16
    ("Mamba2", "w8a8"): dict(_MAMBA2_A8),  # dt_bias stays fp16
    ("Mamba2", "w4a8"): dict(_MAMBA2_A8),
    ("Mamba2", "w4a16"): {},
}


def mixer_integer_tensors(layer: str, scheme: str, coverage: str) -> dict[str, str]:
    """The mixer tensors `scheme` stores as integers beyond in_proj and out_proj, with their
    codecs: Quamba's table (recipe module_coverage: quamba), or none (projections)."""
    return dict(MIXER_INTEGER_TENSORS[(layer, scheme)]) if coverage == "quamba" else {}
