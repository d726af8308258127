"""GPTQ (Frantar et al., 2022) for one Linear layer, with no knowledge of the model around it, in
the arithmetic of Quamba's GPTQ (QUAMBA.md section 5).

Feed the layer's inputs to `GPTQ.add_batch`, then call `GPTQ.quantize(weight, bits, ...)`.
GPTQ quantizes the weight's columns one at a time and spreads each column's rounding error
over the columns not yet quantized, so that the layer output X W^T changes as little as
possible in the metric of the Hessian H = (2 / n) sum x x^T. `rtn` is the round-to-nearest
baseline with the same grid.

Quamba's arithmetic, kept here: H is a float32 running average over *sequences* (each call's
leading dimension: H <- H n / (n + b), n <- n + b, H <- H + (2 / n) X^T X), so it ends at
(2 / sequences) sum over tokens of x x^T; dead columns get H_ii = 1 and a zero weight;
0.01 mean(diag H) damping; Cholesky of H, its inverse, and the upper Cholesky factor U of that,
in float32, U cast to the solve's dtype; lazy blocks of 128 columns in natural order, each
group's scale taken from the current, error-updated weights when the loop reaches its first
column; torch.round (ties to even); every dequantized column cast to fp16 before its error is
propagated. The grid and the rounding mode are parameters (the recipe's int4_grid and rounding
options); the solve's dtype is float32 for in_proj/out_proj and fp16 for lm_head, as in Quamba.
Nothing is random: the same inputs give bit-identical outputs on the same machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quamba.numerics.quantizers import (
    HALF_EVEN,
    dequantize,
    expand_scales,
    grid_scale,
    group_width,
    qrange,
    quantize,
    round_to_integer,
    weight_scales,
)

SOLVE_DTYPE = torch.float32  # Quamba's dtype for the damped Cholesky and the column loop of its Linears


@dataclass(frozen=True, eq=False)
class QuantizedLinearWeight:
    """An integer weight with its scales, in the layer's original column order.

    `dequantize()` gives W_hat (out, in) directly, even after act_order.
    """

    q: torch.Tensor  # int8 (out, in): integers in qrange(bits)
    scales: torch.Tensor  # float32 (1, 1) tensor, (out, 1) channel, or (out, in / group_size) group
    bits: int
    granularity: str  # "tensor", "channel" or "group"
    group_size: int  # as requested; the scales' shape says the group width actually used
    perm: torch.Tensor | None = None  # int64 (in,): the order GPTQ quantized columns in (act_order)
    error: float | None = None  # GPTQ's tracked loss, sum (w - q)^2 / d^2; None for RTN

    def dequantize(self) -> torch.Tensor:
        """The float weight W_hat (out, in), float32."""
        return dequantize(self.q, expand_scales(self.scales, self.q.shape[1]))  # (out, in)

    @property
    def group_width(self) -> int:
        """How many input columns actually share a scale (in_features for tensor and channel)."""
        return self.q.shape[1] // self.scales.shape[1]


def rtn(weight: torch.Tensor, bits: int, granularity: str = "group", group_size: int = 128, grid: str = "quamba",
        rounding: str = HALF_EVEN) -> QuantizedLinearWeight:
    """Round-to-nearest quantization of weight (out, in) with absmax scales: the baseline GPTQ must beat."""
    scales = weight_scales(weight, bits, granularity, group_size, grid)  # (1|out, n_groups)
    q = quantize(weight, expand_scales(scales, weight.shape[1]), bits, rounding)  # (out, in)
    return QuantizedLinearWeight(q, scales, bits, granularity, group_size)


class GPTQ:
    """Streamed Hessian of one Linear layer's input, and the GPTQ solve against it."""

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32)  # (in, in), moves to x's device
        self.nsamples = 0  # sequences seen so far

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Add x (sequences, ..., in_features), one sequence at a time as Quamba's calls do
        (it runs GPTQ with batch 1), to the float32 running average H = (2 / n) sum x^T x."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"add_batch: expected (..., {self.in_features}) inputs, got {tuple(x.shape)}")
        if self.nsamples == 0:
            self.hessian = self.hessian.to(x.device)  # the first batch decides where H lives
        sequences = x.detach().reshape(-1, self.in_features)[None] if x.dim() < 3 else x.detach()
        for sequence in sequences:  # (..., in)
            rows = sequence.reshape(-1, self.in_features).to(self.hessian.device, torch.float32)  # (tokens, in)
            self.hessian *= self.nsamples / (self.nsamples + 1)
            self.nsamples += 1
            rows = (2 / self.nsamples) ** 0.5 * rows
            self.hessian += rows.T @ rows

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor, bits: int, granularity: str = "group", group_size: int = 128,
                 percdamp: float = 0.01, blocksize: int = 128, act_order: bool = False, grid: str = "quamba",
                 rounding: str = HALF_EVEN, dtype: torch.dtype = SOLVE_DTYPE) -> QuantizedLinearWeight:
        """GPTQ-quantized weight (out, in) against the Hessian streamed so far; H is left unchanged.

        - Dead inputs (H_ii == 0: the column never saw a nonzero input) get H_ii = 1 and a zero
          weight, so the solve stays defined and they cost nothing.
        - percdamp * mean(diag H) is added to the diagonal before inverting.
        - Scales (`grid`, quamba.numerics.quantizers.grid_scale): "tensor" and "channel" from the
          original weight's absmax; "group" from the current, error-updated weights when the
          loop reaches each group's first column. With act_order, groups stay contiguous in the
          original column order, so their scales are fixed up front from the original weight.
        - blocksize only trades speed (lazy batched updates); for groups it is rounded to a
          multiple of the group width so each group's scale sees fully updated weights.
        - act_order (not Quamba's) quantizes columns in order of decreasing H_ii; q and scales
          come back in the original column order and `perm` records the order used.
        - dtype: the weight, U and the column loop (float32; Quamba runs lm_head in fp16).
        The result's `error` is sum (w - q)^2 / d^2 over all weights, d the diagonal of the
        inverse Hessian's Cholesky factor.
        """
        if weight.dim() != 2 or weight.shape[1] != self.in_features:
            raise ValueError(f"weight: expected (out_features, {self.in_features}), got {tuple(weight.shape)}")
        if self.nsamples == 0:
            raise RuntimeError("GPTQ.quantize: no inputs seen; call add_batch with calibration inputs first")
        if not 0 <= percdamp < 1:
            raise ValueError(f"percdamp: {percdamp} must be in [0, 1)")
        if blocksize <= 0:
            raise ValueError(f"blocksize: must be positive, got {blocksize}")
        qmin, qmax = qrange(bits)
        n_out, n_in = weight.shape
        width = group_width(n_in, granularity, group_size)  # columns per scale
        dynamic_groups = width < n_in and not act_order
        device = weight.device

        W = weight.detach().to(device, dtype).clone()  # (out, in), overwritten as the loop goes
        H = self.hessian.to(device, torch.float32, copy=True)  # (in, in)
        dead = H.diagonal() == 0  # (in,)
        H.diagonal()[dead] = 1.0
        W[:, dead] = 0.0
        if dynamic_groups:
            scales = torch.empty(n_out, n_in // width, dtype=dtype, device=device)  # (out, n_groups)
            blocksize = max(width, blocksize // width * width)
        else:
            scales = weight_scales(W, bits, granularity, group_size, grid).to(dtype)  # (1|out, n_groups)

        perm = None
        if act_order:
            perm = torch.argsort(H.diagonal(), descending=True, stable=True)  # (in,)
            W, H = W[:, perm], H[perm][:, perm]
        if not dynamic_groups:
            column_scales = expand_scales(scales, n_in)  # (1|out, in), original order
            column_scales = column_scales[:, perm] if perm is not None else column_scales

        H.diagonal().add_(percdamp * H.diagonal().mean())
        L, info = torch.linalg.cholesky_ex(H)  # H = L L^T
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)  # H^-1 = U^T U
        if info.item() != 0:
            raise RuntimeError(f"GPTQ: the damped Hessian is not positive definite in float32; "
                               f"raise percdamp (now {percdamp})")
        U = U.to(dtype)

        Q = torch.empty(n_out, n_in, dtype=torch.int8, device=device)  # (out, in), quantization order
        loss = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, n_in, blocksize):
            end = min(start + blocksize, n_in)
            W_block = W[:, start:end]  # (out, b), a view: updated in place
            U_block = U[start:end, start:end]  # (b, b)
            errors = torch.empty_like(W_block)  # (out, b): (w - q) / d per column
            for i in range(end - start):
                column = start + i
                if dynamic_groups and column % width == 0:
                    group = W_block[:, i:i + width]  # (out, width), inside this block by the alignment
                    scales[:, column // width] = grid_scale(group.abs().amax(dim=1), bits, grid)
                scale = scales[:, column // width] if dynamic_groups else column_scales[:, column]  # (out|1,)
                w = W_block[:, i]  # (out,)
                q = round_to_integer(w / scale, rounding).clamp_(qmin, qmax)  # (out,), in dtype
                Q[:, column] = q.to(torch.int8)
                dequantized = (q * scale).to(torch.float16).to(dtype)  # Quamba keeps fp16 weights
                error = (w - dequantized) / U_block[i, i]  # (out,)
                loss += error.double().square().sum()
                W_block[:, i + 1:] -= error[:, None] * U_block[i, i + 1:][None, :]  # OBS update, this block
                errors[:, i] = error
            W[:, end:] -= errors @ U[start:end, end:]  # the block's deferred update of later columns

        if perm is not None:
            Q = Q[:, torch.argsort(perm)]  # back to the original column order
        return QuantizedLinearWeight(Q, scales.float(), bits, granularity, group_size, perm, float(loss))
