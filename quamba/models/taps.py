"""Named quantization points inside the model, where observers look and quantizers sit.

A tap is an identity module; calibration hangs forward hooks on it. Full names are stable
and are the keys of stats.json and activations.npz: `layer_{i}.{point}` inside block i
(e.g. `layer_3.x_proj:input`) and `lm_head:input`. The points follow Quamba's observers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

# Quamba observes these through hooks on its Linear layers and identity modules. `percentile`
# marks where Quamba1's path (Mamba1; Mamba2 without reordering) uses its percentile observer;
# every other point, and every point on Quamba2's path, uses min/max (quamba.stages.calibrate).
# `rotated` marks where the quantizer sees Hadamard-rotated values.
MAMBA1_POINTS = {
    "in_proj:input": "block input after RMSNorm (b, l, d_model)",
    "in_proj:output": "x and z before the conv, one scale for both (b, l, 2 d_inner)",
    "x_proj:input": "SSM input u = SiLU(conv(x)) (b, d_inner, l); percentile",
    "x_proj:output": "dt (low rank), B and C (b, l, dt_rank + 2 d_state)",
    "dt_proj:output": "dt before bias and softplus (b, d_inner, l)",
    "ssm_state_act:input": "SSM state after the last token (b, d_inner, d_state); percentile",
    "out_proj:input": "gated SSM output y, observed Hadamard-rotated (b, l, d_inner)",
}
MAMBA2_POINTS = {
    "in_proj:input": "block input after RMSNorm (b, l, d_model)",
    "z_act:input": "gate z (b, l, d_inner)",
    "x_conv_in:input": "x before the conv (b, l, d_inner)",
    "B_conv_in:input": "B before the conv (b, l, ngroups d_state)",
    "C_conv_in:input": "C before the conv (b, l, ngroups d_state)",
    "x_conv_out:input": "SSM input x = SiLU(conv(x)) (b, l, d_inner); percentile",
    "B_conv_out:input": "B after the conv (b, l, ngroups d_state)",
    "C_conv_out:input": "C after the conv (b, l, ngroups d_state)",
    "dt_act:input": "dt before bias and softplus (b, l, nheads)",
    "ssm_state_act:input": "SSM state after the last token (b, nheads, headdim, d_state); percentile",
    "out_proj:input": "gated-RMSNorm output, observed Hadamard-rotated (b, l, d_inner)",
}
LM_HEAD_POINT = "lm_head:input"
ROTATED_POINTS = frozenset({"out_proj:input"})


class Tap(nn.Module):
    """A named point: identity in the FP model; with `scale` set, static symmetric int8
    fake-quantization (quantize, then dequantize) as the quantized model computes it.
    `scale` is one float (per tensor) or a tensor of one scale per channel of the last dim
    (Quamba2's grouped scales of x after reordering).
    `rotated`: quantizers see Hadamard-rotated values here (applied by the Linear after it)."""

    def __init__(self, point: str):
        super().__init__()
        self.point = point
        self.rotated = point in ROTATED_POINTS
        self._scale: float | torch.Tensor | None = None
        self._scale_tensor: torch.Tensor | None = None  # float32, on the device of the last input
        self.quantizes = False  # a scale is set (forward tests this, never the float itself)
        self.rounding = "half_away"  # set with the scale from the quantized dir's record
        self.step_rounding: str | None = None  # a decoding step's, where it is not the prefill's

    @property
    def scale(self) -> float | torch.Tensor | None:
        return self._scale

    @scale.setter
    def scale(self, value: float | torch.Tensor | None) -> None:
        self._scale, self._scale_tensor, self.quantizes = value, None, value is not None

    def scale_on(self, device: torch.device) -> torch.Tensor:
        """The scale as a float32 tensor on `device`, made once per device. A tensor, not the
        Python float: the same values (a float32 scale either way), and a compiled block reads it
        as an input, so one graph serves every block (a float would be a constant of the graph)."""
        cached = self._scale_tensor
        if cached is None or cached.device != device:
            self._scale_tensor = cached = torch.as_tensor(self._scale, dtype=torch.float32).to(device)
        return cached

    def materialize(self, device: torch.device, dtype: torch.dtype) -> None:
        """Make the scale's tensor on `device` now (MambaLMHeadModel.compile_blocks)."""
        if self.quantizes:
            self.scale_on(device)

    def forward(self, x: torch.Tensor, step: bool = False) -> torch.Tensor:
        """x, fake-quantized where a scale is set; `step`: in a decoding step (its own rounding)."""
        if not self.quantizes:
            return x
        from quamba.numerics.quantizers import fake_quantize  # the FP path never needs it

        rounding = self.step_rounding if step and self.step_rounding is not None else self.rounding
        return fake_quantize(x, self.scale_on(x.device), 8, rounding)

    def extra_repr(self) -> str:
        if self.scale is None:
            return self.point
        if isinstance(self.scale, torch.Tensor):
            return f"{self.point}, int8 scales per channel ({self.scale.numel()})"
        return f"{self.point}, int8 scale={self.scale:.4g}"


class Taps(nn.Module):
    """The taps of one mixer, called by point name: `x = self.taps("x_proj:input", x)`."""

    def __init__(self, points: dict[str, str]):
        super().__init__()
        self.by_key = nn.ModuleDict({_key(p): Tap(p) for p in points})

    def forward(self, point: str, x: torch.Tensor) -> torch.Tensor:
        return self.by_key[_key(point)](x)

    def step(self, point: str, x: torch.Tensor) -> torch.Tensor:
        """The tap at `point` in a decoding step, where Quamba may round otherwise (the state)."""
        return self.by_key[_key(point)](x, step=True)

    def quantizes(self, point: str) -> bool:
        """Whether the tap at `point` fake-quantizes (a quantized model) or is an identity (the FP model)."""
        return self.by_key[_key(point)].quantizes

    def __iter__(self) -> Iterator[Tap]:
        return iter(self.by_key.values())


def _key(point: str) -> str:
    return point.replace(":", "__")  # ModuleDict keys may not hold "." and read badly with ":"


def named_taps(model: nn.Module) -> dict[str, Tap]:
    """Every tap of a MambaLMHeadModel by its full, stable name, in forward order."""
    taps: dict[str, Tap] = {}
    for i, block in enumerate(model.backbone.layers):
        for tap in block.mixer.taps:
            taps[f"layer_{i}.{tap.point}"] = tap
    taps[LM_HEAD_POINT] = model.lm_head_input
    return taps


def tap_layer(name: str) -> int | None:
    """The block index of a full tap name, None for lm_head:input."""
    return int(name.split(".", 1)[0].removeprefix("layer_")) if name.startswith("layer_") else None
