"""The architecture of a Mamba1/Mamba2 language model, in the state-spaces (mamba_ssm) vocabulary.

One frozen dataclass is the inside representation; `from_state_spaces` / `from_transformers`
read the two on-disk config formats and reject anything we cannot run, naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from quamba.errors import ConfigError

LAYER_TYPES = ("Mamba1", "Mamba2")


def _dt_limit(value: Any, source: str) -> tuple[float, float]:
    """A (low, high) pair; transformers writes infinity as {"__float__": "Infinity"}."""
    def number(v: Any) -> float:
        if isinstance(v, dict) and "__float__" in v:
            v = v["__float__"]
        return float(v)
    try:
        low, high = (number(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: dt_limit {value!r} is not a pair of numbers") from err
    return low, high


@dataclass(frozen=True)
class MambaConfig:
    """Everything needed to build the LM; field names follow mamba_ssm's config.json."""

    d_model: int
    n_layer: int
    vocab_size: int
    layer: str = "Mamba1"
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # Mamba1 only; None means "auto" = ceil(d_model / 16)
    headdim: int = 64  # Mamba2 only
    ngroups: int = 1  # Mamba2 only
    chunk_size: int = 256  # Mamba2 only
    dt_limit: tuple[float, float] = (0.0, math.inf)  # Mamba2 only
    conv_bias: bool = True
    bias: bool = False
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.layer not in LAYER_TYPES:
            raise ConfigError(f"ssm_cfg.layer: {self.layer!r} is not supported; allowed: {LAYER_TYPES}")
        for key in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand",
                    "headdim", "ngroups", "chunk_size", "pad_vocab_size_multiple"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{key}: must be a positive integer, got {value!r}")
        if self.layer == "Mamba2":
            if self.d_inner % self.headdim:
                raise ConfigError(f"ssm_cfg.headdim: {self.headdim} must divide d_inner = {self.d_inner}")
            if self.nheads % self.ngroups:
                raise ConfigError(f"ssm_cfg.ngroups: {self.ngroups} must divide nheads = {self.nheads}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def resolved_dt_rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank is None else self.dt_rank

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def conv_dim(self) -> int:
        """Channels that pass through conv1d: x for Mamba1; x, B and C for Mamba2."""
        if self.layer == "Mamba1":
            return self.d_inner
        return self.d_inner + 2 * self.ngroups * self.d_state

    # --- state-spaces format -------------------------------------------------------------

    @classmethod
    def from_state_spaces(cls, raw: dict[str, Any], source: str = "config.json") -> MambaConfig:
        """Read mamba_ssm's config.json (d_model, n_layer, ssm_cfg, ...)."""
        for key in ("d_model", "n_layer", "vocab_size"):
            if key not in raw:
                raise ConfigError(f"{source}: missing key {key!r} (state-spaces format needs d_model, n_layer, vocab_size)")
        if raw.get("d_intermediate", 0):
            raise ConfigError(f"{source}: d_intermediate={raw['d_intermediate']} (MLP blocks) is not supported; allowed: 0")
        if raw.get("attn_layer_idx"):
            raise ConfigError(f"{source}: attn_layer_idx (hybrid attention) is not supported; allowed: []")
        if not raw.get("rms_norm", True):
            raise ConfigError(f"{source}: rms_norm=false (LayerNorm) is not supported; allowed: true")
        ssm = dict(raw.get("ssm_cfg") or {})
        layer = ssm.pop("layer", "Mamba1")
        if layer not in LAYER_TYPES:
            raise ConfigError(f"{source}: ssm_cfg.layer={layer!r} is not supported; allowed: {LAYER_TYPES}")
        for key, allowed in (("rmsnorm", True), ("norm_before_gate", False), ("D_has_hdim", False)):
            if ssm.get(key, allowed) != allowed:
                raise ConfigError(f"{source}: ssm_cfg.{key}={ssm[key]!r} is not supported; allowed: {allowed!r}")
        d_inner = raw["d_model"] * ssm.get("expand", 2)
        if ssm.get("d_ssm") not in (None, d_inner):
            raise ConfigError(f"{source}: ssm_cfg.d_ssm={ssm['d_ssm']!r} is not supported; allowed: null or d_inner={d_inner}")
        dt_rank = ssm.get("dt_rank", "auto")
        return cls(
            d_model=raw["d_model"],
            n_layer=raw["n_layer"],
            vocab_size=raw["vocab_size"],
            layer=layer,
            d_state=ssm.get("d_state", 16 if layer == "Mamba1" else 128),
            d_conv=ssm.get("d_conv", 4),
            expand=ssm.get("expand", 2),
            dt_rank=None if dt_rank == "auto" else dt_rank,
            headdim=ssm.get("headdim", 64),
            ngroups=ssm.get("ngroups", 1),
            chunk_size=ssm.get("chunk_size", 256),
            dt_limit=_dt_limit(ssm.get("dt_limit", (0.0, math.inf)), source),
            conv_bias=ssm.get("conv_bias", True),
            bias=ssm.get("bias", False),
            norm_epsilon=raw.get("norm_epsilon", 1e-5),
            residual_in_fp32=raw.get("residual_in_fp32", True),
            fused_add_norm=raw.get("fused_add_norm", True),
            pad_vocab_size_multiple=raw.get("pad_vocab_size_multiple", 8),
            tie_embeddings=raw.get("tie_embeddings", True),
        )

    def to_state_spaces(self) -> dict[str, Any]:
        """The config.json mamba_ssm writes, so our checkpoints load there too."""
        ssm: dict[str, Any] = {"layer": self.layer, "d_state": self.d_state, "d_conv": self.d_conv,
                               "expand": self.expand, "conv_bias": self.conv_bias, "bias": self.bias}
        if self.layer == "Mamba1":
            ssm["dt_rank"] = "auto" if self.dt_rank is None else self.dt_rank
        else:
            ssm.update(headdim=self.headdim, ngroups=self.ngroups, chunk_size=self.chunk_size)
            if self.dt_limit != (0.0, math.inf):
                ssm["dt_limit"] = list(self.dt_limit)
        return {
            "d_model": self.d_model, "d_intermediate": 0, "n_layer": self.n_layer,
            "vocab_size": self.vocab_size, "ssm_cfg": ssm, "attn_layer_idx": [], "attn_cfg": {},
            "rms_norm": True, "norm_epsilon": self.norm_epsilon,
            "residual_in_fp32": self.residual_in_fp32, "fused_add_norm": self.fused_add_norm,
            "pad_vocab_size_multiple": self.pad_vocab_size_multiple,
            "tie_embeddings": self.tie_embeddings,
        }

    # --- transformers format ----------------------------------------------------------------

    @classmethod
    def from_transformers(cls, raw: dict[str, Any], source: str = "config.json") -> MambaConfig:
        """Read transformers' MambaConfig / Mamba2Config (model_type mamba / mamba2)."""
        model_type = raw.get("model_type")
        required = ("hidden_size", "num_hidden_layers", "vocab_size", "state_size")
        for key in required:
            if key not in raw:
                raise ConfigError(f"{source}: missing key {key!r} for model_type {model_type!r}")
        common = dict(
            d_model=raw["hidden_size"], n_layer=raw["num_hidden_layers"], vocab_size=raw["vocab_size"],
            d_state=raw["state_size"], d_conv=raw.get("conv_kernel", 4), expand=raw.get("expand", 2),
            conv_bias=raw.get("use_conv_bias", True), bias=raw.get("use_bias", False),
            norm_epsilon=raw.get("layer_norm_epsilon", 1e-5),
            residual_in_fp32=raw.get("residual_in_fp32", True),
            pad_vocab_size_multiple=1,  # transformers stores the padded size as vocab_size
            tie_embeddings=raw.get("tie_word_embeddings", model_type == "mamba"),
        )
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={raw['hidden_act']!r} is not supported; allowed: 'silu'")
        if model_type == "mamba":
            rank = raw.get("time_step_rank", "auto")
            return cls(layer="Mamba1", dt_rank=None if rank == "auto" else int(rank), **common)
        if model_type == "mamba2":
            config = cls(layer="Mamba2", headdim=raw.get("head_dim", 64), ngroups=raw.get("n_groups", 1),
                         chunk_size=raw.get("chunk_size", 256),
                         dt_limit=_dt_limit(raw.get("time_step_limit", (0.0, math.inf)), source),
                         **common)
            if "num_heads" in raw and raw["num_heads"] != config.nheads:
                raise ConfigError(f"{source}: num_heads={raw['num_heads']} but hidden_size*expand/head_dim = {config.nheads}")
            return config
        raise ConfigError(f"{source}: model_type={model_type!r} is not supported; allowed: 'mamba', 'mamba2'")

    def to_transformers(self) -> dict[str, Any]:
        """Keyword arguments for transformers' MambaConfig / Mamba2Config with this architecture."""
        common = dict(
            hidden_size=self.d_model, num_hidden_layers=self.n_layer, vocab_size=self.padded_vocab_size,
            state_size=self.d_state, conv_kernel=self.d_conv, expand=self.expand,
            use_conv_bias=self.conv_bias, use_bias=self.bias, layer_norm_epsilon=self.norm_epsilon,
            residual_in_fp32=self.residual_in_fp32, tie_word_embeddings=self.tie_embeddings,
            hidden_act="silu",
        )
        if self.layer == "Mamba1":
            return dict(model_type="mamba", time_step_rank=self.resolved_dt_rank, use_mambapy=False,
                        use_associative_scan=False, **common)
        return dict(model_type="mamba2", num_heads=self.nheads, head_dim=self.headdim,
                    n_groups=self.ngroups, chunk_size=self.chunk_size,
                    time_step_limit=tuple(self.dt_limit), time_step_rank=self.resolved_dt_rank, **common)

    def replace(self, **changes: Any) -> MambaConfig:
        return dataclasses.replace(self, **changes)
