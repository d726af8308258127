"""Quamba's Hadamard rotations fused into the weights: out_proj's input always, and the residual
stream (embedding, norms, in_proj, out_proj's output, lm_head) with the recipe's rotate_residual.

out_proj(y) = W y = (W T^T)(T y) for the orthonormal Hadamard T: the rotated input T y has
far smaller outliers, which is what makes its static int8 quantization work; the inverse
rotation is folded into the weight once, so the FP model's output does not change. `kind` is
the recipe's `hadamard` option (quamba.numerics.hadamard): which matrix T is.
"""

from __future__ import annotations

import torch
from torch import nn

from quamba.errors import ConfigError
from quamba.numerics.hadamard import ALLOWED, hadamard_transform, rotate_weight_rows, supported


def check_widths(config, rotate_residual: bool, kind: str) -> None:
    """Fail before any work when a width the recipe rotates has no Hadamard matrix of `kind`:
    d_inner (out_proj's input, always) and d_model (with rotate_residual)."""
    widths = {"d_inner (out_proj's input)": config.d_inner}
    if rotate_residual:
        widths["d_model (rotate_residual)"] = config.d_model
    for what, n in widths.items():
        if not supported(n, kind):
            raise ConfigError(f"recipe.hadamard: {what} = {n} has no Hadamard matrix with hadamard={kind!r}; "
                              f"supported: {ALLOWED[kind]}"
                              + ("; hadamard: extended adds 20 * 2^k and 28 * 2^k" if kind == "quamba" else ""))


class RotatedLinear(nn.Module):
    """A Linear whose weight is W T^T and whose input is rotated by T on the way in."""

    def __init__(self, linear: nn.Linear, kind: str):
        super().__init__()
        self.linear, self.kind = linear, kind

    @classmethod
    @torch.no_grad()
    def fuse(cls, linear: nn.Linear, kind: str) -> RotatedLinear:
        """W -> W T^T: row i of the new weight is T applied to row i of W."""
        rotate_weight_rows(linear.weight, kind, out=linear.weight)  # (out, in): rows rotated
        return cls(linear, kind)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(hadamard_transform(x, self.kind))


def rotate_out_projs(model: nn.Module, kind: str) -> nn.Module:
    """Replace every mixer's out_proj by its rotated, fused form (in place; returns the model)."""
    for block in model.backbone.layers:
        if not isinstance(block.mixer.out_proj, RotatedLinear):
            block.mixer.out_proj = RotatedLinear.fuse(block.mixer.out_proj, kind)
    return model


def _rotate_columns(weight: torch.Tensor, kind: str) -> None:
    """W -> T W for W (out, in), in place: each column rotated, i.e. the layer's output moved into
    the rotated basis."""
    rotate_weight_rows(weight.T, kind, out=weight.T)  # (in, out) views: the columns as rows


@torch.no_grad()
def rotate_residual(model: nn.Module, kind: str, discarded: frozenset[str] = frozenset()) -> nn.Module:
    """Move the residual stream into the Hadamard basis, as Quamba always does (in place).

    With T the orthonormal Hadamard of width d_model, the residual h becomes T h everywhere:
    the embedding rows are rotated; every RMSNorm weight is folded into the Linear after it
    (in_proj, lm_head) and set to one, because RMSNorm commutes with T only without its weight
    (rms(T h) = rms(h)); in_proj becomes W diag(g) T^T, out_proj T W (its bias T b), and lm_head
    W diag(g_f) T^T. lm_head is untied from the embedding first, since the two now differ; the
    model's config says tie_embeddings=False afterwards. As in Quamba, block norms are folded in
    float64 and norm_f into lm_head in float16. The FP output is unchanged up to rounding.

    `discarded`: weights (state-dict names: in_proj, out_proj, lm_head) the caller throws away,
    as assembly does with the ones a GPTQ dir replaces; they are left as they were, unrotated (their
    norms are still set to one), which saves most of a deep model's rotation work.
    """
    check_widths(model.config, True, kind)
    if model.config.tie_embeddings:
        model.lm_head.weight = nn.Parameter(model.backbone.embedding.weight.detach().clone())
        model.config = model.config.replace(tie_embeddings=False)
    embedding = model.backbone.embedding.weight
    rotate_weight_rows(embedding, kind, out=embedding)  # (vocab, d_model): rows h -> T h
    _fold_norm_then_rotate(model.backbone.norm_f, model.lm_head, torch.float16, kind, "lm_head.weight" in discarded)
    for i, block in enumerate(model.backbone.layers):
        mixer = f"backbone.layers.{i}.mixer"
        _fold_norm_then_rotate(block.norm, block.mixer.in_proj, torch.float64, kind,
                               f"{mixer}.in_proj.weight" in discarded)
        out_proj = getattr(block.mixer.out_proj, "linear", block.mixer.out_proj)  # RotatedLinear or Linear
        if f"{mixer}.out_proj.weight" not in discarded:
            _rotate_columns(out_proj.weight, kind)  # (d_model, d_inner): T W
        if out_proj.bias is not None:
            out_proj.bias.copy_(hadamard_transform(out_proj.bias, kind))
    return model


def _fold_norm_then_rotate(norm: nn.Module, linear: nn.Linear, fold_dtype: torch.dtype, kind: str,
                           discarded: bool = False) -> None:
    """W -> W diag(g) T^T and g -> 1: the norm's scale moves into the Linear that reads it (a
    discarded W is left as it is)."""
    if not discarded:
        folded = linear.weight.to(fold_dtype) * norm.weight.to(fold_dtype)  # (out, d_model)
        rotate_weight_rows(folded.to(torch.promote_types(fold_dtype, torch.float32)), kind, out=linear.weight)
    norm.weight.fill_(1.0)
