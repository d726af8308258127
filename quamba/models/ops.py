"""Pure-PyTorch reference kernels for Mamba1 and Mamba2.

Each function has the signature of its CUDA counterpart in mamba_ssm / causal_conv1d
(see `kernels.py`), so the two can be swapped and tested against each other. These are the
ground truth: they compute in fp32 and cast the result back to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _time_step(dt: torch.Tensor, bias: torch.Tensor | None, softplus: bool,
               limit: tuple[float, float] = (0.0, float("inf"))) -> torch.Tensor:
    """dt in fp32 after the bias, the softplus and Mamba2's optional clamp."""
    dt = dt.float()
    if bias is not None:
        dt = dt + bias.float()
    if softplus:
        dt = F.softplus(dt)
    if limit != (0.0, float("inf")):
        dt = dt.clamp(min=limit[0], max=limit[1])
    return dt


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32, returned in x's dtype."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + eps)
    return (x32 * rstd * weight.float()).to(x.dtype)


def gated_rms_norm(
    x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int
) -> torch.Tensor:
    """Mamba2's RMSNormGated with norm_before_gate=False: normalize x * silu(z) per group."""
    gated = x.float() * F.silu(z.float())
    *prefix, width = gated.shape
    groups = gated.view(*prefix, width // group_size, group_size)  # (..., g, group_size)
    rstd = torch.rsqrt(groups.square().mean(dim=-1, keepdim=True) + eps)
    normed = (groups * rstd).view(*prefix, width)
    return (normed * weight.float()).to(x.dtype)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = "silu"
) -> torch.Tensor:
    """Depthwise causal conv over time. x: (b, d, l), weight: (d, k) -> (b, d, l)."""
    dim, width = weight.shape
    seqlen = x.shape[-1]
    out = F.conv1d(x.float(), weight.float().unsqueeze(1), None if bias is None else bias.float(),
                   padding=width - 1, groups=dim)[..., :seqlen]  # (b, d, l)
    if activation == "silu":
        out = F.silu(out)
    return out.to(x.dtype)


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """One decoding step of the causal conv. x: (b, d); conv_state: (b, d, k), updated in place."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x
    out = (conv_state.float() * weight.float()).sum(dim=-1)  # (b, d)
    if bias is not None:
        out = out + bias.float()
    if activation == "silu":
        out = F.silu(out)
    return out.to(x.dtype)


SCAN_CHUNK = 16  # time steps per chunk of the reference selective scan


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba1's selective scan (the recurrence h_t = exp(delta A) h_{t-1} + delta B_t u_t).

    u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l); D, delta_bias: (d,).
    Returns y (b, d, l) and, if asked, the last state (b, d, n) in fp32.
    """
    dtype = u.dtype
    u = u.float()
    delta = _time_step(delta, None if delta_bias is None else delta_bias[None, :, None], delta_softplus)
    batch, dim, seqlen = u.shape
    A = A.float()
    delta_t, delta_u_t = delta.transpose(1, 2), (delta * u).transpose(1, 2)  # (b, l, d)
    B_t, C_t = B.float().transpose(1, 2), C.float().transpose(1, 2)  # (b, l, n)
    h = u.new_zeros(batch, dim, A.shape[1])  # (b, d, n)
    ys = []
    # Time runs in chunks so the (b, chunk, d, n) factors stay in cache: same recurrence, same
    # order of operations per step, 3-4x faster on CPU than materialising all l steps at once.
    for start in range(0, seqlen, SCAN_CHUNK):
        steps = slice(start, start + SCAN_CHUNK)
        deltaA = torch.exp(delta_t[:, steps, :, None] * A)  # (b, chunk, d, n)
        deltaB_u = delta_u_t[:, steps, :, None] * B_t[:, steps, None, :]  # (b, chunk, d, n)
        states = []
        # unbind once: indexing [:, t] inside the loop makes autograd zero-fill the whole tensor per step
        for dA_t, dBu_t in zip(deltaA.unbind(1), deltaB_u.unbind(1)):
            h = dA_t * h + dBu_t
            states.append(h)
        ys.append(torch.einsum("tbdn,btn->bdt", torch.stack(states), C_t[:, steps]))
    y = torch.cat(ys, dim=-1)  # (b, d, l)
    if D is not None:
        y = y + u * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, h) if return_last_state else y


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """One decoding step of Mamba1's scan. state: (b, d, n) updated in place; x, dt, z: (b, d);
    A: (d, n); B, C: (b, n). Returns y (b, d)."""
    dt = _time_step(dt, dt_bias, dt_softplus)
    dA = torch.exp(dt[:, :, None] * A.float())  # (b, d, n)
    dBx = dt[:, :, None] * B.float()[:, None, :] * x.float()[:, :, None]  # (b, d, n)
    new_state = state.float() * dA + dBx
    state.copy_(new_state)
    y = (new_state * C.float()[:, None, :]).sum(dim=-1)  # (b, d)
    if D is not None:
        y = y + x.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def _segment_sum(x: torch.Tensor) -> torch.Tensor:
    """Stable sums x[..., j+1:i+1] for i >= j (and -inf above the diagonal). x: (..., T) -> (..., T, T)."""
    T = x.shape[-1]
    expanded = x[..., None].expand(*x.shape, T)  # (..., T, T): [i, j] = x[i]
    strict_lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    sums = torch.cumsum(expanded.masked_fill(~strict_lower, 0), dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=0)
    return sums.masked_fill(~lower, -torch.inf)


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba2's state-space duality scan, chunked (signature of mamba_chunk_scan_combined).

    x: (b, l, h, p); dt: (b, l, h); A, D, dt_bias: (h,); B, C: (b, l, g, n);
    initial_states: (b, h, p, n). Returns y (b, l, h, p) and, if asked, the final state (b, h, p, n).
    """
    dtype = x.dtype
    batch, seqlen, nheads, headdim = x.shape
    ngroups = B.shape[2]
    dt = _time_step(dt, dt_bias, dt_softplus, dt_limit)
    x32 = x.float()
    B = B.float().repeat_interleave(nheads // ngroups, dim=2)  # (b, l, h, n)
    C = C.float().repeat_interleave(nheads // ngroups, dim=2)  # (b, l, h, n)

    pad = (chunk_size - seqlen % chunk_size) % chunk_size
    def chunked(t: torch.Tensor) -> torch.Tensor:  # (b, l, ...) -> (b, c, chunk, ...)
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.view(batch, -1, chunk_size, *t.shape[2:])

    xdt = chunked(x32 * dt[..., None])  # (b, c, s, h, p)
    Adt = chunked(A.float() * dt).permute(0, 3, 1, 2)  # (b, h, c, s)
    Bc, Cc = chunked(B), chunked(C)  # (b, c, s, h, n)
    A_cumsum = torch.cumsum(Adt, dim=-1)  # (b, h, c, s)

    # Within each chunk: a masked, decayed "attention" of C against B.
    decay = torch.exp(_segment_sum(Adt))  # (b, h, c, s, s)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, decay, xdt)

    # The state each chunk leaves behind, from its own inputs only.
    decay_to_end = torch.exp(A_cumsum[..., -1:] - A_cumsum)  # (b, h, c, s)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_to_end, xdt)  # (b, c, h, p, n)

    # Between chunks: carry states forward with the decay of each whole chunk.
    if initial_states is None:
        initial_states = torch.zeros_like(chunk_states[:, :1])
    else:
        initial_states = initial_states.float()[:, None]
    chunk_states = torch.cat([initial_states, chunk_states], dim=1)  # (b, c+1, h, p, n)
    chunk_decay = torch.exp(_segment_sum(F.pad(A_cumsum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, chunk_states)
    states, final_state = states[:, :-1], states[:, -1]  # (b, c, h, p, n), (b, h, p, n)

    # Contribution of the carried-in state to every position of the chunk.
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, states, torch.exp(A_cumsum))
    y = (y_diag + y_off).reshape(batch, -1, nheads, headdim)[:, :seqlen]  # (b, l, h, p)
    if D is not None:
        y = y + x32 * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, final_state) if return_final_states else y


def ssd_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """One decoding step of Mamba2. state: (b, h, p, n) updated in place; x: (b, h, p);
    dt: (b, h); A, D, dt_bias: (h,); B, C: (b, g, n). Returns y (b, h, p)."""
    nheads = x.shape[1]
    ngroups = B.shape[1]
    dt = _time_step(dt, dt_bias, dt_softplus, dt_limit)
    B = B.float().repeat_interleave(nheads // ngroups, dim=1)  # (b, h, n)
    C = C.float().repeat_interleave(nheads // ngroups, dim=1)  # (b, h, n)
    dA = torch.exp(dt * A.float())  # (b, h)
    new_state = state.float() * dA[:, :, None, None] + torch.einsum("bh,bhn,bhp->bhpn", dt, B, x.float())
    state.copy_(new_state)
    y = torch.einsum("bhpn,bhn->bhp", new_state, C)
    if D is not None:
        y = y + x.float() * D.float()[:, None]
    return y.to(x.dtype)
