"""Random-weight checkpoints of the published Mamba architectures, so that real-size studies and
benchmarks run offline: the real shapes and file format, realistic scales, nothing downloaded.

    write_random_checkpoint("mamba2-2.7b", Path("models/mamba2-2.7b-random"))  # 5.4 GB, ~80 s on 2 cores
    write_random_checkpoint("mamba-130m", tmp_dir, n_layer=2)  # the real width, CPU-test sized

The dir is what `quamba.load` and `checkpoint.normalize` read (state-spaces config.json, fp16
model.safetensors, tokenizer, source.json saying "format": "random" and the arguments).

`ARCHITECTURES` holds the published configs of the state-spaces checkpoints (`state-spaces/<name>`):

    name          layer   d_model  n_layer  d_inner  per layer
    mamba-130m    Mamba1      768       24     1536  d_state 16, dt_rank auto = ceil(d_model / 16)
    mamba-370m    Mamba1     1024       48     2048
    mamba-790m    Mamba1     1536       48     3072
    mamba-1.4b    Mamba1     2048       48     4096
    mamba-2.8b    Mamba1     2560       64     5120
    mamba2-130m   Mamba2      768       24     1536  headdim 64 (nheads = d_inner / 64), d_state 128,
    mamba2-370m   Mamba2     1024       48     2048  ngroups 1, chunk_size 256
    mamba2-780m   Mamba2     1536       48     3072
    mamba2-1.3b   Mamba2     2048       48     4096
    mamba2-2.7b   Mamba2     2560       64     5120  80 heads, SSM state 80 x 64 x 128

All: d_conv 4, expand 2, vocab_size 50277, tied embeddings, RMSNorm, residual in fp32, conv bias,
no Linear bias. pad_vocab_size_multiple is 8 for Mamba1 (50280 embedding rows) and 16 for Mamba2
(50288 rows).

How the weights are drawn
-------------------------
Every tensor has its own generator, seeded from (seed, tensor name), so a tensor depends on
neither the generation order nor the depth written: layer 0 of a 2-layer file is layer 0 of the
full model. Tensors are made one at a time (fp32, then kept as fp16 only): no fp32 model is
ever built, and peak memory is about the fp16 file size (5.4 GB for mamba2-2.7b).

1. mamba_ssm's training init: embedding normal(0, 0.02); in_proj, x_proj, out_proj
   kaiming-uniform (bound 1 / sqrt(fan_in)), out_proj further / sqrt(n_layer) of the *published*
   depth (GPT-2's residual scaling; the published depth also when fewer layers are written, so
   that a layer never depends on the depth); conv1d PyTorch's default (weight and bias uniform,
   bound 1 / sqrt(d_conv)); dt_proj.weight uniform(+-dt_rank^-0.5); dt bias = softplus^-1(dt),
   dt log-uniform in [1e-3, 1e-1]; A_log = log(1..d_state) per channel (Mamba1) or
   log(uniform(1, 16)) per head (Mamba2); D = 1; every norm weight 1.
2. What a random init lacks and quantization studies are about: outliers. Trained Mamba models
   have a few activation channels far larger than the rest, which set the int8 scale; Quamba
   clips the SSM input at a percentile (0.9995) because of them. So:
   - heavy-tailed weights: every element of the embedding and of in_proj is multiplied by
     1 + |t| / 4, t Student-t with 4 degrees of freedom (88 % of the gains below 1.5, 1 in 800
     above 3; their RMS is 1.27), as trained weights have heavier tails than a uniform or
     normal init, which matters to weight quantization;
   - residual-stream outlier channels: 1 % of the d_model channels (one seeded set for the whole
     model, as in trained LMs) have their embedding column multiplied by a factor; the block
     inputs (after RMSNorm) inherit them, fading with depth as the residual stream accumulates
     the layers' outputs (trained models keep theirs);
   - SSM-input outlier channels: in each layer 1 % of the d_inner channels of x (seeded per
     layer) have their in_proj row multiplied by a factor, and their conv kernel rescaled to the
     RMS norm of a default kernel (1 / sqrt(3)) so that a small random kernel cannot
     hide the outlier. The SSM input SiLU(conv(x)) then has a few channels 10-30x the others.
   The factor of the k-th outlier channel (k = 1, 2, ...) is max(10, 30 / k): one channel 30x,
   one 15x, the rest 10x. A few dominant channels, not a uniform band, is what puts max |x|
   several times above its 99.95th percentile: 3.5-5.6x over the 24 layers of mamba-130m,
   2.7-6.6x over the 64 of mamba2-2.7b (seed 0, random tokens), against 1.5-1.8x without
   outliers and 2.3-4x (seeds 0-3, layer 0) with factors spread evenly over 10-30.
"""

from __future__ import annotations

import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from quamba.errors import CheckpointError, ConfigError
from quamba.io import _default_mode, atomic_dir, check_output_dir, package_versions, write_json
from quamba.models.checkpoint import record_model_sha256
from quamba.models.config import MambaConfig
from quamba.models.lm import MambaLMHeadModel, stored_dtype

_COMMON = {"vocab_size": 50277, "d_conv": 4, "expand": 2, "tie_embeddings": True, "residual_in_fp32": True}
_MAMBA1 = {"layer": "Mamba1", "d_state": 16, "dt_rank": None, "pad_vocab_size_multiple": 8, **_COMMON}
_MAMBA2 = {"layer": "Mamba2", "d_state": 128, "headdim": 64, "ngroups": 1, "chunk_size": 256,
           "pad_vocab_size_multiple": 16, **_COMMON}
ARCHITECTURES: dict[str, MambaConfig] = {
    "mamba-130m": MambaConfig(d_model=768, n_layer=24, **_MAMBA1),
    "mamba-370m": MambaConfig(d_model=1024, n_layer=48, **_MAMBA1),
    "mamba-790m": MambaConfig(d_model=1536, n_layer=48, **_MAMBA1),
    "mamba-1.4b": MambaConfig(d_model=2048, n_layer=48, **_MAMBA1),
    "mamba-2.8b": MambaConfig(d_model=2560, n_layer=64, **_MAMBA1),
    "mamba2-130m": MambaConfig(d_model=768, n_layer=24, **_MAMBA2),
    "mamba2-370m": MambaConfig(d_model=1024, n_layer=48, **_MAMBA2),
    "mamba2-780m": MambaConfig(d_model=1536, n_layer=48, **_MAMBA2),
    "mamba2-1.3b": MambaConfig(d_model=2048, n_layer=48, **_MAMBA2),
    "mamba2-2.7b": MambaConfig(d_model=2560, n_layer=64, **_MAMBA2),
}

OUTLIER_FRACTION = 0.01  # of the residual channels and, per layer, of the x channels
OUTLIER_FACTORS = (30.0, 10.0)  # k-th outlier channel: max(10, 30 / k)
HEAVY_TAIL = 0.25  # weight gain 1 + HEAVY_TAIL * |t|, t Student-t with 4 degrees of freedom
MAX_WORKERS = 16  # threads drawing tensors at once
CHUNK = 1 << 22  # elements drawn at a time for the heavy tail (16 MB of fp32 per temporary)
DT_RANGE = (1e-3, 1e-1)
DT_FLOOR = 1e-4
A_RANGE_MAMBA2 = (1.0, 16.0)


def architecture(arch: str) -> MambaConfig:
    """The published config of `arch`; a ConfigError naming it and the known names otherwise."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"arch: {arch!r} is not a known architecture; allowed: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def _generator(seed: int, name: str) -> torch.Generator:
    """The generator of one tensor (or outlier set), a function of (seed, name) only. torch's
    CPU generator keeps only 32 bits of its seed, so the pair is hashed into 32 bits."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


def _uniform(shape: tuple[int, ...], bound: float, g: torch.Generator) -> torch.Tensor:
    return torch.empty(shape).uniform_(-bound, bound, generator=g)


def _heavy_tailed(w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """w * (1 + HEAVY_TAIL |t|) in place, t ~ Student-t(4) = normal / sqrt(chi2(4) / 4), where
    chi2(4) = -2 log(U1 U2) for U1, U2 uniform (twice the sum of two standard exponentials).
    Drawn in fixed-size pieces so that the temporaries stay small (the values depend on
    CHUNK, a constant, never on the machine)."""
    for part in w.view(-1).split(CHUNK):  # views into w
        chi2_over_4 = torch.rand(part.shape, generator=g)
        chi2_over_4.mul_(torch.rand(part.shape, generator=g)).log_().mul_(-0.5)
        t = torch.randn(part.shape, generator=g).div_(chi2_over_4.sqrt_())  # U1 U2 = 0 gives t = 0
        part.mul_(t.abs_().mul_(HEAVY_TAIL).add_(1.0))
    return w


def _outliers(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """OUTLIER_FRACTION of n channel indices, drawn from g, and their factors max(10, 30 / k)."""
    count = max(1, round(OUTLIER_FRACTION * n))
    index = torch.randperm(n, generator=g)[:count]  # (count,)
    top, floor = OUTLIER_FACTORS
    factor = (top / torch.arange(1, count + 1, dtype=torch.float32)).clamp(min=floor)  # (count,)
    return index, factor


def _x_outliers(config: MambaConfig, layer: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The outlier channels of x in one layer, shared by its in_proj rows and conv kernels."""
    return _outliers(config.d_inner, _generator(seed, f"outliers.layers.{layer}.x"))


def _inverse_softplus_dt(n: int, g: torch.Generator) -> torch.Tensor:
    """A bias b with softplus(b) = dt, dt log-uniform in DT_RANGE (mamba_ssm's dt init)."""
    low, high = math.log(DT_RANGE[0]), math.log(DT_RANGE[1])
    dt = torch.exp(torch.rand(n, generator=g) * (high - low) + low).clamp(min=DT_FLOOR)  # (n,)
    return dt + torch.log(-torch.expm1(-dt))


def _tensor(name: str, shape: tuple[int, ...], config: MambaConfig, published_depth: int,
            seed: int) -> torch.Tensor:
    """The fp32 values of one state-dict entry."""
    g = _generator(seed, name)
    if name == "backbone.embedding.weight":
        w = _heavy_tailed(torch.empty(shape).normal_(0.0, 0.02, generator=g), g)  # (vocab, d_model)
        index, factor = _outliers(config.d_model, _generator(seed, "outliers.residual"))
        w[:, index] *= factor
        return w
    if name == "backbone.norm_f.weight":
        return torch.ones(shape)  # (d_model,)
    _, _, layer, leaf = name.split(".", 3)  # backbone.layers.{layer}.{leaf}
    if leaf in ("norm.weight", "mixer.norm.weight", "mixer.D"):
        return torch.ones(shape)  # (d_model,), (d_inner,), (d_inner,) or (nheads,)
    if leaf == "mixer.in_proj.weight":
        # rows: Mamba1 [x, z] (2 d_inner); Mamba2 [z, x, B, C, dt] (2 d_inner + 2 ngroups d_state + nheads)
        w = _heavy_tailed(_uniform(shape, shape[1] ** -0.5, g), g)  # (rows, d_model)
        first_x_row = 0 if config.layer == "Mamba1" else config.d_inner
        index, factor = _x_outliers(config, layer, seed)
        w[first_x_row + index] *= factor[:, None]
        return w
    if leaf == "mixer.conv1d.weight":
        w = _uniform(shape, config.d_conv ** -0.5, g)  # (conv_dim, 1, d_conv); x channels first
        index, _ = _x_outliers(config, layer, seed)
        rms_norm = 3 ** -0.5  # of a default kernel: sqrt(d_conv * bound^2 / 3), bound = d_conv^-0.5
        w[index] *= rms_norm / w[index].norm(dim=-1, keepdim=True)
        return w
    if leaf == "mixer.conv1d.bias":
        return _uniform(shape, config.d_conv ** -0.5, g)  # (conv_dim,)
    if leaf == "mixer.x_proj.weight":
        return _uniform(shape, shape[1] ** -0.5, g)  # (dt_rank + 2 d_state, d_inner)
    if leaf == "mixer.out_proj.weight":
        return _uniform(shape, shape[1] ** -0.5, g) / math.sqrt(published_depth)  # (d_model, d_inner)
    if leaf == "mixer.dt_proj.weight":
        return _uniform(shape, config.resolved_dt_rank ** -0.5, g)  # (d_inner, dt_rank)
    if leaf in ("mixer.dt_proj.bias", "mixer.dt_bias"):
        return _inverse_softplus_dt(shape[0], g)  # (d_inner,) Mamba1, (nheads,) Mamba2
    if leaf == "mixer.A_log" and config.layer == "Mamba1":
        A = torch.arange(1, config.d_state + 1, dtype=torch.float32)  # (d_state,): S4D-real
        return torch.log(A).repeat(shape[0], 1)  # (d_inner, d_state)
    if leaf == "mixer.A_log":
        return torch.log(torch.empty(shape).uniform_(*A_RANGE_MAMBA2, generator=g))  # (nheads,)
    raise AssertionError(f"no initialisation for state-dict key {name!r}")


def _checked(arch: str, seed: int, n_layer: int | None) -> MambaConfig:
    """The config to write, after checking the arguments (ConfigError naming the bad one)."""
    config = architecture(arch)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed: must be a non-negative integer, got {seed!r}")
    if n_layer is None:
        return config
    if not isinstance(n_layer, int) or isinstance(n_layer, bool) or n_layer <= 0:
        raise ConfigError(f"n_layer: must be a positive integer, got {n_layer!r}")
    return config.replace(n_layer=n_layer)


def default_workers() -> int:
    """Threads that draw tensors at once: the cores, at most MAX_WORKERS (torch's elementwise ops
    inside each draw are parallel already; its seeded random draws are not)."""
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def random_state_dict(arch: str, seed: int = 0, n_layer: int | None = None,
                      workers: int | None = None) -> tuple[MambaConfig, dict[str, torch.Tensor]]:
    """The config written (its depth n_layer when given) and the fp16 weights, by state-spaces
    key, the tied lm_head left out as in our checkpoints. The tensors are drawn `workers` at a
    time (default: `default_workers()`), the largest first: each has its own generator, so the
    values do not depend on the number of workers. Memory: the fp16 tensors plus, per worker,
    one tensor in fp32 while it is made."""
    config = _checked(arch, seed, n_layer)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in MambaLMHeadModel(config).state_dict().items()}
    del shapes["lm_head.weight"]  # tied to the embedding in every published architecture
    published_depth = ARCHITECTURES[arch].n_layer

    def draw(name: str) -> torch.Tensor:
        return _tensor(name, shapes[name], config, published_depth, seed).to(stored_dtype(name, config.layer))

    largest_first = sorted(shapes, key=lambda name: -math.prod(shapes[name]))
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        drawn = dict(zip(largest_first, pool.map(draw, largest_first)))
    return config, {name: drawn[name] for name in shapes}  # in the state dict's order


def write_random_checkpoint(arch: str, out_dir: Path, seed: int = 0, n_layer: int | None = None,
                            tokenizer: str | Path | None = None) -> Path:
    """Write a state-spaces model dir of `arch` with random weights: config.json, fp16
    model.safetensors, the tokenizer (default: the shipped one) and source.json, as our
    normalized checkpoints have. `n_layer` changes the depth (config.json says the one used).
    The same (arch, seed, n_layer) gives a byte-identical model.safetensors. Atomic: `out_dir`
    appears complete or not at all."""
    from transformers import AutoTokenizer

    from quamba.shipped import DEFAULT_TOKENIZER, shown

    _checked(arch, seed, n_layer)  # bad arguments fail before anything is loaded or written
    check_output_dir(Path(out_dir), "config.json")
    tokenizer = DEFAULT_TOKENIZER if tokenizer is None else tokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer))
    except Exception as err:
        raise CheckpointError(f"{tokenizer}: cannot load a tokenizer from it ({err})") from err
    config, state = random_state_dict(arch, seed, n_layer)
    with atomic_dir(Path(out_dir), "config.json") as tmp:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(_default_mode(directory=False))  # safetensors writes 0600
        del state
        write_json(tmp / "config.json", config.to_state_spaces())
        tok.save_pretrained(tmp)
        write_json(tmp / "source.json", {
            "schema_version": 1, "dtype": "float16", "format": "random",
            "source": "quamba.models.random_checkpoint", "arch": arch, "seed": seed,
            "n_layer": config.n_layer, "published_n_layer": ARCHITECTURES[arch].n_layer,
            "tokenizer": shown(tokenizer), "versions": package_versions(),
        })
        record_model_sha256(tmp)
    return Path(out_dir)
