"""Calibration: run the FP model over token windows with observers on every tap, and return
per-tap statistics for every percentile alpha plus a uniform activation sample per tap.

No quantizer is active while observers run, so one pass answers every alpha: alpha is only
applied downstream, when scales are derived from stats.json.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from quamba.data import load_tokenizer, token_windows
from quamba.errors import ConfigError
from quamba.formats.layout import alpha_key
from quamba.formats.stats import SCHEMA_VERSION, write_calibration
from quamba.io import package_versions
from quamba.models.checkpoint import model_sha256, read_config, resolve_model_dir
from quamba.models.lm import MambaLMHeadModel
from quamba.models.load import load
from quamba.models.taps import Tap, named_taps, tap_layer
from quamba.numerics.hadamard import ALLOWED, hadamard_transform, supported
from quamba.numerics.observers import EMA_SIGMA, Moments, QuambaPercentile, Reservoir, StreamHistogram
from quamba.shipped import DEFAULT_CORPUS
from quamba.transforms.reorder import check_reorderable, prepare_model, reorder_record, x_channel_absmax

QUAMBA_DEFAULT_ALPHA = {"Mamba1": 0.9995, "Mamba2": 0.99999}  # Quamba1 / Quamba2 calibration


@dataclass(frozen=True)
class CalibrationSettings:
    """What a calibration pass observes; validated against the model before any work."""

    num_samples: int = 512
    seq_len: int = 512
    batch_size: int = 1
    seed: int = 0
    alphas: tuple[float, ...] = (0.9995, 0.99999, 1.0)
    activation_layers: tuple[int, ...] = (0, 1, 2)
    activation_samples: int = 10_000
    save_activations: bool = True
    mantissa_bits: int = 6  # stream histogram: 2^6 = 64 bins per octave
    # Model transforms shared with GPTQ and assembly (quamba.transforms.reorder.prepare_model). Both are
    # off by default, and a stats.json records them only when on, so existing files stay valid.
    rotate_residual: bool = False  # calibrate the model with its residual stream Hadamard-rotated
    reorder: bool = False  # Mamba2: Quamba2's head/channel reordering, planned from a first pass
    head_clusters: int = 4  # reorder: clusters of heads per B/C group
    channel_clusters: int = 4  # reorder: clusters of the head dim per head cluster

    def validate(self, n_layer: int) -> None:
        for key in ("num_samples", "seq_len", "batch_size", "activation_samples", "mantissa_bits",
                    "head_clusters", "channel_clusters"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{key}: must be a positive integer, got {value!r}")
        if not self.alphas:
            raise ConfigError("alphas: give at least one percentile alpha in (0, 1]")
        for alpha in self.alphas:
            if not 0.0 < alpha <= 1.0:
                raise ConfigError(f"alphas: {alpha} is outside (0, 1]; 1.0 means no clipping")
        for layer in self.activation_layers if self.save_activations else ():
            if not 0 <= layer < n_layer:
                raise ConfigError(f"activation_layers: layer {layer} does not exist; the model has "
                                  f"layers 0..{n_layer - 1}")



@dataclass
class TapObserver:
    """Everything observed at one tap."""

    tap: Tap
    alphas: tuple[float, ...]
    mantissa_bits: int
    reservoir: Reservoir | None = None
    moments: Moments = field(default_factory=Moments)
    histogram: StreamHistogram = field(init=False)
    percentile: QuambaPercentile | None = field(init=False)
    shape: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.histogram = StreamHistogram(self.mantissa_bits)
        below_one = [a for a in self.alphas if a < 1.0]
        self.percentile = QuambaPercentile(below_one) if self.tap.percentile and below_one else None

    def update(self, x: torch.Tensor) -> None:
        if self.tap.rotated:  # the quantizer sits after the Hadamard rotation Quamba inserts
            x = hadamard_transform(x)
        self.shape = list(x.shape)
        self.moments.update(x)
        self.histogram.update(x)
        if self.percentile is not None:
            self.percentile.update(x)
        if self.reservoir is not None:
            self.reservoir.update(x)

    def summary(self) -> dict:
        m = self.moments
        value_range = m.max - m.min
        per_alpha = {}
        for alpha in self.alphas:
            if self.percentile is not None and alpha < 1.0:
                threshold = min(self.percentile.values[alpha], m.absmax)
            else:  # min/max observer, or alpha = 1.0: no clipping
                threshold = m.absmax
            low, high = self.histogram.quantile_bracket(alpha)
            clipped_min, clipped_max = max(m.min, -threshold), min(m.max, threshold)
            fraction, error = self.histogram.fraction_above(threshold) if threshold < m.absmax else (0.0, 0.0)
            per_alpha[alpha_key(alpha)] = {
                "threshold": threshold,
                "scale": max(threshold, 1e-5 * 127) / 127,  # symmetric int8, Quamba's 1e-5 floor
                "stream_percentile": {"low": min(low, m.absmax), "high": min(high, m.absmax)},
                "clipped_min": clipped_min,
                "clipped_max": clipped_max,
                "clipped_range": clipped_max - clipped_min,
                "range_reduction": 1.0 - (clipped_max - clipped_min) / value_range if value_range > 0 else 0.0,
                "clipped_fraction": fraction,
                "clipped_fraction_error": error,
            }
        return {
            "observer": "percentile" if self.percentile is not None else "minmax",
            "rotated": self.tap.rotated,
            "batch_shape": self.shape,
            "numel": m.numel, "min": m.min, "max": m.max, "absmax": m.absmax, "mean": m.mean, "std": m.std,
            "alphas": per_alpha,
        }


def _tap_seed(seed: int, name: str) -> int:
    """Each tap's reservoir has its own stream of keys, stable across runs and tap sets."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


@torch.no_grad()
def calibrate(model: MambaLMHeadModel, windows: torch.Tensor, settings: CalibrationSettings,
              progress: bool = True) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Observe every tap over windows (num_samples, seq_len) in batches.

    Returns per-tap statistics (stats.json's `taps`) and, for the taps of
    settings.activation_layers when save_activations is on, a uniform sample per tap.
    """
    settings.validate(model.config.n_layer)
    observers: dict[str, TapObserver] = {}
    for name, tap in named_taps(model).items():
        sampled = settings.save_activations and tap_layer(name) in settings.activation_layers
        reservoir = Reservoir(settings.activation_samples, _tap_seed(settings.seed, name)) if sampled else None
        observers[name] = TapObserver(tap, tuple(settings.alphas), settings.mantissa_bits, reservoir)
    hooks = [obs.tap.register_forward_hook(lambda _m, _i, out, obs=obs: obs.update(out))
             for obs in observers.values()]
    device = model.lm_head.weight.device
    try:
        model.eval()
        for batch in tqdm(windows.split(settings.batch_size), desc="calibrate", disable=not progress):
            model(batch.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    stats = {name: obs.summary() for name, obs in observers.items()}
    samples = {name: obs.reservoir.sample().numpy() for name, obs in observers.items()
               if obs.reservoir is not None}
    return stats, samples


def calibrate_model_dir(model_dir: Path, out_dir: Path, settings: CalibrationSettings,
                        data: str | Path | None = None, device: str | None = None,
                        progress: bool = True) -> dict:
    """`quamba calibrate`: everything checked first, then one pass, then stats.json and
    activations.npz written atomically into out_dir. Returns the stats document."""
    model_dir = resolve_model_dir(model_dir)
    config, _ = read_config(model_dir)  # fails on a dir without config before any work
    settings.validate(config.n_layer)
    tokenizer = load_tokenizer(model_dir)
    if len(tokenizer) > config.padded_vocab_size:
        raise ConfigError(f"{model_dir}: its tokenizer has {len(tokenizer)} tokens but the model's "
                          f"vocabulary has {config.padded_vocab_size}; pair the model with its own tokenizer")
    if settings.rotate_residual and not supported(config.d_model):
        raise ConfigError(f"rotate_residual: d_model={config.d_model} has no Hadamard rotation; supported: {ALLOWED}")
    if settings.reorder:
        check_reorderable(config, settings.head_clusters, settings.channel_clusters)
    windows = token_windows(data or DEFAULT_CORPUS, tokenizer, settings.num_samples, settings.seq_len,
                            settings.seed)
    model = prepare_model(load(model_dir, device=device), rotate_residual=settings.rotate_residual)
    reorder = None
    if settings.reorder:  # Quamba2: a first pass for x's ranges, then observers on the reordered model
        absmax = x_channel_absmax(model, windows.ids, settings.batch_size)
        reorder = reorder_record(model, absmax, settings.head_clusters, settings.channel_clusters)
        prepare_model(model, reorder=reorder)
    stats, samples = calibrate(model, windows.ids, settings, progress=progress)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "kind": "quamba-calibration-stats",
        "model": {"path": str(model_dir), "sha256": model_sha256(model_dir),
                  "layer": config.layer, "n_layer": config.n_layer},
        "data": {"source": windows.source, "sha256": windows.source_sha256,
                 "tokens_sha256": windows.sha256, "selection": windows.selection},
        "seed": settings.seed, "num_samples": settings.num_samples, "seq_len": settings.seq_len,
        "batch_size": settings.batch_size, "alphas": sorted(settings.alphas),
        "default_alpha": QUAMBA_DEFAULT_ALPHA[config.layer],
        "bins_per_octave": 2 ** settings.mantissa_bits, "ema_sigma": EMA_SIGMA,
        "activation_layers": sorted(settings.activation_layers) if settings.save_activations else [],
        "activation_samples": settings.activation_samples,
        "versions": package_versions(),
        "taps": stats,
    }
    if settings.rotate_residual:
        doc["rotate_residual"] = True
    if reorder is not None:
        doc["reorder"] = reorder
    write_calibration(Path(out_dir), doc, samples if settings.save_activations else None)
    return doc
