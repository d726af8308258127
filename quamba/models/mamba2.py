"""Mamba2 mixer (SSD), weight names and math as in mamba_ssm's `Mamba2`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from quamba.models import ops
from quamba.models.config import MambaConfig
from quamba.models.kernels import backend_for
from quamba.models.taps import MAMBA2_POINTS, Taps


class GatedRMSNorm(nn.Module):
    """RMSNorm of y * silu(z) per group of d_inner / ngroups channels (norm_before_gate=False)."""

    def __init__(self, width: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return ops.gated_rms_norm(y, z, self.weight, self.eps, self.group_size)


class Mamba2Mixer(nn.Module):
    """in_proj (z, xBC, dt) -> causal conv + SiLU on xBC -> chunked SSD scan -> gated norm -> out_proj."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.d_inner, self.d_state, self.d_conv = config.d_inner, config.d_state, config.d_conv
        self.nheads, self.headdim, self.ngroups = config.nheads, config.headdim, config.ngroups
        self.chunk_size, self.dt_limit = config.chunk_size, tuple(config.dt_limit)
        self.conv_dim = config.conv_dim
        d_in_proj = self.d_inner + self.conv_dim + self.nheads  # z, xBC, dt
        self.in_proj = nn.Linear(config.d_model, d_in_proj, bias=config.bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.d_conv, groups=self.conv_dim,
                                padding=config.d_conv - 1, bias=config.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.ngroups, config.norm_epsilon)
        self.out_proj = nn.Linear(self.d_inner, config.d_model, bias=config.bias)
        self.taps = Taps(MAMBA2_POINTS)
        self.use_kernels = True

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 1e-1,
                             A_init_range: tuple[float, float] = (1.0, 16.0)) -> None:
        """mamba_ssm's initialisation of A, D and dt_bias."""
        self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(*A_init_range)))
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def _split_xbc(self, xBC: torch.Tensor, stage: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split conv channels into x, B, C and pass each through its tap (stage: in / out)."""
        group_width = self.ngroups * self.d_state
        x, B, C = xBC.split([self.d_inner, group_width, group_width], dim=-1)
        return (self.taps(f"x_conv_{stage}:input", x), self.taps(f"B_conv_{stage}:input", B),
                self.taps(f"C_conv_{stage}:input", C))

    def forward(self, hidden_states: torch.Tensor, conv_state: torch.Tensor | None = None,
                ssm_state: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states (b, l, d_model) -> (b, l, d_model); fills the states when given."""
        k = backend_for(hidden_states, self.use_kernels)
        tap = self.taps
        batch, seqlen, _ = hidden_states.shape
        zxbcdt = self.in_proj(tap("in_proj:input", hidden_states))  # (b, l, d_in_proj)
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        z, dt = tap("z_act:input", z), tap("dt_act:input", dt)
        xBC = torch.cat(self._split_xbc(xBC, "in"), dim=-1).transpose(1, 2)  # (b, conv_dim, l)
        if conv_state is not None:
            conv_state.copy_(F.pad(xBC, (self.d_conv - seqlen, 0)))  # last d_conv inputs
        xBC = k.causal_conv1d(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias).transpose(1, 2)
        x, B, C = self._split_xbc(xBC, "out")  # (b, l, d_inner), (b, l, g * n), (b, l, g * n)
        A = -torch.exp(self.A_log.float())  # (h,)
        y, final_state = k.ssd_chunk_scan(
            x.reshape(batch, seqlen, self.nheads, self.headdim), dt, A,
            B.reshape(batch, seqlen, self.ngroups, self.d_state),
            C.reshape(batch, seqlen, self.ngroups, self.d_state),
            self.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
            dt_limit=self.dt_limit, return_final_states=True,
        )  # (b, l, h, p), (b, h, p, n)
        final_state = tap("ssm_state_act:input", final_state)
        if ssm_state is not None:
            ssm_state.copy_(final_state)
        y = self.norm(y.reshape(batch, seqlen, self.d_inner), z)  # (b, l, d_inner)
        return self.out_proj(tap("out_proj:input", y))

    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor,
             ssm_state: torch.Tensor) -> torch.Tensor:
        """One token: hidden_states (b, 1, d_model) -> (b, 1, d_model); states updated in place."""
        k = backend_for(hidden_states, self.use_kernels)
        tap = self.taps
        batch = hidden_states.shape[0]
        zxbcdt = self.in_proj(tap("in_proj:input", hidden_states[:, 0]))  # (b, d_in_proj)
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        z, dt = tap("z_act:input", z), tap("dt_act:input", dt)
        xBC = torch.cat(self._split_xbc(xBC, "in"), dim=-1)  # (b, conv_dim)
        xBC = k.causal_conv1d_update(xBC, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias)
        x, B, C = self._split_xbc(xBC, "out")
        A = -torch.exp(self.A_log.float())
        y = k.ssd_state_update(
            ssm_state, x.reshape(batch, self.nheads, self.headdim), dt, A,
            B.reshape(batch, self.ngroups, self.d_state), C.reshape(batch, self.ngroups, self.d_state),
            D=self.D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit,
        )  # (b, h, p)
        ssm_state.copy_(tap.step("ssm_state_act:input", ssm_state))  # requantized as the step does
        y = self.norm(y.reshape(batch, self.d_inner), z)
        return self.out_proj(tap("out_proj:input", y)).unsqueeze(1)

    def state_shapes(self, batch_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(conv_state, ssm_state) shapes of the decoding cache."""
        return ((batch_size, self.conv_dim, self.d_conv),
                (batch_size, self.nheads, self.headdim, self.d_state))
