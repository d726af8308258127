"""Quamba's residual rotation of a model's weights on the CPU (what every assemble job does): the
whole-tensor transform against `rotate_weight_rows` (blocks of rows that stay in the cache), and
row blocks with the butterfly stages stacked (as before 2026-12-04) against the stages written into
two buffers (now), in one process, on a random-weight checkpoint of a real architecture; the rotated
weights must be equal.

    python -m bench.weight_rotation --arch mamba2-2.7b --layers 4 --threads 1 4
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from unittest import mock

import torch

from quamba.models.checkpoint import build_model
from quamba.models.random_checkpoint import ARCHITECTURES, random_state_dict
from quamba.numerics import hadamard
from quamba.transforms import rotation


def whole_tensor(weight: torch.Tensor, kind: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """The baseline: one transform of the whole weight, then one copy into `out`."""
    out = torch.empty_like(weight) if out is None else out
    return out.copy_(hadamard.hadamard_transform(weight, kind))


def rotated(model, whole: bool, stacked: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    """Seconds of rotate_residual on a copy of `model`, and its rotated weights."""
    model = copy.deepcopy(model)
    stages = hadamard.stacked_butterflies if stacked else hadamard._walsh_hadamard
    with mock.patch.object(rotation, "rotate_weight_rows", whole_tensor if whole else hadamard.rotate_weight_rows), \
            mock.patch.object(hadamard, "_walsh_hadamard", stages):
        start = time.perf_counter()
        rotation.rotate_residual(model, "quamba")
        seconds = time.perf_counter() - start
    return seconds, model.state_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="mamba2-2.7b")
    parser.add_argument("--layers", type=int, default=4, help="its first N blocks (default 4)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="torch threads, one row each")
    args = parser.parse_args()
    config, state = random_state_dict(args.arch, n_layer=args.layers)
    model = build_model(config, state, "random")
    for threads in args.threads:
        torch.set_num_threads(threads)
        whole_s, whole = rotated(model, whole=True)
        blocks_s, blocks = rotated(model, whole=False)
        stacked_s, stacked = rotated(model, whole=False, stacked=True)
        assert all(torch.equal(whole[k], blocks[k]) for k in whole), "row blocks changed the rotated weights"
        assert all(torch.equal(stacked[k], blocks[k]) for k in whole), "the two-buffer stages changed the weights"
        print(json.dumps({"arch": args.arch, "layers": args.layers, "threads": threads,
                          "whole_s": round(whole_s, 2), "row_blocks_s": round(blocks_s, 2),
                          "whole_over_row_blocks": round(whole_s / blocks_s, 2),
                          "row_blocks_stacked_stages_s": round(stacked_s, 2),
                          "stacked_over_two_buffer_stages": round(stacked_s / blocks_s, 2)}))


if __name__ == "__main__":
    main()
