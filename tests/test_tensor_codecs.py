"""Quamba's integer formats beyond in_proj/out_proj, on cases small enough to check by hand."""

import pytest
import torch

from quamba.errors import ConfigError
from quamba.numerics.tensor_codecs import (
    dequantize_tensor,
    embedding_int,
    qqq_int8_weight,
    ssm_param_int8,
    w4_from_values,
    w4_marlin,
    w8_per_part,
    w8_per_tensor,
)


def test_qqq_turns_int4_group_codes_into_int8_by_an_fp16_multiply_with_s_g_over_s_c():
    q = torch.zeros(1, 256, dtype=torch.int8)
    q[0, :3] = torch.tensor([7, -8, 1])  # group 0, s_g = 0.5: w_ref 3.5, -4, 0.5
    q[0, 128] = 3  # group 1, s_g = 0.25: w_ref 0.75
    w_int8, s_c = qqq_int8_weight(q, torch.tensor([[0.5, 0.25]]))
    assert s_c.item() == pytest.approx(4 / 127, rel=1e-3)  # absmax_row(w_ref) / 127, in fp16
    s_hat = torch.tensor([0.5, 0.25], dtype=torch.float16) / torch.tensor(4 / 127, dtype=torch.float16)
    assert s_hat.tolist() == pytest.approx([15.875, 7.9375], abs=0.01)
    # 7 * 15.875 = 111.1 -> 111; -8 * 15.875 = -127; 1 * 15.875 -> 16; 3 * 7.9375 = 23.8 -> 24
    assert w_int8[0, :3].tolist() == [111, -127, 16] and w_int8[0, 128].item() == 24
    assert w_int8.dtype == torch.int8 and int(w_int8[0, 3:128].abs().max()) == 0


def test_qqq_per_channel_is_the_nibble_shift_and_keeps_the_weight_exact():
    q = torch.tensor([[7, -7, 3, 0]], dtype=torch.int8)
    w_int8, s_c = qqq_int8_weight(q, torch.tensor([[0.25]]))
    assert w_int8.tolist() == [[112, -112, 48, 0]] and s_c.item() == 0.25 / 16
    assert torch.equal(dequantize_tensor(w_int8, s_c), dequantize_tensor(q, torch.tensor([[0.25]])))


def test_marlin_w4_is_per_channel_on_minus_7_to_7_at_in_features_up_to_128():
    w = torch.zeros(2, 128)
    w[0, :4] = torch.tensor([1.75, -0.875, 0.25, 0.0])  # s = 1.75 / 7 = 0.25; -3.5 -> -4 (ties to even)
    w[1, :2] = torch.tensor([-2.0, 0.5])
    coded = w4_marlin(w)
    assert coded.scale.shape == (2, 1) and coded.scale[0].item() == 0.25
    assert coded.q[0, :4].tolist() == [7, -4, 1, 0] and coded.q[1, :2].tolist() == [-7, 2]
    assert int(coded.q.abs().max()) <= 7


def test_marlin_w4_groups_of_128_use_the_minus_8_to_7_grid():
    w = torch.zeros(1, 256)
    w[0, :3] = torch.tensor([1.5, -1.5, 0.2])  # s = 2 * 1.5 / 15 = 0.2: 7.5 -> 8 -> 7 after the +8 shift clamp
    w[0, 128] = -3.0  # group 1: s = 0.4, -7.5 + 8 = 0.5 -> 0 (ties to even) -> -8
    coded = w4_marlin(w)
    assert coded.scale.shape == (1, 2) and coded.scale[0].tolist() == pytest.approx([0.2, 0.4], rel=1e-3)
    assert coded.q[0, :3].tolist() == [7, -8, 1] and coded.q[0, 128].item() == -8
    # GPTQ's fp16 values on that grid give their own codes back
    again = w4_from_values(coded.dequantize().half(), coded.scale)
    assert torch.equal(again.q, coded.q)


def test_embedding_uses_each_rows_signed_maximum_not_its_absmax():
    e = torch.tensor([[1.0, -3.0, 0.5, 0.25]])
    w8 = embedding_int(e, 8)  # s = 1 / 127: -381 clamps to -128, 63.5 -> 64 (ties to even)
    assert w8.q.tolist() == [[127, -128, 64, 32]] and w8.scale.item() == pytest.approx(1 / 127, rel=1e-3)
    w4 = embedding_int(e, 4)  # s = 1 / 8: codes clamp(round(e / s + 8), 0, 15) - 8
    assert w4.q.tolist() == [[7, -8, 4, 2]] and w4.scale.item() == 0.125
    with pytest.raises(ConfigError, match="quantize_embedding: 1 embedding rows have no positive entry"):
        embedding_int(torch.tensor([[-1.0, -2.0]]), 8)


def test_per_tensor_and_per_part_int8_and_the_scan_parameters():
    coded = w8_per_tensor(torch.tensor([[0.5, -1.27]]), torch.float32)
    assert coded.q.tolist() == [[50, -127]] and coded.scale.shape == (1, 1)
    parts = w8_per_part(torch.tensor([[1.0], [-0.5], [4.0]]).reshape(3, 1, 1), [2, 1], torch.float32)
    assert parts.q.reshape(-1).tolist() == [127, -64, 127] and parts.scale.shape == (3, 1, 1)
    assert parts.scale.reshape(-1).tolist() == pytest.approx([1 / 127, 1 / 127, 4 / 127])
    a = ssm_param_int8(torch.tensor([0.5, -1.27]))
    assert a.q.tolist() == [50, -127] and a.scale.item() == pytest.approx(0.01)
    assert ssm_param_int8(torch.zeros(3)).scale.item() == pytest.approx(1e-5)  # floored scale
