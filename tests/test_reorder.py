"""Quamba2's head/channel reordering: the FP model is unchanged; the order follows Quamba's
statistic, Ward clustering of heads and KMeans of channels (reorder_method: quamba) or the
earlier absmax sort with 1-D k-means (absmax_kmeans1d); the grouped ranges of x, B, C and the
state are cut from pass one."""

import itertools

import pytest
import torch
from conftest import random_model

from quamba.errors import ConfigError
from quamba.models import MambaConfig
from quamba.transforms.reorder import (
    ReorderPlan,
    ReorderStatistics,
    check_reorderable,
    cluster_sorted,
    plan_absmax_kmeans1d,
    plan_quamba,
    reorder_mixer,
    reorder_model,
    reorder_record,
    reorder_statistics,
)
from quamba.transforms.rotation import rotate_out_projs, rotate_residual

CONFIG = MambaConfig(d_model=64, n_layer=2, vocab_size=101, layer="Mamba2", d_state=8, headdim=8, ngroups=2,
                     chunk_size=8, bias=True, tie_embeddings=False)  # 16 heads, 8 per B/C group
IDS = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(0))


def random_absmax(seed: int, n: int = CONFIG.d_inner) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)).exp()  # (n,)


def random_statistics(seed: int) -> ReorderStatistics:
    c = CONFIG
    return ReorderStatistics(random_absmax(seed), random_absmax(seed + 100), random_absmax(seed + 200, c.ngroups * c.d_state),
                             random_absmax(seed + 300, c.ngroups * c.d_state),
                             random_absmax(seed + 400, c.d_inner * c.d_state).reshape(c.nheads, c.headdim, c.d_state))


@pytest.mark.parametrize("method", ["quamba", "absmax_kmeans1d"])
def test_reordered_model_computes_the_same_logits_full_and_step_by_step(method):
    model = random_model(CONFIG)
    record = reorder_record(model, {i: random_statistics(i) for i in range(CONFIG.n_layer)}, 3, 2, method)
    with torch.no_grad():
        before = model(IDS).logits
        reorder_model(model, record)
        after = model(IDS).logits
        cache = model.allocate_cache(2)
        stepped = torch.cat([model(IDS[:, :7], cache=cache).logits, model(IDS[:, 7:], cache=cache).logits], 1)
    assert (after - before).abs().max().item() <= 1e-5 * before.abs().max().item()
    assert (stepped - before).abs().max().item() <= 1e-4
    assert record["layers"]["layer_0"]["channel_order"] != list(range(CONFIG.d_inner))


def test_reordering_commutes_with_both_hadamard_rotations():
    model = random_model(CONFIG)
    record = reorder_record(model, reorder_statistics(model, list(IDS.split(1))), 4, 4)
    with torch.no_grad():
        before = model(IDS).logits
        after = rotate_out_projs(reorder_model(rotate_residual(model, "quamba"), record), "quamba")(IDS).logits
    assert (after - before).abs().max().item() <= 2e-3 * before.abs().max().item()  # lm_head's float16 fold


def test_heads_are_sorted_inside_their_group_and_channels_inside_their_cluster():
    nheads, headdim, ngroups = 8, 4, 2
    absmax = torch.ones(nheads, headdim)
    absmax[1] *= 50.0  # group 0: head 1 is the outlier head
    absmax[6] *= 40.0  # group 1: head 6
    absmax[5] *= 3.0
    absmax[:, 2] *= 10.0  # channel p = 2 is large in every head
    plan = plan_absmax_kmeans1d(absmax.reshape(-1), nheads, ngroups, head_clusters=2, channel_clusters=2)
    assert plan.head_order == (1, 0, 2, 3, 6, 5, 4, 7)  # descending, stable, never across groups
    assert plan.head_clusters == ((0, 1), (1, 4), (4, 5), (5, 8))  # each outlier head alone
    for (start, end), clusters in zip(plan.head_clusters, plan.channel_clusters):
        assert clusters == ((0, 1), (1, 4))  # p = 2 first and alone, then the rest
        for new_head in range(start, end):
            old = plan.head_order[new_head]
            assert plan.channel_order[new_head * headdim:(new_head + 1) * headdim] == tuple(
                old * headdim + p for p in (2, 0, 1, 3))


def test_cells_shrink_the_group_ranges_that_contiguous_groups_would_have():
    model = random_model(CONFIG)
    statistics = {0: random_statistics(0), 1: random_statistics(1)}
    statistics[0].x_absmax[5] = 100.0  # one outlier channel spoils its contiguous group before reordering
    layer = reorder_record(model, statistics, 4, 4, "absmax_kmeans1d")["layers"]["layer_0"]
    before, after = layer["group_absmax_before"], layer["group_absmax_after"]
    assert len(before) == len(after) == len(ReorderPlan.from_record(layer).cells())
    assert max(before) == max(after) == 100.0
    assert sorted(after).count(100.0) == 1 and sum(after) < sum(before)


def test_cluster_sorted_is_the_exact_one_dimensional_k_means():
    values = [9.0, 8.5, 5.0, 4.9, 4.8, 1.0, 0.9]

    def cost(segments):
        total = 0.0
        for start, end in segments:
            chunk = values[start:end]
            mean = sum(chunk) / len(chunk)
            total += sum((v - mean) ** 2 for v in chunk)
        return total

    for k in (1, 2, 3, 4):
        segments = cluster_sorted(values, k)
        assert segments[0][0] == 0 and segments[-1][1] == len(values) and len(segments) == k
        brute = min(cost(list(zip((0, *cuts), (*cuts, len(values)))))
                    for cuts in itertools.combinations(range(1, len(values)), k - 1))
        assert abs(cost(segments) - brute) < 1e-12
    assert cluster_sorted(values, 3) == [(0, 2), (2, 5), (5, 7)]
    assert cluster_sorted([1.0, 1.0], 5) == [(0, 1), (1, 2)]  # never more clusters than values


def test_plan_round_trips_through_its_record_and_the_cells_cover_every_channel():
    for plan in (plan_absmax_kmeans1d(random_absmax(3), CONFIG.nheads, CONFIG.ngroups, 3, 3),
                 plan_quamba(random_absmax(3), CONFIG.nheads, CONFIG.ngroups, 3, 3)):
        assert ReorderPlan.from_record(plan.to_record()) == plan
        assert sorted(plan.channel_order) == list(range(CONFIG.d_inner))
        cells = plan.cell_of_channel()
        assert cells.shape == (CONFIG.d_inner,) and set(cells.tolist()) == set(range(len(plan.cells())))


def test_reordering_needs_a_mamba2_model_and_raw_out_proj():
    with pytest.raises(ConfigError, match="reorder: .* needs a Mamba2 model; this one is Mamba1"):
        check_reorderable(MambaConfig(d_model=64, n_layer=1, vocab_size=10), 4, 4)
    with pytest.raises(ConfigError, match="head_clusters: must be a positive integer"):
        check_reorderable(CONFIG, 0, 4)
    model = rotate_out_projs(random_model(CONFIG), "quamba")
    with pytest.raises(ValueError, match="reorder before rotate_out_projs"):
        reorder_mixer(model.backbone.layers[0].mixer, plan_absmax_kmeans1d(random_absmax(0), 16, 2))
    with pytest.raises(ConfigError, match=r"recipe.head_clusters: 9 head clusters, but this model has 8 heads per "
                                          r"SSD group; allowed: 1..8"):
        check_reorderable(CONFIG, 9, 4)
    with pytest.raises(ConfigError, match=r"recipe.channel_clusters: .* headdim is 8; allowed: 1..8"):
        check_reorderable(CONFIG, 4, 9)
    check_reorderable(CONFIG, 9, 9, "absmax_kmeans1d")  # 1-D k-means makes at most as many as there are


def constructed_profiles() -> tuple[torch.Tensor, list[set[int]], list[torch.Tensor]]:
    """x's statistic (d_inner,) of CONFIG's 16 heads (2 SSD groups of 8): in each group the even
    heads share one shape and the odd heads another, each head's channels in its own shuffled order."""
    ramp_a = torch.tensor([1.0, 1.0, 1.0, 1.0, 8.0, 9.0, 10.0, 10.0])  # sorted profiles (headdim 8)
    ramp_b = torch.tensor([1.0, 2.0, 3.0, 3.5, 20.0, 20.0, 21.0, 21.0])
    generator = torch.Generator().manual_seed(0)
    heads, orders = [], []
    for head in range(CONFIG.nheads):
        sorted_values = (ramp_a if head % 2 == 0 else ramp_b) * (1 + 1e-3 * head) + 1e-4 * torch.arange(8)
        order = torch.randperm(8, generator=generator)  # channel p holds the order[p]-th smallest value
        heads.append(sorted_values[order])
        orders.append(torch.argsort(order))  # ascending channel order of this head
    groups = [{0, 2, 4, 6}, {1, 3, 5, 7}, {8, 10, 12, 14}, {9, 11, 13, 15}]
    return torch.cat(heads), groups, orders


def test_quamba_plan_clusters_head_shapes_and_sorts_each_heads_channels_on_a_constructed_case():
    profiles, head_groups, orders = constructed_profiles()
    plan = plan_quamba(profiles, CONFIG.nheads, CONFIG.ngroups, head_clusters=2, channel_clusters=2)
    clusters = [set(plan.head_order[start:end]) for start, end in plan.head_clusters]
    assert sorted(clusters, key=min) == head_groups  # Ward separates the two shapes, never across an SSD group
    assert all(max(c) < 8 for c in clusters[:2]) and all(min(c) >= 8 for c in clusters[2:])
    assert plan.channel_clusters == (((0, 4), (4, 8)),) * 4  # KMeans from positions 0 and 4: the step of both ramps
    for new_head, old in enumerate(plan.head_order):  # each head its own ascending order
        assert plan.channel_order[new_head * 8:(new_head + 1) * 8] == tuple((old * 8 + orders[old]).tolist())
    # the statistic is scale-free per head (each profile is L2-normalized): scaling one head moves nothing
    scaled = profiles.clone()
    scaled[16:24] *= 50.0
    assert plan_quamba(scaled, CONFIG.nheads, CONFIG.ngroups, 2, 2) == plan


def test_quamba_plan_clusters_channels_on_the_rows_quambas_code_slices():
    """Quamba's code runs each head cluster's KMeans on its rows of the *unreordered* profiles
    (`sorted_dim_tensor_np[g][row_start:row_end]`), not on the cluster's member heads; the default
    does so, `quamba_members` reads the members. Both checked against scikit-learn directly."""
    import numpy as np
    from sklearn.cluster import AgglomerativeClustering, KMeans

    nheads, headdim, k = 16, 16, 4
    stat = (torch.rand(nheads * headdim, generator=torch.Generator().manual_seed(3)) ** 4 + 0.01)
    profile = stat.reshape(nheads, headdim).sort(dim=-1).values
    normalized = (profile / profile.norm(dim=-1, keepdim=True)).numpy()
    labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit(normalized).labels_
    order, sizes = np.argsort(labels), np.bincount(labels, minlength=k)
    assert not np.array_equal(order, np.arange(nheads))  # the quirk matters only when labels are unsorted
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))

    def channel_sizes(rows_of):
        cuts = []
        for start, size in zip(starts, sizes):
            points = normalized[rows_of(start, size)].T
            found = KMeans(n_clusters=k, init=points[::headdim // k], n_init=1).fit(points).labels_
            cuts.append(np.bincount(found, minlength=k).tolist())
        return cuts

    plans = {members: plan_quamba(stat, nheads, 1, k, k, members=members) for members in (False, True)}
    got = {members: [[end - start for start, end in cells] for cells in plan.channel_clusters]
           for members, plan in plans.items()}
    assert got[False] == channel_sizes(lambda start, size: np.arange(start, start + size))  # Quamba's rows
    assert got[True] == channel_sizes(lambda start, size: order[start:start + size])  # the members
    assert got[False] != got[True] and plans[False].head_order == plans[True].head_order


def test_pass_one_statistics_are_quambas_mean_abs_and_the_per_channel_absmax():
    model = random_model(CONFIG)
    batches = list(IDS.split(1))
    seen: dict[str, list[torch.Tensor]] = {}
    taps = model.backbone.layers[1].mixer.taps.by_key
    hooks = [taps[key].register_forward_hook(lambda _m, _i, out, key=key: seen.setdefault(key, []).append(out))
             for key in ("x_conv_out__input", "B_conv_out__input", "ssm_state_act__input")]
    statistics = reorder_statistics(model, batches)[1]
    for hook in hooks:
        hook.remove()
    xs = seen["x_conv_out__input"]  # one (1, l, d_inner) per sample
    assert torch.equal(statistics.mean_abs, torch.stack([x.abs().mean(dim=1)[0] for x in xs]).amax(dim=0))
    assert torch.equal(statistics.x_absmax, torch.cat([x.abs()[0] for x in xs]).amax(dim=0))
    assert torch.equal(statistics.B_absmax, torch.cat([b.abs()[0] for b in seen["B_conv_out__input"]]).amax(dim=0))
    states = torch.cat(seen["ssm_state_act__input"]).abs()  # (samples, h, p, n)
    assert torch.equal(statistics.state_absmax, states.amax(dim=0))


def test_grouped_ranges_follow_the_cells_of_the_reordered_layout():
    statistics = random_statistics(5)
    record = reorder_record(random_model(CONFIG), {0: statistics}, 4, 4)["layers"]["layer_0"]
    plan = ReorderPlan.from_record(record)
    assert record["B_group_absmax"] == statistics.B_absmax.reshape(2, -1).amax(dim=1).tolist()  # per SSD group
    state = statistics.state_absmax.reshape(CONFIG.d_inner, -1)[torch.tensor(plan.channel_order)]  # (new c, n)
    cell = plan.cell_of_channel()
    for index, values in enumerate(record["state_group_absmax"]):  # per (cell, state index)
        assert values == state[cell == index].amax(dim=0).tolist()
    x = statistics.x_absmax[torch.tensor(plan.channel_order)]
    assert record["group_absmax_after"] == [x[cell == index].max().item() for index in range(len(plan.cells()))]
