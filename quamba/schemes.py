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
