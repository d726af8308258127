"""The `gptq` stage: GPTQ over a whole model, as Quamba runs it: block by block, each block's
inputs produced by the already-quantized blocks before it.

For each block: stream the Hessians of in_proj's input and of out_proj's (Hadamard-rotated)
input over all calibration windows, quantize both weights, then run the block again with the
quantized weights to produce the next block's inputs. GPTQ never reads activation scales,
so its result depends on (model, w_bits, group size, seed, data) and serves every alpha.

The recipe's model transforms decide the model GPTQ sees (rotate_residual and its Hadamard
kind; reorder, whose plan comes from a calibration dir, since out_proj's rotated input depends on
the channel order); gptq.json records them and assembly refuses a GPTQ dir built otherwise.
`lm_head` quantizes lm_head last, from the final norm's outputs of the quantized blocks.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from quamba.data import TokenSamples, load_tokenizer, random_windows
from quamba.determinism import enable_determinism
from quamba.errors import ConfigError
from quamba.formats.gptq_dir import save_gptq
from quamba.io import package_versions, sha256_file
from quamba.models.checkpoint import model_sha256, read_config, resolve_model_dir
from quamba.models.lm import MambaLMHeadModel
from quamba.models.load import load
from quamba.models.quantized import quantized_linears
from quamba.numerics.gptq import GPTQ, QuantizedLinearWeight
from quamba.recipe import Recipe
from quamba.schemes import WEIGHT_GRANULARITY
from quamba.shipped import DEFAULT_CORPUS
from quamba.transforms.reorder import check_reorderable, plan_sha256, prepare_model
from quamba.transforms.rotation import check_widths, rotate_out_projs

ROUNDING = "half away from zero (CUDA roundf), on every path"
OPTIONAL_SETTINGS = ("lm_head",)


@dataclass(frozen=True)
class GPTQSettings:
    """Quamba's defaults: 128 windows of 1024 tokens, percdamp 0.01, group size 128, no act-order."""

    w_bits: int = 4
    group_size: int = 128
    percdamp: float = 0.01
    nsamples: int = 128
    seqlen: int = 1024
    seed: int = 0
    act_order: bool = False
    blocksize: int = 128
    batch_size: int = 8
    lm_head: bool = False  # also quantize lm_head (Hessian from the final norm's outputs)

    @property
    def granularity(self) -> str:
        return WEIGHT_GRANULARITY[self.w_bits]

    def record(self) -> dict:
        """gptq.json's settings: the options added later appear only when on."""
        record = {**asdict(self), "granularity": self.granularity}
        for key in OPTIONAL_SETTINGS:
            if not record[key]:
                del record[key]
        return record

    def validate(self) -> None:
        if self.w_bits not in WEIGHT_GRANULARITY:
            raise ConfigError(f"w_bits: {self.w_bits} is not supported; allowed: {sorted(WEIGHT_GRANULARITY)}")
        if not 0 < self.percdamp < 1:
            raise ConfigError(f"percdamp: {self.percdamp} must be in (0, 1)")
        for key in ("group_size", "nsamples", "seqlen", "blocksize", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be positive, got {getattr(self, key)}")


@torch.no_grad()
def gptq_quantize_model(model: MambaLMHeadModel, windows: torch.Tensor, settings: GPTQSettings,
                        hadamard: str = "quamba", progress: bool = True) -> tuple[dict[str, QuantizedLinearWeight], dict[str, dict]]:
    """Quantize in_proj and out_proj of every block (and lm_head with settings.lm_head); returns
    the weights and per-layer logs. `model` must already be in the basis the quantized model
    uses (`quamba.transforms.reorder.prepare_model`); GPTQ works on a copy with out_proj's input rotated,
    and `model` itself is left unchanged."""
    settings.validate()
    model = rotate_out_projs(copy.deepcopy(model), hadamard).eval()
    linears = quantized_linears(model)
    device = model.lm_head.weight.device
    residuals = []  # inputs of the current block, one tensor per batch of windows
    for batch in windows.split(settings.batch_size):
        hidden = model.backbone.embedding(batch.to(device))  # (b, l, d_model)
        residuals.append(hidden.float() if model.config.residual_in_fp32 else hidden)
    results: dict[str, QuantizedLinearWeight] = {}
    logs: dict[str, dict] = {}
    for i, block in enumerate(tqdm(model.backbone.layers, desc="gptq", disable=not progress)):
        names = [f"backbone.layers.{i}.mixer.in_proj", f"backbone.layers.{i}.mixer.out_proj"]
        solvers = {name: GPTQ(linears[name].in_features) for name in names}
        hooks = [linears[name].register_forward_pre_hook(
            lambda _m, args, solver=solvers[name]: solver.add_batch(args[0])) for name in names]
        for residual in residuals:
            block(residual)
        for hook in hooks:
            hook.remove()
        for name in names:
            start = time.perf_counter()
            result = solvers[name].quantize(linears[name].weight.float(), settings.w_bits, settings.granularity,
                                            group_size=settings.group_size, percdamp=settings.percdamp,
                                            blocksize=settings.blocksize, act_order=settings.act_order)
            results[name] = result
            linears[name].weight.copy_(result.dequantize().to(linears[name].weight.dtype))
            logs[name] = {"seconds": time.perf_counter() - start, "error": float(result.error)}
        residuals = [block(residual) for residual in residuals]  # next block sees quantized weights
    if settings.lm_head:  # Quamba: after the blocks, on the final norm's outputs
        start = time.perf_counter()
        solver = GPTQ(model.lm_head.in_features)
        for residual in residuals:
            solver.add_batch(model.backbone.norm_f(residual).to(model.lm_head.weight.dtype))
        results["lm_head"] = solver.quantize(model.lm_head.weight.float(), settings.w_bits, settings.granularity,
                                             group_size=settings.group_size, percdamp=settings.percdamp,
                                             blocksize=settings.blocksize, act_order=settings.act_order)
        logs["lm_head"] = {"seconds": time.perf_counter() - start, "error": float(results["lm_head"].error)}
    return results, logs


def _reorder_from_calibration(calib_dir: Path | None, model_dir: Path) -> tuple[dict, dict]:
    """The reorder plan of a calibration dir calibrated on this model with reordering on."""
    from quamba.formats.calibration import read_stats, stats_path

    if calib_dir is None:
        raise ConfigError("reorder: GPTQ of a reordered model needs the calibration dir whose plan it uses "
                          "(calibrated with reorder on)")
    path = stats_path(calib_dir)
    stats = read_stats(path)
    if "reorder" not in stats:
        raise ConfigError(f"calib: {path} has no reorder plan; calibrate with reorder on")
    if stats["model"]["sha256"] != model_sha256(model_dir):
        raise ConfigError(f"calib: {path} was calibrated on another model ({stats['model']['path']}), "
                          f"not {model_dir}")
    return stats["reorder"], {"stats": str(path), "stats_sha256": sha256_file(path),
                              "plan_sha256": plan_sha256(stats["reorder"])}


def gptq_model_dir(model_dir: Path, out_dir: Path, settings: GPTQSettings, recipe: Recipe = Recipe(),
                   data: str | Path | None = None, device: str | None = None, progress: bool = True,
                   calib_dir: Path | None = None) -> dict:
    """`quamba gptq`: validated first, then sequential GPTQ, then the GPTQ dir written atomically.
    `calib_dir`: the calibration whose reorder plan to apply (only with the recipe's reorder)."""
    settings.validate()
    model_dir = resolve_model_dir(model_dir)
    config, _ = read_config(model_dir)
    recipe = recipe.for_model(config.layer)
    check_widths(config, recipe.rotate_residual, recipe.hadamard)
    reorder, reorder_info = None, None
    if recipe.reorder:
        check_reorderable(config, recipe.head_clusters, recipe.channel_clusters)
        reorder, reorder_info = _reorder_from_calibration(calib_dir, model_dir)
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        enable_determinism()  # CPU is deterministic as it is
    tokenizer = load_tokenizer(model_dir)
    windows: TokenSamples = random_windows(data or DEFAULT_CORPUS, tokenizer, settings.nsamples,
                                           settings.seqlen, settings.seed)
    model = prepare_model(load(model_dir, device=device, dtype=torch.float32), recipe, reorder)
    results, logs = gptq_quantize_model(model, windows.stacked(), settings, recipe.hadamard, progress=progress)
    info = {
        "schema_version": 2, "kind": "quamba-gptq",
        "recipe": recipe.record("gptq"),
        "model": {"path": str(model_dir), "sha256": model_sha256(model_dir), "layer": config.layer},
        "settings": settings.record(),
        "data": {"source": windows.source, "sha256": windows.source_sha256,
                 "tokens_sha256": windows.sha256, "selection": windows.selection},
        "hadamard": {"kind": recipe.hadamard, "out_proj_input": True, "residual_stream": recipe.rotate_residual},
        "rounding": ROUNDING,
        "layers": {name: {"error": round(log["error"], 6)} for name, log in logs.items()},
        "versions": package_versions(),
    }
    if reorder_info is not None:
        info["reorder"] = reorder_info
    save_gptq(Path(out_dir), results, info)
    return {"info": info, "seconds": {name: log["seconds"] for name, log in logs.items()}}
