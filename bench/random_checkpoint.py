"""Drawing a random-weight checkpoint: one thread against `default_workers()` threads, in one
process (the normalize step of configs/realsize.yaml draws mamba2-2.7b's 2.7B weights; each
tensor has its own seeded generator, so the threads give the same values).

    python -m bench.random_checkpoint --arch mamba2-2.7b --layers 8
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from quamba.models.random_checkpoint import ARCHITECTURES, default_workers, random_state_dict


def timed(arch: str, layers: int | None, workers: int) -> tuple[float, dict[str, torch.Tensor]]:
    start = time.perf_counter()
    _, state = random_state_dict(arch, n_layer=layers, workers=workers)
    return time.perf_counter() - start, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="mamba2-2.7b")
    parser.add_argument("--layers", type=int, default=4, help="its first N blocks (default 4)")
    args = parser.parse_args()
    workers = default_workers()
    timed(args.arch, 1, workers)  # warm-up: allocator, thread pools
    serial_s, serial = timed(args.arch, args.layers, 1)
    threaded_s, threaded = timed(args.arch, args.layers, workers)
    assert all(torch.equal(serial[k], threaded[k]) for k in serial), "threads changed the weights"
    print(json.dumps({"arch": args.arch, "layers": args.layers, "cores": os.cpu_count(), "workers": workers,
                      "serial_s": round(serial_s, 2), "threaded_s": round(threaded_s, 2),
                      "serial_over_threaded": round(serial_s / threaded_s, 2)}))


if __name__ == "__main__":
    main()
