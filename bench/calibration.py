"""Calibration overhead: time of `calibrate` (the alpha-free pass: tails at the percentile taps,
histograms everywhere, activation sampling on) divided by a plain forward over the same tokens,
in one process; and a Quamba-style loop (batch 1, torch.quantile per percentile tap, min/max
elsewhere) for comparison.

    python bench/calibration.py                  # demo-sized random models, CPU
    python bench/calibration.py --size 130m      # real mamba-130m sizes (use a GPU)
    python -m bench.calibration --arch mamba2-2.7b --layers 8 --samples 64 --seq-len 512 --profile
        # a real architecture (random weights, a few blocks); --profile prints where calibrate's time goes

On CUDA calibrate also runs with the observers' fused statistics (`observers.FUSE_ON_CUDA`) on
and off, whichever the default is; the statistics are the same (tests/test_cuda_calibration.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import quamba
from bench.forward import SIZES
from bench.profiling import profile, random_model_dir
from quamba.models import MambaLMHeadModel
from quamba.models.random_checkpoint import ARCHITECTURES
from quamba.models.taps import named_taps
from quamba.numerics import observers
from quamba.recipe import Recipe
from quamba.stages.calibrate import CalibrationSettings, calibrate, percentile_points


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
    parser.add_argument("--size", choices=["demo", "130m"], default="demo")
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
            names = ["mamba1-demo", "mamba2-demo"] if args.size == "demo" else ["mamba-130m", "mamba2-130m"]
            models = {}
            for name in names:
                models[name] = MambaLMHeadModel(SIZES[name])
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
    forward_s = timed(lambda: plain_forward(model, windows, args.batch_size))
    calibrate_s = timed(lambda: calibrate(model, batches, settings, packed, progress=False))
    forward_b1_s = timed(lambda: plain_forward(model, windows, 1))
    quamba_s = timed(lambda: quamba_style(model, windows, 0.9995))
    fused = {}
    if device.type == "cuda":  # the other setting of the fused observer statistics, warmed up first
        default = observers.FUSE_ON_CUDA
        observers.FUSE_ON_CUDA = not default
        try:
            calibrate(model, batches[:2], settings, packed, progress=False)
            other_s = timed(lambda: calibrate(model, batches, settings, packed, progress=False))
        finally:
            observers.FUSE_ON_CUDA = default
        on_s, off_s = (other_s, calibrate_s) if not default else (calibrate_s, other_s)
        fused = {"calibrate_fused_observers_s": round(on_s, 3), "calibrate_eager_observers_s": round(off_s, 3),
                 "fused_observers_over_forward": round(on_s / forward_s, 2),
                 "fused_observers_over_forward_batch1": round(on_s / forward_b1_s, 2)}
    print(json.dumps({
        "model": name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "tokens": args.samples * args.seq_len, "batch_size": args.batch_size,
        "min_alpha": settings.min_alpha, "activation_layers": list(settings.sampled_layers(config.n_layer)),
        "forward_s": round(forward_s, 3), "calibrate_s": round(calibrate_s, 3),
        "calibrate_over_forward": round(calibrate_s / forward_s, 2),
        "forward_batch1_s": round(forward_b1_s, 3), "quamba_style_batch1_s": round(quamba_s, 3),
        "quamba_style_over_forward_batch1": round(quamba_s / forward_b1_s, 2),
        "calibrate_over_forward_batch1": round(calibrate_s / forward_b1_s, 2),
        "fused_observers_default": observers.FUSE_ON_CUDA, **fused,
    }), flush=True)
    if args.profile:
        profile(lambda: calibrate(model, batches[:2], settings, packed, progress=False), f"calibrate {name}, 2 batches")


if __name__ == "__main__":
    main()
