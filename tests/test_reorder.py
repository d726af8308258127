"""Quamba2's head/channel reordering: the FP model is unchanged, and the order is sort-and-cluster."""

import itertools

import pytest
import torch
from conftest import random_model

from quamba.errors import ConfigError
from quamba.models import MambaConfig
from quamba.transforms.reorder import (
    ReorderPlan,
    check_reorderable,
    cluster_sorted,
    plan_reorder,
    reorder_mixer,
    reorder_model,
    reorder_record,
    x_channel_absmax,
)
from quamba.transforms.rotation import rotate_out_projs, rotate_residual

CONFIG = MambaConfig(d_model=64, n_layer=2, vocab_size=101, layer="Mamba2", d_state=8, headdim=8, ngroups=2,
                     chunk_size=8, bias=True, tie_embeddings=False)  # 16 heads, 8 per B/C group
IDS = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(0))


def random_absmax(seed: int) -> torch.Tensor:
    return torch.rand(CONFIG.d_inner, generator=torch.Generator().manual_seed(seed)).exp()  # (d_inner,)


def test_reordered_model_computes_the_same_logits_full_and_step_by_step():
    model = random_model(CONFIG)
    record = reorder_record(model, {i: random_absmax(i) for i in range(CONFIG.n_layer)}, 3, 2)
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
    record = reorder_record(model, x_channel_absmax(model, list(IDS.split(1))), 4, 4)
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
    plan = plan_reorder(absmax.reshape(-1), nheads, ngroups, head_clusters=2, channel_clusters=2)
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
    absmax = {0: random_absmax(0), 1: random_absmax(1)}
    absmax[0][5] = 100.0  # one outlier channel spoils its contiguous group before reordering
    layer = reorder_record(model, absmax, 4, 4)["layers"]["layer_0"]
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
    plan = plan_reorder(random_absmax(3), CONFIG.nheads, CONFIG.ngroups, 3, 3)
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
        reorder_mixer(model.backbone.layers[0].mixer, plan_reorder(random_absmax(0), 16, 2))
