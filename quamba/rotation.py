"""Quamba's Hadamard rotation of out_proj's input, fused into the weight.

out_proj(y) = W y = (W R^T)(R y) for the orthonormal Hadamard R: the rotated input R y has
far smaller outliers, which is what makes its static int8 quantization work; the inverse
rotation is folded into the weight once, so the FP model's output does not change.
"""

from __future__ import annotations

import torch
from torch import nn

from quamba.hadamard import hadamard_transform


class RotatedLinear(nn.Module):
    """A Linear whose weight is W R^T and whose input is rotated by R on the way in."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    @classmethod
    @torch.no_grad()
    def fuse(cls, linear: nn.Linear) -> RotatedLinear:
        """W -> W R^T: row i of the new weight is R applied to row i of W."""
        linear.weight.copy_(hadamard_transform(linear.weight))  # (out, in): rows rotated
        return cls(linear)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(hadamard_transform(x))


def rotate_out_projs(model: nn.Module) -> nn.Module:
    """Replace every mixer's out_proj by its rotated, fused form (in place; returns the model)."""
    for block in model.backbone.layers:
        if not isinstance(block.mixer.out_proj, RotatedLinear):
            block.mixer.out_proj = RotatedLinear.fuse(block.mixer.out_proj)
    return model
