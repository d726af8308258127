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
GRAPHS_ON_CUDA = True  # replay each block's column loop as one CUDA graph (the same kernels, no launch cost)


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
        qrange(bits)  # validates bits
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
        step = _ColumnLoop(bits, grid, rounding, width if dynamic_groups else None, loss)
        for start in range(0, n_in, blocksize):
            end = min(start + blocksize, n_in)
            groups = slice(start // width, end // width)  # blocks hold whole groups (blocksize rounded above)
            block_scales = scales[:, groups] if dynamic_groups else column_scales[:, start:end]
            Q[:, start:end], errors, block_scales = step(W[:, start:end], U[start:end, start:end], block_scales)
            if dynamic_groups:
                scales[:, groups] = block_scales
            W[:, end:] -= errors @ U[start:end, end:]  # the block's deferred update of later columns

        if perm is not None:
            Q = Q[:, torch.argsort(perm)]  # back to the original column order
        return QuantizedLinearWeight(Q, scales.float(), bits, granularity, group_size, perm, float(loss))


def _quantize_columns(W_block: torch.Tensor, U_block: torch.Tensor, block_scales: torch.Tensor, Q_block: torch.Tensor,
                      errors: torch.Tensor, loss: torch.Tensor, bits: int, grid: str, rounding: str,
                      width: int | None) -> None:
    """GPTQ's column loop over one block, in place: W_block (out, b) is updated column by column,
    Q_block (out, b) and errors (out, b) written, loss accumulated. With `width` (groups met in the
    loop) block_scales (out, b / width) are written as each group starts; without, block_scales
    (out|1, b) are the columns' fixed scales. No host sync: the loop can be captured as a graph."""
    qmin, qmax = qrange(bits)
    for i in range(W_block.shape[1]):
        if width is not None and i % width == 0:  # blocks start on a group boundary
            block_scales[:, i // width] = grid_scale(W_block[:, i:i + width].abs().amax(dim=1), bits, grid)
        scale = block_scales[:, i // width] if width is not None else block_scales[:, i]  # (out|1,)
        w = W_block[:, i]  # (out,)
        q = round_to_integer(w / scale, rounding).clamp_(qmin, qmax)  # (out,), in dtype
        Q_block[:, i] = q.to(torch.int8)
        dequantized = (q * scale).to(torch.float16).to(W_block.dtype)  # Quamba keeps fp16 weights
        error = (w - dequantized) / U_block[i, i]  # (out,)
        loss += error.double().square().sum()
        W_block[:, i + 1:] -= error[:, None] * U_block[i, i + 1:][None, :]  # OBS update, this block
        errors[:, i] = error


class _ColumnLoop:
    """Runs `_quantize_columns` on each block: eagerly on the CPU; on CUDA as one captured graph
    per block shape, replayed with the block copied into its static buffers (the loop is ~10 small
    kernels per column, so eager CUDA is launch-bound). The graph runs exactly the eager kernels in
    the eager order, so both give the same bits; `loss` is the one accumulator either way."""

    def __init__(self, bits: int, grid: str, rounding: str, width: int | None, loss: torch.Tensor):
        self.args = (bits, grid, rounding, width)
        self.loss = loss
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, W_block: torch.Tensor, U_block: torch.Tensor, block_scales: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Q_block, errors, block_scales) of one block; W_block is not written back."""
        key = (tuple(W_block.shape), tuple(block_scales.shape))
        if not (W_block.is_cuda and GRAPHS_ON_CUDA) or key not in self.graphs:
            self.graphs.setdefault(key, None)  # a shape met again is captured: the first run was its warm-up
            buffers = (W_block.clone(), U_block, block_scales.clone(),
                       torch.empty(W_block.shape, dtype=torch.int8, device=W_block.device), torch.empty_like(W_block))
            _quantize_columns(*buffers, self.loss, *self.args)
            return buffers[3], buffers[4], buffers[2]
        if self.graphs[key] is None:
            static = (W_block.clone(), U_block.clone(), block_scales.clone(),
                      torch.empty(W_block.shape, dtype=torch.int8, device=W_block.device), torch.empty_like(W_block))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records the kernels; nothing runs yet
                _quantize_columns(*static, self.loss, *self.args)
            self.graphs[key] = (graph, static)
        graph, (W_s, U_s, S_s, Q_s, E_s) = self.graphs[key]
        W_s.copy_(W_block)
        U_s.copy_(U_block)
        S_s.copy_(block_scales)
        graph.replay()
        return Q_s.clone(), E_s.clone(), S_s.clone()
