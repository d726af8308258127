"""The Hadamard rotation of out_proj's input, eager stages against the compiled ones, in one process.

    python -m bench.hadamard --device cuda            # mamba2-2.7b's width (5120 = 40 x 128)
    python -m bench.hadamard --device cuda --width 1536 --shapes 1 2048

Each shape is timed as the median of many calls (CUDA events around a loop); the ratio is eager /
compiled (`hadamard.FUSE_ON_CUDA`, off by default until tests/test_cuda_quant.py's bit-equality
test has run on a GPU).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from quamba.numerics import hadamard
from quamba.numerics.hadamard import hadamard_transform


def per_call_seconds(x: torch.Tensor, fused: bool, calls: int, rounds: int) -> float:
    hadamard.FUSE_ON_CUDA = fused
    for _ in range(3):  # compile, warm the allocator
        hadamard_transform(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            hadamard_transform(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--width", type=int, default=5120)
    parser.add_argument("--shapes", type=int, nargs="+", default=[1, 8192], help="rows (1: decode, 16 x 512: prefill)")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.device != "cuda" or not torch.cuda.is_available():
        raise SystemExit("bench.hadamard measures the CUDA paths: run it on a GPU")
    rows = []
    for n_rows in args.shapes:
        x = torch.randn(n_rows, args.width, device="cuda").half()
        eager = per_call_seconds(x, False, args.calls, args.rounds)
        fused = per_call_seconds(x, True, args.calls, args.rounds)
        rows.append({"rows": n_rows, "width": args.width, "eager_us": eager * 1e6, "compiled_us": fused * 1e6,
                     "eager_over_compiled": eager / fused})
    hadamard.FUSE_ON_CUDA = False
    print(f"device {torch.cuda.get_device_name()}; fp16 input, width {args.width}")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
