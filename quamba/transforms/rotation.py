"""Quamba's Hadamard rotations fused into the weights: out_proj's input, and optionally the
residual stream (embedding, norms, in_proj, out_proj's output, lm_head).

out_proj(y) = W y = (W R^T)(R y) for the orthonormal Hadamard R: the rotated input R y has
far smaller outliers, which is what makes its static int8 quantization work; the inverse
rotation is folded into the weight once, so the FP model's output does not change.
"""

from __future__ import annotations

import torch
from torch import nn

from quamba.errors import ConfigError
from quamba.numerics.hadamard import ALLOWED, hadamard_transform, supported


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


def _rotate_columns(weight: torch.Tensor) -> torch.Tensor:
    """R W for W (out, in): each column rotated, i.e. the layer's output moved into the rotated basis."""
    return hadamard_transform(weight.T).T  # (out, in)


@torch.no_grad()
def rotate_residual(model: nn.Module) -> nn.Module:
    """Move the residual stream into the Hadamard basis, as Quamba does with Hadamard on (in place).

    With R the orthonormal Hadamard of width d_model, the residual h becomes R h everywhere:
    the embedding rows are rotated; every RMSNorm weight is fused into the Linear after it
    (in_proj, lm_head) and set to one, because RMSNorm commutes with R only without its weight
    (rms(R h) = rms(h)); in_proj becomes W diag(w) R^T, out_proj R W (its bias R b), and lm_head
    W diag(w_f) R^T. lm_head is untied from the embedding first, since the two now differ; the
    model's config says tie_embeddings=False afterwards. The FP output is unchanged up to
    rounding; in_proj:input and lm_head:input then see rotated, unweighted activations.
    """
    d_model = model.config.d_model
    if not supported(d_model):
        raise ConfigError(f"rotate_residual: d_model={d_model} has no Hadamard rotation; supported: {ALLOWED}")
    if model.config.tie_embeddings:
        model.lm_head.weight = nn.Parameter(model.backbone.embedding.weight.detach().clone())
        model.config = model.config.replace(tie_embeddings=False)
    embedding = model.backbone.embedding.weight
    embedding.copy_(hadamard_transform(embedding))  # (vocab, d_model): rows h -> R h
    _fuse_norm_then_rotate(model.backbone.norm_f, model.lm_head)
    for block in model.backbone.layers:
        _fuse_norm_then_rotate(block.norm, block.mixer.in_proj)
        out_proj = getattr(block.mixer.out_proj, "linear", block.mixer.out_proj)  # RotatedLinear or Linear
        out_proj.weight.copy_(_rotate_columns(out_proj.weight))  # (d_model, d_inner): R W
        if out_proj.bias is not None:
            out_proj.bias.copy_(hadamard_transform(out_proj.bias))
    return model


def _fuse_norm_then_rotate(norm: nn.Module, linear: nn.Linear) -> None:
    """W -> W diag(w) R^T and w -> 1: the norm's scale moves into the Linear that reads it."""
    fused = linear.weight.float() * norm.weight.float()  # (out, d_model)
    linear.weight.copy_(hadamard_transform(fused))  # rows r -> R r: W diag(w) R^T
    norm.weight.fill_(1.0)
