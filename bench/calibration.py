"""Calibration overhead: time of `calibrate` (the alpha-free pass: tails at the percentile taps,
histograms everywhere, activation sampling on) divided by a plain forward over the same tokens,
in one process; and a Quamba-style loop (batch 1, torch.quantile per percentile tap, min/max
elsewhere) for comparison.

    python bench/calibration.py                  # demo-sized random models, CPU
    python bench/calibration.py --size 130m      # real mamba-130m sizes (use a GPU)
    python -m bench.calibration --arch mamba2-2.7b --layers 8 --samples 64 --seq-len 512 --profile
        # a real architecture (random weights, a few blocks); --profile prints where calibrate's time goes

calibrate runs twice: stacked (each tap point of every block observed at once after a forward, the
default) and tap by tap in the hooks (`stacked=False`, the reference); the statistics are the same
(tests/test_calibration.py). On CUDA the stacked path also runs with its windows replayed as CUDA
graphs (`calibrate(..., graphs=True)`, quamba.stages.calibration_graphs), and the tap-by-tap path
with its fused statistics (`observers.FUSE_ON_CUDA`) on and off, whichever the default is.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import quamba
from bench.forward import SIZES
from bench.profiling import profile, random_model_dir
from quamba.models import MambaConfig, MambaLMHeadModel
from quamba.models.random_checkpoint import ARCHITECTURES
from quamba.models.taps import named_taps
from quamba.numerics import observers
from quamba.recipe import Recipe
from quamba.stages.calibrate import CalibrationSettings, calibrate, percentile_points

DEEP = MambaConfig(d_model=64, n_layer=64, vocab_size=4096, layer="Mamba2", d_state=16, headdim=16, chunk_size=16)
VIEW_OPS = frozenset({"aten::view", "aten::_unsafe_view", "aten::detach", "aten::alias", "aten::select",
                      "aten::slice", "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::expand",
                      "aten::t", "aten::transpose", "aten::split", "aten::split_with_sizes", "aten::unbind",
                      "aten::lift_fresh", "aten::as_strided", "aten::reshape"})


class OpCounter(TorchDispatchMode):
    """Counts the aten operators that run (views left out): on a GPU each is about one launch."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func._schema.name not in VIEW_OPS
        return func(*args, **(kwargs or {}))


def ops_per_window(fn_of_batches, batches) -> float:
    """The operators one more window adds: fn over 3 batches against fn over 1, halved."""
    counts = []
    for n in (1, 3):
        with OpCounter() as counter:
            fn_of_batches(batches[:n])
        counts.append(counter.count)
    return (counts[1] - counts[0]) / 2


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def plain_forward(model: MambaLMHeadModel, windows: torch.Tensor, batch_size: int) -> None:
    for batch in windows.split(batch_size):
        model(batch)


@torch.no_grad()
def quamba_style(model: MambaLMHeadModel, windows: torch.Tensor, alpha: float) -> None:
    """What Quamba's observers do per batch of 1: a quantile per percentile tap, abs max elsewhere."""
    state: dict[str, float] = {}
    percentile = percentile_points(model.config.layer, Recipe())

    def observe(name, tap, out):
        if tap.point in percentile:
            t = torch.quantile(out.abs().flatten().float(), alpha).item()
            state[name] = t if name not in state else state[name] + 0.01 * (t - state[name])
        else:
            state[name] = max(state.get(name, 0.0), out.abs().max().item())

    hooks = [tap.register_forward_hook(lambda _m, _i, out, n=n, t=tap: observe(n, t, out))
             for n, tap in named_taps(model).items()]
    try:
        plain_forward(model, windows, 1)
    finally:
        for hook in hooks:
            hook.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["demo", "130m", "deep"], default="demo",
                        help="deep: mamba2-2.7b's 64 blocks at width 64, where dispatch, not arithmetic, sets "
                             "the time (as calibration's batch-1 loop on a GPU)")
    parser.add_argument("--count-ops", action="store_true",
                        help="also count the aten operators (views left out) one window adds, per path")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), help="a real architecture, random weights")
    parser.add_argument("--layers", type=int, default=None, help="with --arch: its first N blocks")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="also print a torch profile of one calibrate")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        if args.arch:
            models = {f"{args.arch} ({args.layers or 'all'} layers)":
                      quamba.load(random_model_dir(args.arch, args.layers, Path(tmp)), device=device, dtype=dtype)}
        else:
            names = {"demo": ["mamba1-demo", "mamba2-demo"], "130m": ["mamba-130m", "mamba2-130m"],
                     "deep": ["mamba2-deep"]}[args.size]
            models = {}
            for name in names:
                models[name] = MambaLMHeadModel(SIZES.get(name) or DEEP)
                models[name].reset_parameters(0)
        for name, model in models.items():
            run(name, model.to(device=device, dtype=dtype).eval(), args)


def run(name: str, model: MambaLMHeadModel, args: argparse.Namespace) -> None:
    config = model.config
    device = model.lm_head.weight.device
    windows = torch.randint(0, config.vocab_size, (args.samples, args.seq_len),
                            generator=torch.Generator().manual_seed(0)).to(device)
    settings = CalibrationSettings(num_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size)
    packed = Recipe(calibration_data="packed")  # full windows stacked in batches
    batches = list(windows.split(args.batch_size))
    # warm-up of every shape timed below (Triton autotunes each new shape on its first call)
    plain_forward(model, windows[: args.batch_size], args.batch_size)
    plain_forward(model, windows[:1], 1)
    calibrate(model, batches[:2], settings, packed, progress=False)
    calibrate(model, batches[:2], settings, packed, progress=False, stacked=False)
    forward_s = timed(lambda: plain_forward(model, windows, args.batch_size))
    calibrate_s = timed(lambda: calibrate(model, batches, settings, packed, progress=False))
    per_tap_s = timed(lambda: calibrate(model, batches, settings, packed, progress=False, stacked=False))
    forward_b1_s = timed(lambda: plain_forward(model, windows, 1))
    quamba_s = timed(lambda: quamba_style(model, windows, 0.9995))
    cuda_rows = {}
    if device.type == "cuda":  # the stacked path with its windows replayed as CUDA graphs (one shape here)
        calibrate(model, batches[:2], settings, packed, progress=False, graphs=True)
        graphed_s = timed(lambda: calibrate(model, batches, settings, packed, progress=False, graphs=True))
        cuda_rows = {"calibrate_graphed_s": round(graphed_s, 3),
                 "graphed_over_forward_batch1": round(graphed_s / forward_b1_s, 2)}
    if device.type == "cuda":  # the tap-by-tap path with the other setting of its fused statistics, warmed up first
        default = observers.FUSE_ON_CUDA
        observers.FUSE_ON_CUDA = not default
        try:
            calibrate(model, batches[:2], settings, packed, progress=False, stacked=False)
            other_s = timed(lambda: calibrate(model, batches, settings, packed, progress=False, stacked=False))
        finally:
            observers.FUSE_ON_CUDA = default
        on_s, off_s = (other_s, per_tap_s) if not default else (per_tap_s, other_s)
        cuda_rows |= {"per_tap_fused_observers_s": round(on_s, 3), "per_tap_eager_observers_s": round(off_s, 3),
                  "per_tap_fused_observers_over_forward_batch1": round(on_s / forward_b1_s, 2)}
    print(json.dumps({
        "model": name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "tokens": args.samples * args.seq_len, "batch_size": args.batch_size,
        "min_alpha": settings.min_alpha, "activation_layers": list(settings.sampled_layers(config.n_layer)),
        "forward_s": round(forward_s, 3), "calibrate_s": round(calibrate_s, 3),
        "calibrate_over_forward": round(calibrate_s / forward_s, 2),
        "forward_batch1_s": round(forward_b1_s, 3), "quamba_style_batch1_s": round(quamba_s, 3),
        "quamba_style_over_forward_batch1": round(quamba_s / forward_b1_s, 2),
        "calibrate_over_forward_batch1": round(calibrate_s / forward_b1_s, 2),
        "calibrate_per_tap_s": round(per_tap_s, 3), "per_tap_over_stacked": round(per_tap_s / calibrate_s, 2),
        "fused_observers_default": observers.FUSE_ON_CUDA, **cuda_rows,
    }), flush=True)
    if args.count_ops:
        ones = list(windows.split(1))
        forward = ops_per_window(lambda b: plain_forward(model, torch.cat(b), 1), ones)
        counts = {f"{label}_observer_ops_per_window": round(ops_per_window(
            lambda b, stacked=stacked: calibrate(model, b, settings, packed, progress=False, stacked=stacked), ones)
            - forward) for label, stacked in (("stacked", True), ("per_tap", False))}
        print(json.dumps({"model": name, "batch_size": 1, "forward_ops_per_window": forward, **counts}), flush=True)
    if args.profile:
        profile(lambda: calibrate(model, batches[:2], settings, packed, progress=False), f"calibrate {name}, 2 batches")


if __name__ == "__main__":
    main()
