"""GPTQ (Frantar et al., 2022) for one Linear layer, with no knowledge of the model around it.

Feed the layer's inputs to `GPTQ.add_batch`, then call `GPTQ.quantize(weight, bits, ...)`.
GPTQ quantizes the weight's columns one at a time and spreads each column's rounding error
over the columns not yet quantized, so that the layer output X W^T changes as little as
possible in the metric of the Hessian H = (2 / n) X^T X. `rtn` is the round-to-nearest
baseline with the same scales. Both round with `quantizers.round_half_away`.

Numerics: H is accumulated in float64 (n can be 128 x 1024 rows and more; float32 running
averages would make the result depend on batch order and batch size at the 1e-6 level),
then cast to float32 for the solve, as Quamba does (Cholesky of the damped inverse in fp32;
1% damping keeps it well conditioned, and float32 is twice as fast on CPU and far faster on
GPU). Nothing is random: the same inputs give bit-identical outputs on the same machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quamba.numerics.quantizers import (
    WEIGHT_SCALE_FLOOR,
    dequantize,
    expand_scales,
    group_width,
    qrange,
    quantize,
    weight_scales,
)

SOLVE_DTYPE = torch.float32  # Quamba's dtype for the damped Cholesky and the column loop


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


def rtn(weight: torch.Tensor, bits: int, granularity: str = "group",
        group_size: int = 128) -> QuantizedLinearWeight:
    """Round-to-nearest quantization of weight (out, in) with absmax scales: the baseline GPTQ must beat."""
    scales = weight_scales(weight, bits, granularity, group_size)  # (1|out, n_groups)
    q = quantize(weight, expand_scales(scales, weight.shape[1]), bits)  # (out, in)
    return QuantizedLinearWeight(q, scales, bits, granularity, group_size)


class GPTQ:
    """Streamed Hessian of one Linear layer's input, and the GPTQ solve against it."""

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float64)  # (in, in), moves to x's device
        self.nsamples = 0  # rows seen so far

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Add the rows of x (..., in_features) to H = (2 / n) sum_rows x^T x.

        A running average: H_new = H * n_old / n_new + (2 / n_new) x^T x, so the scale of H
        never grows with n and batch order matters only through float64 rounding.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"add_batch: expected (..., {self.in_features}) inputs, got {tuple(x.shape)}")
        if self.nsamples == 0:
            self.hessian = self.hessian.to(x.device)  # the first batch decides where H lives
        rows = x.detach().reshape(-1, self.in_features).to(self.hessian.device, torch.float64)  # (n, in)
        if rows.shape[0] == 0:
            return
        total = self.nsamples + rows.shape[0]
        self.hessian.mul_(self.nsamples / total).addmm_(rows.T, rows, alpha=2.0 / total)
        self.nsamples = total

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor, bits: int, granularity: str = "group", group_size: int = 128,
                 percdamp: float = 0.01, blocksize: int = 128, act_order: bool = False) -> QuantizedLinearWeight:
        """GPTQ-quantized weight (out, in) against the Hessian streamed so far; H is left unchanged.

        - Dead inputs (H_ii == 0: the column never saw a nonzero input) get H_ii = 1 and a zero
          weight, so the solve stays defined and they cost nothing.
        - percdamp * mean(diag H) is added to the diagonal before inverting.
        - Scales: "tensor" and "channel" from the original weight's absmax; "group" from the
          current, error-updated weights when the loop reaches each group's first column.
          With act_order, groups stay contiguous in the original column order, so their
          scales are fixed up front from the original weight (static groups, as in AutoGPTQ).
        - blocksize only trades speed (lazy batched updates); for groups it is rounded to a
          multiple of the group width so each group's scale sees fully updated weights.
        - act_order quantizes columns in order of decreasing H_ii; q and scales come back in
          the original column order and `perm` records the order used.
        The result's `error` is sum (w - q)^2 / d^2 over all weights, d the diagonal of the
        inverse Hessian's Cholesky factor; it equals trace(dW H_damped dW^T) with dW = W - W_hat,
        i.e. (2 / n) ||X dW^T||^2 + damping * ||dW||^2.
        """
        if weight.dim() != 2 or weight.shape[1] != self.in_features:
            raise ValueError(f"weight: expected (out_features, {self.in_features}), got {tuple(weight.shape)}")
        if self.nsamples == 0:
            raise RuntimeError("GPTQ.quantize: no inputs seen; call add_batch with calibration inputs first")
        if not 0 <= percdamp < 1:
            raise ValueError(f"percdamp: {percdamp} must be in [0, 1)")
        if blocksize <= 0:
            raise ValueError(f"blocksize: must be positive, got {blocksize}")
        qmax = qrange(bits)[1]
        n_out, n_in = weight.shape
        width = group_width(n_in, granularity, group_size)  # columns per scale
        dynamic_groups = width < n_in and not act_order
        device = weight.device

        W = weight.detach().to(device, SOLVE_DTYPE).clone()  # (out, in), overwritten as the loop goes
        H = self.hessian.to(device, SOLVE_DTYPE, copy=True)  # (in, in)
        if dynamic_groups:
            scales = torch.empty(n_out, n_in // width, dtype=torch.float32, device=device)  # (out, n_groups)
            blocksize = max(width, blocksize // width * width)
        else:
            scales = weight_scales(W, bits, granularity, group_size)  # (1|out, n_groups)

        dead = H.diagonal() == 0  # (in,)
        H.diagonal()[dead] = 1.0
        W[:, dead] = 0.0

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
            raise RuntimeError(f"GPTQ: the damped Hessian is not positive definite in {SOLVE_DTYPE}; "
                               f"raise percdamp (now {percdamp})")

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
                    scales[:, column // width] = (group.abs().amax(dim=1) / qmax).clamp_(min=WEIGHT_SCALE_FLOOR)
                scale = scales[:, column // width] if dynamic_groups else column_scales[:, column]  # (out|1,)
                w = W_block[:, i]  # (out,)
                q = quantize(w, scale, bits)  # (out,) int8
                Q[:, column] = q
                error = (w - dequantize(q, scale)) / U_block[i, i]  # (out,)
                loss += error.square().sum(dtype=torch.float64)
                W_block[:, i + 1:] -= error[:, None] * U_block[i, i + 1:][None, :]  # OBS update, this block
                errors[:, i] = error
            W[:, end:] -= errors @ U[start:end, end:]  # the block's deferred update of later columns

        if perm is not None:
            Q = Q[:, torch.argsort(perm)]  # back to the original column order
        return QuantizedLinearWeight(Q, scales, bits, granularity, group_size, perm, float(loss))
