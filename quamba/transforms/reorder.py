"""Quamba2's sort-and-cluster reordering of a Mamba2 block's heads and channels of x, and the
grouped scales that come with it.

Why: x (the SSM input after conv + SiLU) has a few heads and channels with far larger ranges
than the rest. Quantizing x with one scale per block of heads and channels only helps if each
block holds similar ranges, so heads and channels are first permuted into that order, and the
weights are permuted with them so that the block computes exactly the same function (each
head's SSM is independent given its B/C group, and each channel of a head is independent given
the head's dt, B and C).

`reorder_method: quamba` (the default; QUAMBA.md section 4), per layer, from the max over
calibration samples of each sample's mean |x| per channel:
1. each head's channels sorted ascending (its own order), each sorted profile divided by its
   L2 norm;
2. per B/C (SSD) group, Ward agglomerative clustering of the group's head profiles into
   `head_clusters` clusters (scikit-learn); the heads ordered by cluster label (np.argsort of
   the labels, as Quamba), so heads never leave their group;
3. per head cluster, KMeans of the sorted channel positions into `channel_clusters` clusters,
   initialized at the positions 0, p/k, 2p/k, ... (Quamba: 0, 16, 32, 48 at headdim 64); the
   sizes are the label counts. Each position is a vector over the heads at the cluster's rows
   *in the original head order*, as Quamba's code slices its unreordered array (a quirk: the
   rows are not the cluster's member heads unless labels happen to be sorted);
   `reorder_method: quamba_members` clusters on the member heads' profiles instead.
`reorder_method: absmax_kmeans1d` (an earlier design of this project, a departure): heads sorted
by their absmax (descending, stable) and cut by exact 1-D k-means, one channel order per head
cluster from the cluster's absmax per channel, cut the same way.

Each (head cluster, channel cluster) cell is one quantization group of x; B and C get one scale
per SSD group, the final SSM state one per (cell, state index): Quamba2's grouped min/max
calibration. The permutation touches in_proj's rows of z, x and dt, conv1d's x channels,
dt_bias, A_log, D, the gated norm's weight and out_proj's columns; B and C are left in place.
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


def plan_absmax_kmeans1d(absmax: torch.Tensor, nheads: int, ngroups: int, head_clusters: int = DEFAULT_HEAD_CLUSTERS,
                         channel_clusters: int = DEFAULT_CHANNEL_CLUSTERS) -> ReorderPlan:
    """`reorder_method: absmax_kmeans1d`: the order of one layer from x's absmax per channel
    (d_inner,), old order; heads sorted by absmax and cut by 1-D k-means, one channel order per
    head cluster."""
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


def _bounds(sizes: list[int], offset: int = 0) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of the given sizes, empty ones dropped."""
    bounds, start = [], offset
    for size in sizes:
        if size:
            bounds.append((start, start + size))
        start += size
    return bounds


def plan_quamba(mean_abs: torch.Tensor, nheads: int, ngroups: int, head_clusters: int = DEFAULT_HEAD_CLUSTERS,
                channel_clusters: int = DEFAULT_CHANNEL_CLUSTERS, layer: str = "layer",
                members: bool = False) -> ReorderPlan:
    """`reorder_method: quamba`: Quamba2's order of one layer from x's per-channel statistic
    (d_inner,), old order (the max over samples of each sample's mean |x|; float32). The channel
    clustering of a head cluster reads the profiles at its rows of the original head order, as
    Quamba's code does; `members` (reorder_method: quamba_members) reads its member heads'."""
    import numpy as np
    from sklearn.cluster import AgglomerativeClustering, KMeans

    per_group = nheads // ngroups
    profile = mean_abs.detach().float().cpu().reshape(ngroups, per_group, -1)  # (g, heads per group, p)
    headdim = profile.shape[-1]
    channel_sort = torch.argsort(profile, dim=-1)  # ascending, each head its own order (Quamba: not stable)
    sorted_profile = profile.gather(-1, channel_sort)
    normalized = (sorted_profile / sorted_profile.norm(dim=-1, keepdim=True)).numpy()  # (g, heads, p)
    head_order: list[int] = []
    head_bounds: list[tuple[int, int]] = []
    channel_bounds: list[tuple[tuple[int, int], ...]] = []
    channel_order: list[int] = []
    for group in range(ngroups):
        labels = AgglomerativeClustering(n_clusters=head_clusters, linkage="ward").fit(normalized[group]).labels_
        order = np.argsort(labels)  # Quamba's: numpy's default sort, cluster label order 0..k-1
        first = group * per_group
        sizes = np.bincount(labels, minlength=head_clusters).tolist()
        for start, end in _bounds(sizes, first):
            heads = order[start - first:end - first] if members else np.arange(start - first, end - first)
            points = normalized[group][heads].T  # (p, the heads read): one point per sorted position
            init = points[[i * headdim // channel_clusters for i in range(channel_clusters)]]
            channel_labels = KMeans(n_clusters=channel_clusters, init=init, n_init=1).fit(points).labels_
            if np.any(np.diff(channel_labels) < 0):
                raise ConfigError(f"reorder: {layer}, SSD group {group}: the channel clusters of heads "
                                  f"{sorted((first + heads).tolist())} are not contiguous in the sorted order "
                                  f"(Quamba asserts this too); try reorder_method: absmax_kmeans1d or fewer "
                                  f"channel_clusters")
            head_bounds.append((start, end))
            channel_bounds.append(tuple(_bounds(np.bincount(channel_labels, minlength=channel_clusters).tolist())))
        for old in (first + order).tolist():
            head_order.append(old)
            channel_order.extend((old * headdim + channel_sort[group, old - first]).tolist())
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


GROUPED_TAPS = ("x_conv_out:input", "B_conv_out:input", "C_conv_out:input", "ssm_state_act:input")


@dataclass(frozen=True)
class ReorderStatistics:
    """Pass one of Quamba2's calibration for one layer, in the model's original order."""

    mean_abs: torch.Tensor  # (d_inner,): max over samples of the sample's mean |x| per channel (the order's statistic)
    x_absmax: torch.Tensor  # (d_inner,): absmax of x per channel
    B_absmax: torch.Tensor  # (ngroups d_state,) per channel of B after the conv
    C_absmax: torch.Tensor  # (ngroups d_state,)
    state_absmax: torch.Tensor  # (nheads, headdim, d_state): final SSM state, over the batch


@torch.no_grad()
def reorder_statistics(model: nn.Module, batches: list[torch.Tensor]) -> dict[int, ReorderStatistics]:
    """Pass one of Quamba2's calibration over `batches`: per layer, the order's statistic and the
    per-channel absmax from which the grouped min/max scales are cut once the cells are known."""
    seen: dict[tuple[int, str], torch.Tensor] = {}

    def keep(key: tuple[int, str], value: torch.Tensor) -> None:
        seen[key] = value if key not in seen else torch.maximum(seen[key], value)

    def observe(layer: int, point: str, out: torch.Tensor) -> None:
        a = out.detach().abs()
        if point == "ssm_state_act:input":  # (b, h, p, n)
            keep((layer, point), a.amax(dim=0).float())
            return
        keep((layer, point), a.reshape(-1, a.shape[-1]).amax(dim=0).float())  # (channels,)
        if point == REORDER_TAP:  # Quamba: the mean over each sample's tokens in the tensor's dtype, then float
            keep((layer, "mean_abs"), a.mean(dim=1).float().amax(dim=0))

    hooks = [block.mixer.taps.by_key[point.replace(":", "__")].register_forward_hook(
        lambda _m, _i, out, layer=i, point=point: observe(layer, point, out))
        for i, block in enumerate(model.backbone.layers) for point in GROUPED_TAPS]
    device = model.lm_head.weight.device
    try:
        for batch in batches:
            model(batch.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return {layer: ReorderStatistics(*(seen[(layer, key)].cpu() for key in ("mean_abs", *GROUPED_TAPS)))
            for layer in range(len(model.backbone.layers))}


def check_reorderable(config, head_clusters: int, channel_clusters: int, method: str = "quamba") -> None:
    """Reordering is Quamba2's: Mamba2 only, with cluster counts its clustering can make."""
    if config.layer != "Mamba2":
        raise ConfigError(f"reorder: head/channel reordering is Quamba2's and needs a Mamba2 model; "
                          f"this one is {config.layer}")
    for key, value in (("head_clusters", head_clusters), ("channel_clusters", channel_clusters)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{key}: must be a positive integer, got {value!r}")
    if method == "quamba":  # Ward and KMeans need at least as many points as clusters
        per_group = config.nheads // config.ngroups
        if head_clusters > per_group:
            raise ConfigError(f"recipe.head_clusters: {head_clusters} head clusters, but this model has "
                              f"{per_group} heads per SSD group; allowed: 1..{per_group}")
        if channel_clusters > config.headdim:
            raise ConfigError(f"recipe.channel_clusters: {channel_clusters} channel clusters, but this model's "
                              f"headdim is {config.headdim}; allowed: 1..{config.headdim}")


def _group_max(values: torch.Tensor, groups: int) -> list[float]:
    return values.reshape(groups, -1).amax(dim=1).tolist()


def reorder_record(model: nn.Module, statistics: dict[int, ReorderStatistics], head_clusters: int,
                   channel_clusters: int, method: str = "quamba") -> dict:
    """stats.json's `reorder` section: every layer's plan, x's cell absmax before/after, and the
    grouped absmax of B, C (per SSD group) and the final state (per cell and state index)."""
    config = model.config
    layers = {}
    for layer, stats in sorted(statistics.items()):
        if method in ("quamba", "quamba_members"):
            plan = plan_quamba(stats.mean_abs, config.nheads, config.ngroups, head_clusters, channel_clusters,
                               f"layer_{layer}", members=method == "quamba_members")
        else:
            plan = plan_absmax_kmeans1d(stats.x_absmax, config.nheads, config.ngroups, head_clusters,
                                        channel_clusters)
        order = torch.tensor(plan.channel_order)
        state = stats.state_absmax.reshape(config.d_inner, -1)[order].reshape(
            config.nheads, config.headdim, -1)  # (h, p, n), reordered
        layers[f"layer_{layer}"] = {
            **plan.to_record(),
            "group_absmax_before": plan.group_absmax(stats.x_absmax),  # same cells over the original order
            "group_absmax_after": plan.group_absmax(stats.x_absmax[order]),
            "B_group_absmax": _group_max(stats.B_absmax, config.ngroups),
            "C_group_absmax": _group_max(stats.C_absmax, config.ngroups),
            "state_group_absmax": [state[h0:h1, p0:p1].amax(dim=(0, 1)).tolist() for (h0, h1), (p0, p1)
                                   in plan.cells()],  # per cell: (d_state,)
        }
    statistic = ("max over samples of the per-channel mean |x|" if method == "quamba"
                 else "absmax per channel")
    return {"tap": REORDER_TAP, "method": method, "statistic": statistic, "head_clusters": head_clusters,
            "channel_clusters": channel_clusters, "observer": "minmax per group", "layers": layers}


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


def prepare_model(model: nn.Module, recipe, reorder: dict | None = None,
                  discarded: frozenset[str] = frozenset()) -> nn.Module:
    """The FP model in the basis every stage must share: the residual stream rotated (the recipe's
    rotate_residual, with its Hadamard kind) and/or the heads reordered by a stats.json plan.

    Calibration, GPTQ and assembly all call this with the same recipe, so activation scales,
    GPTQ weights and the stored fp16 weights describe one and the same model. The two commute.
    `discarded` (rotate_residual's): weights the caller throws away, left unrotated.
    """
    from quamba.transforms.rotation import rotate_residual

    if recipe.rotate_residual:
        rotate_residual(model, recipe.hadamard, discarded)
    if reorder is not None:
        reorder_model(model, reorder)
    return model
