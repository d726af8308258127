"""Calibration's forwards replayed as CUDA graphs, one per window shape that recurs.

With the observers stacked (quamba.stages.calibration_observers) the batch-1 calibration loop on a
GPU is bound by the forward's own launches: each mamba2 block's chunk scan alone costs about 0.6 ms
of host time for 0.07 ms on the GPU (bench/README.md). A window shape that recurs is captured once
and replayed: the same kernels on the same buffers, so the tap tensors equal the eager forward's
bit for bit. The forward hooks run only while capturing; the tensors they kept then are the
graph's own, refilled by every replay, and the observers read them after each replay.

Which shapes: the windows are known before the pass, so the plan is fixed by them alone (the same
windows, the same graphs): shapes seen at least MIN_REPEATS times, most frequent first, while the
captured tokens stay within TOKEN_BUDGET windows of the longest shape (each graph keeps one
window's tap tensors of every block alive: about 1.6 GB for mamba2-2.7b x 512 tokens). A shape's
first window runs eagerly (kernels tuned and compiled for it), its second is captured and
replayed. On by default on CUDA (tests/test_cuda_calibration.py: bit-equal to the eager pass on
an H100, 2026-12-07); `GRAPHS_ON_CUDA = False` runs every forward eagerly. On the CPU every forward
is eager.
"""

from __future__ import annotations

from collections import Counter

import torch

from quamba.models.lm import MambaLMHeadModel
from quamba.stages.calibration_observers import StackedObservers

GRAPHS_ON_CUDA = True
MIN_REPEATS = 4  # a shape seen fewer times costs more to capture than its replays save
TOKEN_BUDGET = 4  # captured tokens at most this many windows of the longest shape


def graphed_shapes(batches: list[torch.Tensor]) -> set[tuple[int, ...]]:
    """The window shapes worth a graph, from the windows alone (module docstring)."""
    counts = Counter(tuple(batch.shape) for batch in batches)
    budget = TOKEN_BUDGET * max(batch.numel() for batch in batches)
    chosen: set[tuple[int, ...]] = set()
    for shape, seen in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        tokens = int(torch.tensor(shape).prod())
        if seen >= MIN_REPEATS and tokens <= budget:
            chosen.add(shape)
            budget -= tokens
    return chosen


class WindowGraphs:
    """Runs calibration windows through `model` with `stack`'s hooks in place: eagerly, or by
    replaying the graph captured for the window's shape (module docstring)."""

    def __init__(self, model: MambaLMHeadModel, stack: StackedObservers, batches: list[torch.Tensor]):
        self.model, self.stack = model, stack
        self.shapes = graphed_shapes(batches)
        self.seen: set[tuple[int, ...]] = set()
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, dict]] = {}
        self.pool = torch.cuda.graph_pool_handle()  # one pool: each replay reads only its input and weights

    def run(self, ids: torch.Tensor) -> None:
        """One window: afterwards `stack.pending` holds its tap tensors, as after an eager forward."""
        shape = tuple(ids.shape)
        if shape not in self.shapes or shape not in self.seen:
            self.seen.add(shape)
            self.model(ids)
            return
        if shape not in self.graphs:
            self.graphs[shape] = self._capture(ids)
        graph, static_ids, kept = self.graphs[shape]
        static_ids.copy_(ids)
        graph.replay()
        self.stack.pending = {point: list(tensors) for point, tensors in kept.items()}

    def _capture(self, ids: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, dict]:
        """The forward of `ids`'s shape recorded (nothing runs); the tap tensors its hooks kept."""
        static_ids = ids.clone()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, pool=self.pool):
            self.model(static_ids)
        kept = self.stack.pending
        self.stack.pending = {point: [] for point in kept}
        return graph, static_ids, kept
