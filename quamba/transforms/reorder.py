"""Quamba2's sort-and-cluster reordering of a Mamba2 block's heads and channels of x.

Why: x (the SSM input after conv + SiLU) has a few heads and channels with far larger ranges
than the rest. Quantizing x with one scale per contiguous block of heads and channels only
helps if each block holds similar ranges, so the heads and channels are first permuted into
that order, and the weights are permuted with them so that the block computes exactly the
same function (each head's SSM is independent given its B/C group, and each channel of a head
is independent given the head's dt, B and C).

How, per layer, from the calibrated absmax of x per channel:
1. within each B/C group, sort its heads by their absmax (descending) and cluster the sorted
   values into at most `head_clusters` contiguous clusters (optimal 1-D k-means), so heads
   never leave their group;
2. within each head cluster, sort the head dim p by the cluster's absmax per p (descending;
   one order for all heads of the cluster) and cluster into at most `channel_clusters`;
3. each (head cluster, channel cluster) cell is one quantization group of x.
The permutation touches in_proj's rows of z, x and dt, conv1d's x channels, dt_bias, A_log,
D, the gated norm's weight and out_proj's columns; B and C are left in place. Everything is
deterministic: stable sorts and an exact dynamic program, no random restarts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn

from quamba.errors import ConfigError

REORDER_TAP = "x_conv_out:input"  # the SSM input x, whose ranges drive the order
DEFAULT_HEAD_CLUSTERS = 4
DEFAULT_CHANNEL_CLUSTERS = 4


def cluster_sorted(values: list[float], k: int) -> list[tuple[int, int]]:
    """Split sorted `values` into at most k contiguous [start, end) segments with the least
    total squared deviation from their means (exact 1-D k-means by dynamic programming)."""
    n = len(values)
    k = max(1, min(k, n))
    prefix, prefix_sq = [0.0], [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
        prefix_sq.append(prefix_sq[-1] + v * v)

    def cost(i: int, j: int) -> float:  # squared deviation of values[i:j]
        total = prefix[j] - prefix[i]
        return max(prefix_sq[j] - prefix_sq[i] - total * total / (j - i), 0.0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]  # best[c][j]: values[:j] in c segments
    split = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for c in range(1, k + 1):
        for j in range(c, n + 1):
            for i in range(c - 1, j):  # last segment values[i:j]; first minimum wins ties
                candidate = best[c - 1][i] + cost(i, j)
                if candidate < best[c][j]:
                    best[c][j], split[c][j] = candidate, i
    segments, end = [], n
    for c in range(k, 0, -1):
        start = split[c][end]
        segments.append((start, end))
        end = start
    return segments[::-1]


@dataclass(frozen=True)
class ReorderPlan:
    """One layer's order: new -> old indices, and the cells of the reordered layout."""

    head_order: tuple[int, ...]  # (nheads,): new head h holds old head head_order[h]
    channel_order: tuple[int, ...]  # (d_inner,): new channel c holds old channel channel_order[c]
    head_clusters: tuple[tuple[int, int], ...]  # [start, end) in new head indices, inside one B/C group
    channel_clusters: tuple[tuple[tuple[int, int], ...], ...]  # per head cluster: [start, end) in p

    @property
    def headdim(self) -> int:
        return len(self.channel_order) // len(self.head_order)

    def cells(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """Every ((head start, head end), (p start, p end)) cell, head cluster by head cluster."""
        return [(heads, ps) for heads, clusters in zip(self.head_clusters, self.channel_clusters)
                for ps in clusters]

    def cell_of_channel(self) -> torch.Tensor:
        """(d_inner,) int64: the cell of each channel in the reordered layout."""
        cell = torch.empty(len(self.head_order), self.headdim, dtype=torch.int64)  # (h, p)
        for index, ((h0, h1), (p0, p1)) in enumerate(self.cells()):
            cell[h0:h1, p0:p1] = index
        return cell.reshape(-1)

    def group_absmax(self, absmax: torch.Tensor) -> list[float]:
        """Max of absmax (d_inner,) over each cell, cells laid over absmax's own order."""
        grid = absmax.reshape(len(self.head_order), self.headdim)  # (h, p)
        return [float(grid[h0:h1, p0:p1].max()) for (h0, h1), (p0, p1) in self.cells()]

    def to_record(self) -> dict:
        return {"head_order": list(self.head_order), "channel_order": list(self.channel_order),
                "head_clusters": [list(c) for c in self.head_clusters],
                "channel_clusters": [[list(c) for c in clusters] for clusters in self.channel_clusters]}

    @classmethod
    def from_record(cls, record: dict) -> ReorderPlan:
        return cls(tuple(record["head_order"]), tuple(record["channel_order"]),
                   tuple(tuple(c) for c in record["head_clusters"]),
                   tuple(tuple(tuple(c) for c in clusters) for clusters in record["channel_clusters"]))


def plan_reorder(absmax: torch.Tensor, nheads: int, ngroups: int, head_clusters: int = DEFAULT_HEAD_CLUSTERS,
                 channel_clusters: int = DEFAULT_CHANNEL_CLUSTERS) -> ReorderPlan:
    """The sort-and-cluster order of one layer from x's absmax per channel (d_inner,), old order."""
    grid = absmax.detach().double().cpu().reshape(nheads, -1)  # (h, p)
    headdim = grid.shape[1]
    per_group = nheads // ngroups
    head_range = grid.amax(dim=1)  # (h,)
    head_order: list[int] = []
    head_bounds: list[tuple[int, int]] = []
    for group in range(ngroups):
        first = group * per_group
        order = first + torch.argsort(head_range[first:first + per_group], descending=True, stable=True)
        for start, end in cluster_sorted(head_range[order].tolist(), head_clusters):
            head_bounds.append((first + start, first + end))
        head_order.extend(order.tolist())
    channel_order = [0] * (nheads * headdim)
    channel_bounds = []
    for start, end in head_bounds:
        p_range = grid[head_order[start:end]].amax(dim=0)  # (p,): the cluster's range per channel
        p_order = torch.argsort(p_range, descending=True, stable=True)
        channel_bounds.append(tuple(cluster_sorted(p_range[p_order].tolist(), channel_clusters)))
        for new_head in range(start, end):
            old = head_order[new_head] * headdim + p_order
            channel_order[new_head * headdim:(new_head + 1) * headdim] = old.tolist()
    return ReorderPlan(tuple(head_order), tuple(channel_order), tuple(head_bounds), tuple(channel_bounds))


@torch.no_grad()
def reorder_mixer(mixer: nn.Module, plan: ReorderPlan) -> None:
    """Permute one Mamba2 mixer's weights by `plan` (in place); its output is unchanged.

    Must run before out_proj's Hadamard is fused: the permutation acts on out_proj's raw columns.
    """
    if not isinstance(mixer.out_proj, nn.Linear):
        raise ValueError("reorder_mixer: out_proj is already rotated; reorder before rotate_out_projs")
    d_inner, conv_dim = mixer.d_inner, mixer.conv_dim
    device = mixer.in_proj.weight.device
    channels = torch.tensor(plan.channel_order, dtype=torch.int64, device=device)  # (d_inner,)
    heads = torch.tensor(plan.head_order, dtype=torch.int64, device=device)  # (nheads,)
    bc = torch.arange(d_inner, conv_dim, device=device)  # B and C stay where they are
    rows = torch.cat([channels, d_inner + channels, d_inner + bc, d_inner + conv_dim + heads])  # z, x, BC, dt
    conv_rows = torch.cat([channels, bc])
    for param, index, dim in (
        (mixer.in_proj.weight, rows, 0), (mixer.in_proj.bias, rows, 0),
        (mixer.conv1d.weight, conv_rows, 0), (mixer.conv1d.bias, conv_rows, 0),
        (mixer.dt_bias, heads, 0), (mixer.A_log, heads, 0), (mixer.D, heads, 0),
        (mixer.norm.weight, channels, 0), (mixer.out_proj.weight, channels, 1),
    ):
        if param is not None:
            param.copy_(param.index_select(dim, index))


@torch.no_grad()
def x_channel_absmax(model: nn.Module, batches: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Pass one of Quamba2's calibration: absmax of x per channel (d_inner,) for every layer."""
    absmax: dict[int, torch.Tensor] = {}

    def observe(layer: int, x: torch.Tensor) -> None:
        seen = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()  # (d_inner,)
        absmax[layer] = seen if layer not in absmax else torch.maximum(absmax[layer], seen)

    hooks = [block.mixer.taps.by_key[REORDER_TAP.replace(":", "__")].register_forward_hook(
        lambda _m, _i, out, layer=i: observe(layer, out)) for i, block in enumerate(model.backbone.layers)]
    device = model.lm_head.weight.device
    try:
        for batch in batches:
            model(batch.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return {layer: value.cpu() for layer, value in absmax.items()}


def check_reorderable(config, head_clusters: int, channel_clusters: int) -> None:
    """Reordering is Quamba2's: Mamba2 only, with positive cluster counts."""
    if config.layer != "Mamba2":
        raise ConfigError(f"reorder: head/channel reordering is Quamba2's and needs a Mamba2 model; "
                          f"this one is {config.layer}")
    for key, value in (("head_clusters", head_clusters), ("channel_clusters", channel_clusters)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{key}: must be a positive integer, got {value!r}")


def reorder_record(model: nn.Module, absmax: dict[int, torch.Tensor], head_clusters: int,
                   channel_clusters: int) -> dict:
    """stats.json's `reorder` section: every layer's plan and x's cell absmax before/after."""
    config = model.config
    layers = {}
    for layer, values in sorted(absmax.items()):
        plan = plan_reorder(values, config.nheads, config.ngroups, head_clusters, channel_clusters)
        reordered = values[torch.tensor(plan.channel_order)]
        layers[f"layer_{layer}"] = {
            **plan.to_record(),
            "group_absmax_before": plan.group_absmax(values),  # same cells over the original order
            "group_absmax_after": plan.group_absmax(reordered),
        }
    return {"tap": REORDER_TAP, "head_clusters": head_clusters, "channel_clusters": channel_clusters,
            "observer": "minmax per cell", "layers": layers}


def plan_sha256(record: dict) -> str:
    """A hash of the permutations and cells alone, to match a GPTQ dir with its stats.json."""
    keys = ("head_order", "channel_order", "head_clusters", "channel_clusters")
    plans = {name: {key: layer[key] for key in keys} for name, layer in record["layers"].items()}
    return hashlib.sha256(json.dumps(plans, sort_keys=True).encode()).hexdigest()


def reorder_model(model: nn.Module, record: dict) -> nn.Module:
    """Apply a stats.json `reorder` section to every block (in place; returns the model)."""
    for i, block in enumerate(model.backbone.layers):
        reorder_mixer(block.mixer, ReorderPlan.from_record(record["layers"][f"layer_{i}"]))
    return model


def prepare_model(model: nn.Module, recipe, reorder: dict | None = None) -> nn.Module:
    """The FP model in the basis every stage must share: the residual stream rotated (the recipe's
    rotate_residual, with its Hadamard kind) and/or the heads reordered by a stats.json plan.

    Calibration, GPTQ and assembly all call this with the same recipe, so activation scales,
    GPTQ weights and the stored fp16 weights describe one and the same model. The two commute.
    """
    from quamba.transforms.rotation import rotate_residual

    if recipe.rotate_residual:
        rotate_residual(model, recipe.hadamard)
    if reorder is not None:
        reorder_model(model, reorder)
    return model
