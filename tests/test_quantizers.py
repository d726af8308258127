"""Integer formats: rounding, ranges, quantize/dequantize, weight scales, int4 packing."""

import pytest
import torch

from quamba.numerics.quantizers import (
    HALF_AWAY,
    WEIGHT_SCALE_FLOOR,
    dequantize,
    expand_scales,
    fake_quantize,
    pack_int4,
    qrange,
    quantize,
    round_half_away,
    unpack_int4,
    weight_scales,
)


def test_round_half_away_sends_ties_away_from_zero():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    assert torch.equal(round_half_away(x), torch.tensor([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0]))


def test_torch_round_differs_on_ties():
    x = torch.tensor([-2.5, -0.5, 0.5, 2.5])
    assert not torch.equal(round_half_away(x), torch.round(x))  # ties to even: -2, -0, 0, 2


def test_round_half_away_is_exact_just_below_a_tie():
    ties = torch.tensor([0.5, -0.5, 2.5, -2.5])
    below_ties = torch.nextafter(ties, torch.zeros(4))  # 0.49999997, -0.49999997, 2.4999998, -2.4999998
    assert torch.equal(round_half_away(below_ties), torch.tensor([0.0, -0.0, 2.0, -2.0]))


def test_int8_and_int4_ranges():
    assert qrange(8) == (-128, 127)
    assert qrange(4) == (-8, 7)
    with pytest.raises(ValueError, match="bits"):
        qrange(16)


def test_quantize_error_at_most_half_a_step_inside_the_range():
    scale = 0.05
    x = torch.linspace(-127 * scale, 127 * scale, 10001)
    q = quantize(x, scale, 8)
    assert q.dtype == torch.int8
    assert (dequantize(q, scale) - x).abs().max() <= scale / 2 + 1e-7


def test_quantize_clamps_outside_the_range():
    scale = torch.tensor(0.1)
    x = torch.tensor([-5.0, -0.85, 0.75, 5.0])
    assert quantize(x, scale, 4).tolist() == [-8, -8, 7, 7]
    assert quantize(x * 100, scale, 8).tolist() == [-128, -128, 127, 127]


def test_quantize_broadcasts_scales_and_fake_quantize_keeps_dtype():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)).half()
    scale = torch.tensor([[0.1], [0.2], [0.3], [0.4]])  # (4, 1)
    snapped = fake_quantize(x, scale, 8)
    assert snapped.dtype == torch.float16 and snapped.shape == x.shape
    assert torch.equal(snapped, (quantize(x, scale, 8).float() * scale).half())


def test_pack_unpack_int4_round_trip_including_extremes():
    q = torch.randint(-8, 8, (5, 3, 34), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    q[0, 0, :4] = torch.tensor([-8, 7, 7, -8], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3, 17)
    assert torch.equal(unpack_int4(packed), q)


def test_pack_int4_layout_low_nibble_is_even_index():
    packed = pack_int4(torch.tensor([-8, 7, -1, 0, 3, -2], dtype=torch.int8))
    assert packed.tolist() == [0x78, 0x0F, 0xE3]


def test_pack_int4_rejects_odd_sizes_and_out_of_range_values():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(3, 5, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([8, 0], dtype=torch.int8))


def test_weight_scale_shapes_per_granularity():
    W = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    assert weight_scales(W, 8, "tensor").shape == (1, 1)
    assert weight_scales(W, 4, "channel").shape == (64, 1)
    assert weight_scales(W, 4, "group", 128).shape == (64, 4)
    assert expand_scales(weight_scales(W, 4, "group", 128), 512).shape == (64, 512)


def test_per_tensor_scale_is_absmax_over_qmax():
    W = torch.randn(32, 96, generator=torch.Generator().manual_seed(1))
    assert torch.equal(weight_scales(W, 8, "tensor"), (W.abs().max() / 127).reshape(1, 1))
    assert torch.equal(weight_scales(W, 4, "channel"), W.abs().amax(dim=1, keepdim=True) / 7)


def test_group_scales_cover_consecutive_input_columns():
    W = torch.randn(8, 256, generator=torch.Generator().manual_seed(2))
    scales = weight_scales(W, 4, "group", 128)
    assert torch.equal(scales[:, 1], W[:, 128:].abs().amax(dim=1) / 7)


def test_group_with_in_features_up_to_group_size_is_per_channel():
    W = torch.randn(16, 128, generator=torch.Generator().manual_seed(3))
    assert torch.equal(weight_scales(W, 4, "group", 128), weight_scales(W, 4, "channel"))
    assert torch.equal(weight_scales(W[:, :96], 4, "group", 128), weight_scales(W[:, :96], 4, "channel"))


def test_non_divisible_groups_raise_a_clear_error():
    with pytest.raises(ValueError, match="in_features 200 is not a multiple of group_size 128"):
        weight_scales(torch.randn(4, 200), 4, "group", 128)


def test_unknown_granularity_is_rejected():
    with pytest.raises(ValueError, match="granularity"):
        weight_scales(torch.randn(4, 8), 4, "row")


def test_zero_weights_get_the_scale_floor():
    scales = weight_scales(torch.zeros(3, 8), 4, "channel")
    assert torch.equal(scales, torch.full((3, 1), WEIGHT_SCALE_FLOOR))
    assert torch.equal(quantize(torch.zeros(3, 8), scales, 4), torch.zeros(3, 8, dtype=torch.int8))


@pytest.mark.parametrize("groups", [1, 3])
def test_packed_int4_dequantizes_to_the_unpacked_reference(groups):
    from quamba.numerics.quantizers import dequantize, dequantize_packed_int4, expand_scales, pack_int4

    g = torch.Generator().manual_seed(groups)
    q = torch.randint(-8, 8, (6, 384), generator=g, dtype=torch.int8)
    scales = torch.rand(6, groups, generator=g) + 0.01
    assert torch.equal(dequantize_packed_int4(pack_int4(q), scales), dequantize(q, expand_scales(scales, 384)))


def test_a_w4_quant_linear_stays_packed_and_keeps_no_float_copy():
    """W4A16: the codes stay two per byte and the float weight is made per call, never kept; the
    output is the reference F.linear with the dequantized weight, bit for bit."""
    import torch.nn.functional as F

    from quamba.models.quantized import QuantLinear
    from quamba.numerics.quantizers import dequantize, expand_scales

    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (64, 256), generator=g, dtype=torch.int8)
    scales = torch.rand(64, 2, generator=g) * 0.01
    layer = QuantLinear(q, scales, 4, None, act_scale=None, rotate_input=None)
    x = torch.randn(3, 5, 256, generator=g)
    y = layer(x)
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (64, 128)
    assert layer._reference is None and layer.weight_bytes() == 64 * 128 + 64 * 2 * 4
    assert torch.equal(y, F.linear(x, dequantize(q, expand_scales(scales, 256))))


def test_a_compiled_quantizer_compiles_once_for_every_shape_of_a_rank():
    """compiled() with dynamic sizes from the start: one graph for prompts of any length, where
    torch's default compiles a second time at the second shape; the same integers as eager."""
    import torch._dynamo

    from quamba.numerics.quantizers import _quantize, compiled

    torch._dynamo.reset()
    compiled.cache_clear()
    fn = compiled(_quantize, bits=8, rounding=HALF_AWAY)
    scale, g = torch.tensor(0.05), torch.Generator().manual_seed(0)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for length in (17, 33, 50, 100):
        x = torch.randn(2, length, 64, generator=g)
        assert torch.equal(fn(x, scale), quantize(x, scale, 8, HALF_AWAY))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1


def test_a_compiled_kernel_keeps_its_int_constants_constant():
    """Each set of constants is its own graph: dynamo's automatic dynamic shapes would turn an int
    constant seen with a second value into a symbol, and a third value would reuse that slow
    symbolic graph (two graphs here instead of three)."""
    import torch._dynamo

    from quamba.numerics.hadamard import _butterflies
    from quamba.numerics.quantizers import compiled

    torch._dynamo.reset()
    compiled.cache_clear()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(0)
    for m in (3, 5, 7):  # rows of the base matrix, as 12, 20, 40 of Quamba's widths
        x = torch.randn(2, 3, m * 16, generator=g)
        fn = compiled(_butterflies, m=m, p=16, compute=torch.float32)
        assert torch.equal(fn(x), _butterflies(x, m, 16, torch.float32))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 3
    assert torch._dynamo.config.automatic_dynamic_shapes  # restored after each call


def test_a_compiled_kernel_inside_a_compiled_block_is_inlined_there():
    """Compiled blocks on CUDA trace the fused quantizers and Hadamard kernels into their graph; a
    kernel must not mark sizes dynamic there (dynamo refuses it: on the H100, 2026-12-08, no
    quantized model's blocks compiled)."""
    import torch._dynamo

    from quamba.numerics.quantizers import _quantize, compiled

    torch._dynamo.reset()
    compiled.cache_clear()
    kernel = compiled(_quantize, bits=8, rounding=HALF_AWAY)
    scale = torch.tensor(0.05)
    block = torch.compile(lambda x: kernel(x * 2, scale), fullgraph=True)
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(block(x), quantize(x * 2, scale, 8, HALF_AWAY))
