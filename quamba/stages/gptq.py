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
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from quamba.data import load_tokenizer, random_windows
from quamba.determinism import enable_determinism
from quamba.errors import ConfigError
from quamba.formats.gptq_dir import GPTQ_INFO, save_gptq
from quamba.io import check_output_dir, package_versions, sha256_file
from quamba.models.checkpoint import model_sha256, require_fp16_dir, resolve_model_dir
from quamba.models.lm import MambaLMHeadModel
from quamba.models.load import load, resolve_device
from quamba.models.quantized import quantized_linears
from quamba.numerics.gptq import GPTQ, QuantizedLinearWeight, rtn
from quamba.numerics.quantizers import HALF_AWAY, HALF_EVEN, per_tensor_w8
from quamba.recipe import Recipe
from quamba.shipped import DEFAULT_CORPUS
from quamba.transforms.reorder import check_reorderable, plan_sha256, prepare_model
from quamba.transforms.rotation import check_widths, rotate_out_projs

log = logging.getLogger(__name__)  # phase timings, into a job's log (quamba.logs.job_log)


@dataclass(frozen=True)
class GPTQSettings:
    """Quamba's defaults: 128 windows of 1024 tokens, percdamp 0.01, group size 128, no act-order.
    How each weight is gridded and rounded comes from the recipe (quantization_grid)."""

    w_bits: int = 4
    group_size: int = 128
    percdamp: float = 0.01
    nsamples: int = 128
    seqlen: int = 1024
    seed: int = 0
    act_order: bool = False  # not Quamba's: columns by decreasing Hessian diagonal
    blocksize: int = 128
    batch_size: int = 8  # windows per forward; the Hessians still add one sequence at a time

    @classmethod
    def from_config(cls, setting: dict, w_bits: int, seed: int) -> GPTQSettings:
        """A study's gptq setting (config.yaml's keys, defaults filled) at one w_bits and seed."""
        return cls(w_bits=w_bits, seed=seed, nsamples=setting["nsamples"], seqlen=setting["seqlen"],
                   group_size=setting["group_size"], percdamp=setting["percdamp"], act_order=setting["act_order"])

    def record(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if isinstance(self.w_bits, bool) or self.w_bits not in (4, 8):
            raise ConfigError(f"w_bits: {self.w_bits!r} is not supported; allowed: [4, 8]")
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or not 0 < self.percdamp < 1:
            raise ConfigError(f"percdamp: {self.percdamp!r} must be a number in (0, 1)")
        for key in ("group_size", "nsamples", "seqlen", "blocksize", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{key}: must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed: must be an integer >= 0, got {self.seed!r}")


@dataclass(frozen=True)
class Grid:
    """How one weight is quantized: bits, granularity, grid, rounding and the solve's dtype."""

    bits: int
    granularity: str
    grid: str
    rounding: str
    dtype: torch.dtype = torch.float32

    def record(self) -> dict:
        return {"bits": self.bits, "granularity": self.granularity, "grid": self.grid, "rounding": self.rounding,
                "dtype": str(self.dtype).removeprefix("torch.")}


def quantization_grid(bits: int, recipe: Recipe, dtype: torch.dtype = torch.float32) -> Grid:
    """The recipe's grid for a weight of `bits`: Quamba runs 8-bit GPTQ in groups (re-rounded per
    tensor at assembly) and int4 on its -8..7 grid, rounding ties to even."""
    rounding = HALF_AWAY if recipe.rounding == "half_away" else HALF_EVEN
    if bits == 8 and recipe.w8_gptq == "per_tensor":
        return Grid(8, "tensor", "symmetric", rounding, dtype)
    return Grid(bits, "group", recipe.int4_grid if bits == 4 else "quamba", rounding, dtype)


def lm_head_grid(settings: GPTQSettings, recipe: Recipe) -> Grid | None:
    """lm_head's grid: Quamba GPTQs it at 4 bits with an fp16 solve on every GPTQ run."""
    if recipe.lm_head_gptq == "none" or not recipe.gptq:
        return None
    bits = 4 if recipe.lm_head_gptq == "quamba" else settings.w_bits
    return quantization_grid(bits, recipe, dtype=torch.float16)


def _solve(solver: GPTQ, weight: torch.Tensor, grid: Grid, settings: GPTQSettings) -> QuantizedLinearWeight:
    return solver.quantize(weight.to(grid.dtype), grid.bits, grid.granularity, group_size=settings.group_size,
                           percdamp=settings.percdamp, blocksize=settings.blocksize, act_order=settings.act_order,
                           grid=grid.grid, rounding=grid.rounding, dtype=grid.dtype)


@torch.no_grad()
def gptq_quantize_model(model: MambaLMHeadModel, windows: torch.Tensor, settings: GPTQSettings,
                        recipe: Recipe = Recipe(), progress: bool = True
                        ) -> tuple[dict[str, QuantizedLinearWeight], dict[str, dict]]:
    """Quantize in_proj and out_proj of every block (and lm_head as the recipe says) as Quamba's
    GPTQ does; returns the weights and per-layer logs. `model` must already be in the basis the
    quantized model uses (`quamba.transforms.reorder.prepare_model`); GPTQ works on a copy with
    out_proj's input rotated, and `model` itself is left unchanged.

    As in Quamba, the blocks pass fp16 buffers: each block's (hidden, residual) pair is stored in
    fp16 and added (in float32 with residual_in_fp32) at the next block's input; each block's
    Hessians come from one pass with its FP weights, then in_proj and out_proj are quantized and
    the block reruns with them to make the next block's inputs.
    """
    settings.validate()
    grid = quantization_grid(settings.w_bits, recipe)
    model = rotate_out_projs(copy.deepcopy(model), recipe.hadamard).eval()
    linears = quantized_linears(model)
    device = model.lm_head.weight.device
    compute = model.lm_head.weight.dtype
    buffers = []  # per batch of windows: (hidden, residual) in fp16, the residual zero at the start
    for batch in windows.split(settings.batch_size):
        hidden = model.backbone.embedding(batch.to(device)).to(torch.float16)  # (b, l, d_model)
        buffers.append((hidden, torch.zeros_like(hidden)))

    def run(block, hidden, residual):
        residual = hidden.float() + residual.float() if model.config.residual_in_fp32 else (hidden + residual).to(compute)
        out = block.mixer(block.norm(residual).to(compute))  # (b, l, d_model)
        return out.to(torch.float16), residual.to(torch.float16)

    results: dict[str, QuantizedLinearWeight] = {}
    logs: dict[str, dict] = {}
    for i, block in enumerate(tqdm(model.backbone.layers, desc="gptq", disable=not progress)):
        names = [f"backbone.layers.{i}.mixer.in_proj", f"backbone.layers.{i}.mixer.out_proj"]
        solvers = {name: GPTQ(linears[name].in_features) for name in names}
        hooks = [linears[name].register_forward_pre_hook(
            lambda _m, args, solver=solvers[name]: solver.add_batch(args[0])) for name in names]
        for hidden, residual in buffers:
            run(block, hidden, residual)
        for hook in hooks:
            hook.remove()
        for name in names:
            start = time.perf_counter()
            results[name] = result = _solve(solvers[name], linears[name].weight, grid, settings)
            linears[name].weight.copy_(result.dequantize().to(torch.float16).to(linears[name].weight.dtype))
            logs[name] = {"seconds": time.perf_counter() - start, "error": float(result.error)}
        buffers = [run(block, hidden, residual) for hidden, residual in buffers]  # quantized weights now
    head = lm_head_grid(settings, recipe)
    if head is not None:  # Quamba: after the blocks, on the final norm of the buffers
        start = time.perf_counter()
        solver = GPTQ(model.lm_head.in_features)
        for hidden, residual in buffers:
            final = hidden.float() + residual.float() if model.config.residual_in_fp32 else hidden + residual
            solver.add_batch(model.backbone.norm_f(final).to(torch.float16))
        results["lm_head"] = _solve(solver, model.lm_head.weight, head, settings)
        logs["lm_head"] = {"seconds": time.perf_counter() - start, "error": float(results["lm_head"].error)}
    return results, logs


def rtn_model(model: MambaLMHeadModel, settings: GPTQSettings, recipe: Recipe) -> dict[str, QuantizedLinearWeight]:
    """Round-to-nearest weights of in_proj and out_proj (the recipe's gptq: false), in Quamba's
    layout: int8 per tensor from the fp16 weight, int4 on the recipe's grid in groups."""
    model = rotate_out_projs(copy.deepcopy(model), recipe.hadamard)
    results = {}
    for name, linear in quantized_linears(model).items():
        weight = linear.weight.detach().to(torch.float16)
        if settings.w_bits == 8:
            q, scale = per_tensor_w8(weight)
            results[name] = QuantizedLinearWeight(q, scale, 8, "tensor", settings.group_size)
        else:
            grid = quantization_grid(4, recipe)
            results[name] = rtn(weight.float(), 4, "group", settings.group_size, grid.grid, grid.rounding)
    return results


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


def check_group_size(config, group_size: int) -> None:
    """Every GPTQ'd weight's input width must split into groups (or be one group): checked at the door."""
    for name, width in (("in_proj and lm_head", config.d_model), ("out_proj", config.d_inner)):
        if width > group_size and width % group_size:
            raise ConfigError(f"group_size: {group_size} does not divide the {width} inputs of {name}; allowed: "
                              f"a divisor of {width} (Quamba: 128), or >= {width} for one group per row")


def gptq_model_dir(model_dir: Path, out_dir: Path, settings: GPTQSettings, recipe: Recipe = Recipe(),
                   data: str | Path | None = None, device: str | None = None, progress: bool = True,
                   calib_dir: Path | None = None, dtype: str | None = None) -> dict:
    """`quamba gptq`: validated first, then sequential GPTQ, then the GPTQ dir written atomically.
    `calib_dir`: the calibration whose reorder plan to apply (only with the recipe's reorder).
    `dtype`: the model's, as calibration loads it (default float16 on CUDA, float32 on the CPU).
    Quamba runs GPTQ on its fp16 model: the rotated weights rounded to fp16 before the solve, the
    blocks' forwards (so the Hessians' inputs) in fp16."""
    settings.validate()
    check_output_dir(Path(out_dir), GPTQ_INFO)
    model_dir = resolve_model_dir(model_dir)
    config = require_fp16_dir(model_dir, "gptq")
    recipe = recipe.for_model(config.layer)
    check_widths(config, recipe.rotate_residual, recipe.hadamard)
    check_group_size(config, settings.group_size)
    reorder, reorder_info = None, None
    if recipe.reorder:
        check_reorderable(config, recipe.head_clusters, recipe.channel_clusters, recipe.reorder_method)
        reorder, reorder_info = _reorder_from_calibration(calib_dir, model_dir)
    if resolve_device(device).type == "cuda":
        enable_determinism()  # CPU is deterministic as it is
    tokenizer = load_tokenizer(model_dir)
    begun = time.perf_counter()
    model = prepare_model(load(model_dir, device=device, dtype=dtype), recipe, reorder)
    model_dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
    log.info("model loaded (%s) and prepared in %.2f s", model_dtype, time.perf_counter() - begun)
    begun = time.perf_counter()
    if not recipe.gptq:  # round-to-nearest: no data, every seed the same weights
        windows, results = None, rtn_model(model, settings, recipe)
        logs = {name: {"seconds": 0.0, "error": 0.0} for name in results}
    else:
        windows = random_windows(data or DEFAULT_CORPUS, tokenizer, settings.nsamples, settings.seqlen, settings.seed)
        results, logs = gptq_quantize_model(model, windows.stacked(), settings, recipe, progress=progress)
    log.info("%s of every layer in %.2f s", "GPTQ" if recipe.gptq else "round-to-nearest", time.perf_counter() - begun)
    info = {
        "schema_version": 2, "kind": "quamba-gptq",
        "recipe": recipe.record("gptq"),
        "model": {"path": str(model_dir), "sha256": model_sha256(model_dir), "layer": config.layer},
        "settings": settings.record(),
        "dtype": model_dtype,  # the model's while GPTQ ran (Quamba: float16)
        "method": "gptq" if recipe.gptq else "rtn",
        "grids": {name: {**(lm_head_grid(settings, recipe) if name == "lm_head" else
                            quantization_grid(settings.w_bits, recipe)).record(),
                         "group_width": result.group_width} for name, result in results.items()},
        "data": None if windows is None else {"source": windows.source, "sha256": windows.source_sha256,
                                              "tokens_sha256": windows.sha256, "selection": windows.selection},
        "hadamard": {"kind": recipe.hadamard, "out_proj_input": True, "residual_stream": recipe.rotate_residual},
        "layers": {name: {"error": round(log["error"], 6)} for name, log in logs.items()},
        "versions": package_versions(),
    }
    if reorder_info is not None:
        info["reorder"] = reorder_info
    save_gptq(Path(out_dir), results, info)
    return {"info": info, "seconds": {name: log["seconds"] for name, log in logs.items()}}
