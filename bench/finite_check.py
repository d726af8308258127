"""The non-finite weight check every model load runs (`check_finite`), on one CPU thread as an
evaluation job has it: `isfinite().all()` per tensor against min and max (`_all_finite`), in one
process, over a random-weight checkpoint of a real architecture in fp16.

    python -m bench.finite_check --arch mamba2-2.7b --layers 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from quamba.models import checkpoint
from quamba.models.random_checkpoint import ARCHITECTURES, random_state_dict


def seconds(check, state: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    assert all(check(tensor) for tensor in state.values())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="mamba2-2.7b")
    parser.add_argument("--layers", type=int, default=8, help="its first N blocks (default 8)")
    args = parser.parse_args()
    _, state = random_state_dict(args.arch, n_layer=args.layers)
    torch.set_num_threads(1)  # an evaluation job's (Snakemake sets OMP_NUM_THREADS to its threads: 1)
    isfinite_s = seconds(lambda t: bool(torch.isfinite(t).all()), state)
    min_max_s = seconds(checkpoint._all_finite, state)
    gigabytes = sum(t.numel() * t.element_size() for t in state.values()) / 1e9
    print(json.dumps({"arch": args.arch, "layers": args.layers, "weights_gb": round(gigabytes, 2),
                      "isfinite_s": round(isfinite_s, 3), "min_max_s": round(min_max_s, 3),
                      "isfinite_over_min_max": round(isfinite_s / min_max_s, 1)}))


if __name__ == "__main__":
    main()
