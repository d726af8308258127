"""Mamba1 mixer (selective scan), weight names and math as in mamba_ssm's `Mamba`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from quamba.models.config import MambaConfig
from quamba.models.kernels import backend_for
from quamba.models.taps import MAMBA1_POINTS, Taps


class Mamba1Mixer(nn.Module):
    """in_proj -> causal conv + SiLU -> x_proj (dt, B, C) -> selective scan gated by z -> out_proj."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        d_inner, d_state, dt_rank = config.d_inner, config.d_state, config.resolved_dt_rank
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = d_inner, d_state, dt_rank, config.d_conv
        self.in_proj = nn.Linear(config.d_model, 2 * d_inner, bias=config.bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, config.d_conv, groups=d_inner,
                                padding=config.d_conv - 1, bias=config.conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, config.d_model, bias=config.bias)
        self.taps = Taps(MAMBA1_POINTS)
        self.use_kernels = True

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
        """mamba_ssm's initialisation of A (S4D-real), D and the dt projection."""
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)  # (d, n)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)
        bound = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def _project_dt(self, dt: torch.Tensor) -> torch.Tensor:
        """dt_proj without its bias, which the scan adds (delta_bias); a quantized dt_proj knows that."""
        if isinstance(self.dt_proj, nn.Linear):
            return F.linear(dt, self.dt_proj.weight)
        return self.dt_proj(dt)

    def forward(self, hidden_states: torch.Tensor, conv_state: torch.Tensor | None = None,
                ssm_state: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states (b, l, d_model) -> (b, l, d_model); fills the states when given."""
        k = backend_for(hidden_states, self.use_kernels)
        tap = self.taps
        seqlen = hidden_states.shape[1]
        xz = tap("in_proj:output", self.in_proj(tap("in_proj:input", hidden_states)))  # (b, l, 2 d_inner)
        x, z = xz.transpose(1, 2).chunk(2, dim=1)  # (b, d_inner, l) each
        if conv_state is not None:
            conv_state.copy_(F.pad(x, (self.d_conv - seqlen, 0)))  # last d_conv inputs
        x = k.causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias)  # (b, d_inner, l)
        x = tap("x_proj:input", x)
        x_dbl = tap("x_proj:output", self.x_proj(x.transpose(1, 2)))  # (b, l, dt_rank + 2 d_state)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = tap("dt_proj:output", self._project_dt(dt).transpose(1, 2))  # (b, d_inner, l)
        A = -torch.exp(self.A_log.float())  # (d_inner, d_state)
        y, last_state = k.selective_scan(
            x, delta, A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z=z,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True, return_last_state=True,
        )  # (b, d_inner, l), (b, d_inner, d_state)
        if not tap.quantizes("ssm_state_act:input"):  # the FP model: Quamba's calibration observes the state
            last_state = last_state.to(hidden_states.dtype)  # as copied into its cache, in the model's dtype
        last_state = tap("ssm_state_act:input", last_state)  # quantized: int8 from the float32 state, as its kernel
        if ssm_state is not None:
            ssm_state.copy_(last_state)
        return self.out_proj(tap("out_proj:input", y.transpose(1, 2)))  # (b, l, d_model)

    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor,
             ssm_state: torch.Tensor) -> torch.Tensor:
        """One token: hidden_states (b, 1, d_model) -> (b, 1, d_model); states updated in place."""
        k = backend_for(hidden_states, self.use_kernels)
        tap = self.taps
        xz = tap("in_proj:output", self.in_proj(tap("in_proj:input", hidden_states[:, 0])))  # (b, 2 d_inner)
        x, z = xz.chunk(2, dim=-1)  # (b, d_inner) each
        x = k.causal_conv1d_update(x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias)
        x = tap("x_proj:input", x)
        x_dbl = tap("x_proj:output", self.x_proj(x))
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = tap("dt_proj:output", self._project_dt(dt))  # (b, d_inner)
        A = -torch.exp(self.A_log.float())
        y = k.selective_state_update(ssm_state, x, delta, A, B, C, self.D.float(), z=z,
                                     dt_bias=self.dt_proj.bias.float(), dt_softplus=True)
        ssm_state.copy_(tap.step("ssm_state_act:input", ssm_state))  # requantized as the step does
        return self.out_proj(tap("out_proj:input", y)).unsqueeze(1)

    def state_shapes(self, batch_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(conv_state, ssm_state) shapes of the decoding cache."""
        return (batch_size, self.d_inner, self.d_conv), (batch_size, self.d_inner, self.d_state)
