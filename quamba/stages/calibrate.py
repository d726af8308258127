"""The `calibrate` stage: run the FP model over calibration samples with observers on every tap,
and keep what any percentile alpha >= min_alpha needs (the alpha-free calibration dir).

No quantizer is active while observers run, and alpha is applied only where scales are derived
(the `scales` stage), so one pass serves every alpha: a new alpha never reruns calibration.
The recipe decides the model (rotation, Hadamard kind, reorder), the data (rows or packed
windows, file or seeded order) and each tap's observer, as Quamba's two paths do: Quamba1's
(Mamba1; Mamba2 without reorder) uses its percentile observer at the SSM input x and at the
final SSM state and min/max elsewhere; Quamba2's (Mamba2 with reorder) uses min/max everywhere.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from quamba.data import TokenSamples, calibration_samples, load_tokenizer
from quamba.errors import ConfigError
from quamba.formats.calibration import SCHEMA_VERSION, TapRecord, write_calibration
from quamba.io import package_versions
from quamba.models.checkpoint import model_sha256, read_config, resolve_model_dir
from quamba.models.lm import MambaLMHeadModel
from quamba.models.load import load, resolve_device
from quamba.models.taps import named_taps, tap_layer
from quamba.numerics.observers import ABSMAX_FLOOR, EMA_SIGMA, Reservoir
from quamba.recipe import Recipe
from quamba.shipped import DEFAULT_CORPUS
from quamba.stages import calibration_graphs
from quamba.stages.calibration_observers import StackedObservers, TapObserver
from quamba.transforms.reorder import (
    check_reorderable,
    prepare_model,
    reorder_model,
    reorder_record,
    reorder_statistics,
)
from quamba.transforms.rotation import check_widths

QUAMBA_DEFAULT_ALPHA = 0.9995  # Quamba's hard-coded alpha, both families (its 0.99999 is never used)
SSM_INPUT = {"Mamba1": "x_proj:input", "Mamba2": "x_conv_out:input"}
SSM_STATE = "ssm_state_act:input"

log = logging.getLogger(__name__)  # phase timings, into a job's log (quamba.logs.job_log)


@dataclass(frozen=True)
class CalibrationSettings:
    """How much a calibration pass sees and keeps (Quamba: 512 samples of 512 tokens, batch 1)."""

    num_samples: int = 512
    seq_len: int = 512
    batch_size: int = 1
    seed: int = 0  # seeded orders and the activation sample
    min_alpha: float = 0.999  # the lowest alpha the stored tails answer
    activation_layers: tuple[int, ...] | None = None  # None: the first min(3, n_layer) layers
    activation_samples: int = 10_000
    save_activations: bool = True
    mantissa_bits: int = 6  # stream histogram: 2^6 = 64 bins per octave

    @classmethod
    def from_config(cls, setting: dict, save_activations: bool = True) -> CalibrationSettings:
        """A study's calibration setting (config.yaml's keys, defaults filled) as its job runs it."""
        layers = setting.get("activation_layers")
        return cls(num_samples=setting["samples"], seq_len=setting["seq_len"], batch_size=setting["batch_size"],
                   seed=setting["seed"], min_alpha=setting["min_alpha"],
                   activation_layers=None if layers is None else tuple(layers),
                   activation_samples=setting["activation_samples"], save_activations=save_activations)

    def sampled_layers(self, n_layer: int) -> tuple[int, ...]:
        if not self.save_activations:
            return ()
        return tuple(range(min(3, n_layer))) if self.activation_layers is None else tuple(self.activation_layers)

    def check(self, recipe: Recipe) -> None:
        """Everything that does not depend on the model (the study's door runs this)."""
        for key in ("num_samples", "seq_len", "batch_size", "activation_samples", "mantissa_bits"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{key}: must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed: must be an integer >= 0, got {self.seed!r}")
        if not 0.0 < self.min_alpha <= 1.0:
            raise ConfigError(f"min_alpha: {self.min_alpha} is outside (0, 1]")
        if recipe.calibration_data == "rows" and self.batch_size != 1:
            raise ConfigError(f"batch_size: {self.batch_size} with recipe.calibration_data rows: rows keep their own "
                              f"lengths and run one per forward, as in Quamba; use batch_size 1, or "
                              f"calibration_data packed for full windows that stack")
        if self.activation_layers is not None and any(
                isinstance(layer, bool) or not isinstance(layer, int) or layer < 0 for layer in self.activation_layers):
            raise ConfigError(f"activation_layers: {list(self.activation_layers)}; allowed: layer indices >= 0")

    def validate(self, n_layer: int, recipe: Recipe) -> None:
        self.check(recipe)
        for layer in self.sampled_layers(n_layer):
            if not 0 <= layer < n_layer:
                raise ConfigError(f"activation_layers: layer {layer} does not exist; the model has "
                                  f"layers 0..{n_layer - 1}")


def percentile_points(layer_type: str, recipe: Recipe) -> frozenset[str]:
    """The tap points where Quamba's path for this model uses its percentile observer."""
    if layer_type == "Mamba2" and recipe.reorder:  # Quamba2: min/max everywhere
        return frozenset()
    return frozenset({SSM_INPUT[layer_type], SSM_STATE})


def _tap_seed(seed: int, name: str) -> int:
    """Each tap's reservoir has its own stream of keys, stable across runs and tap sets."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


@torch.no_grad()
def calibrate(model: MambaLMHeadModel, batches: list[torch.Tensor], settings: CalibrationSettings,
              recipe: Recipe = Recipe(), progress: bool = True, stacked: bool = True, graphs: bool | None = None,
              ) -> tuple[dict[str, dict], dict[str, TapRecord], dict[str, np.ndarray]]:
    """Observe every tap over `batches` ((b, length) token ids each; one sample per batch).

    Returns stats.json's `taps`, calibration.safetensors' records, and a uniform activation
    sample per tap of the sampled layers. Non-finite activations fail, naming tap and sample.
    `stacked`: observe each tap point of every block at once after each forward (the same
    results, far fewer kernels: quamba.stages.calibration_observers); False: tap by tap in
    the hooks, the reference. `graphs` (stacked, on CUDA; default `calibration_graphs.GRAPHS_ON_CUDA`):
    windows of a recurring shape replayed as CUDA graphs, the same results.
    """
    config = model.config
    recipe = recipe.for_model(config.layer)
    settings.validate(config.n_layer, recipe)
    percentile = percentile_points(config.layer, recipe)
    sampled = settings.sampled_layers(config.n_layer)
    observers: dict[str, TapObserver] = {}
    for name, tap in named_taps(model).items():
        reservoir = (Reservoir(settings.activation_samples, _tap_seed(settings.seed, name))
                     if tap_layer(name) in sampled else None)
        observers[name] = TapObserver(tap, tap.point in percentile, settings.min_alpha, settings.mantissa_bits,
                                      recipe.hadamard, reservoir)
    stack = StackedObservers(observers) if stacked else None
    if stack is None:
        hooks = [obs.tap.register_forward_hook(lambda _m, _i, out, obs=obs: obs.update(out))
                 for obs in observers.values()]
    else:
        hooks = [obs.tap.register_forward_hook(lambda _m, _i, out, name=name: stack.keep(name, out))
                 for name, obs in observers.items()]
    device = model.lm_head.weight.device
    graphs = calibration_graphs.GRAPHS_ON_CUDA if graphs is None else graphs
    runner = (calibration_graphs.WindowGraphs(model, stack, batches)
              if graphs and stack is not None and device.type == "cuda" else None)
    try:
        model.eval()
        for batch in tqdm(batches, desc="calibrate", disable=not progress):
            if runner is not None:
                runner.run(batch.to(device))
            else:
                model(batch.to(device))
            if stack is not None:
                stack.end_window()
    finally:
        for hook in hooks:
            hook.remove()
    if stack is not None:
        stack.finish()
    for name, obs in observers.items():
        sample = obs.first_nonfinite_sample()
        if sample is not None:
            raise ConfigError(f"calibration: tap {name} saw a non-finite value (NaN or inf) in sample {sample}; "
                              f"check the model's weights and the calibration data")
    taps = {name: obs.summary() for name, obs in observers.items()}
    records = {name: obs.record() for name, obs in observers.items()}
    samples = {name: obs.reservoir.sample().numpy() for name, obs in observers.items() if obs.reservoir is not None}
    return taps, records, samples


def calibrate_model_dir(model_dir: Path, out_dir: Path, settings: CalibrationSettings, recipe: Recipe = Recipe(),
                        data: str | Path | None = None, device: str | None = None, progress: bool = True) -> dict:
    """`quamba calibrate`: everything checked first, then one pass, then stats.json,
    calibration.safetensors and activations.npz written atomically into out_dir. Returns the
    stats document."""
    resolve_device(device)  # a CUDA device asked for must exist
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ConfigError(f"{out_dir}: exists and is not a directory; the output must be a directory")
    model_dir = resolve_model_dir(model_dir)
    config, _ = read_config(model_dir)  # fails on a dir without config before any work
    recipe = recipe.for_model(config.layer)
    settings.validate(config.n_layer, recipe)
    check_widths(config, recipe.rotate_residual, recipe.hadamard)
    if recipe.reorder:
        check_reorderable(config, recipe.head_clusters, recipe.channel_clusters, recipe.reorder_method)
    tokenizer = load_tokenizer(model_dir)
    if len(tokenizer) > config.padded_vocab_size:
        raise ConfigError(f"{model_dir}: its tokenizer has {len(tokenizer)} tokens but the model's "
                          f"vocabulary has {config.padded_vocab_size}; pair the model with its own tokenizer")
    tokens: TokenSamples = calibration_samples(data or DEFAULT_CORPUS, tokenizer, settings.num_samples,
                                               settings.seq_len, settings.seed, recipe.calibration_data,
                                               recipe.calibration_order)
    batches = tokens.batches(settings.batch_size)
    begun = time.perf_counter()
    model = prepare_model(load(model_dir, device=device), recipe)
    log.info("model loaded and prepared in %.2f s", time.perf_counter() - begun)
    begun = time.perf_counter()
    reorder = None
    if recipe.reorder:  # Quamba2: a first pass for the order and the grouped ranges, then observers on the reordered model
        reorder = reorder_record(model, reorder_statistics(model, batches), recipe.head_clusters,
                                 recipe.channel_clusters, recipe.reorder_method)
        reorder_model(model, reorder)
    taps, records, samples = calibrate(model, batches, settings, recipe, progress=progress)
    log.info("calibration pass over %d batches in %.2f s", len(batches), time.perf_counter() - begun)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "kind": "quamba-calibration-stats",
        "recipe": recipe.record("calibrate"),
        "model": {"path": str(model_dir), "sha256": model_sha256(model_dir),
                  "layer": config.layer, "n_layer": config.n_layer},
        "data": {"source": tokens.source, "sha256": tokens.source_sha256,
                 "tokens_sha256": tokens.sha256, "selection": tokens.selection, "tokens": tokens.tokens},
        "seed": settings.seed, "num_samples": settings.num_samples, "seq_len": settings.seq_len,
        "batch_size": settings.batch_size, "min_alpha": settings.min_alpha,
        "default_alpha": QUAMBA_DEFAULT_ALPHA, "bins_per_octave": 2 ** settings.mantissa_bits,
        "ema_sigma": EMA_SIGMA, "absmax_floor": ABSMAX_FLOOR,
        "activation_layers": sorted(settings.sampled_layers(config.n_layer)),
        "activation_samples": settings.activation_samples,
        "versions": package_versions(),
        "taps": taps,
    }
    if reorder is not None:
        doc["reorder"] = reorder
    return write_calibration(Path(out_dir), doc, records, samples if settings.save_activations else None)
