"""QuantLinear's int8 GEMM as Quamba's kernels compute it: the exact int32 accumulator, then the
epilogue's two float32 multiplies in the order of the layer's call, then (where the next op takes
int8) a saturating int8 output rounded ties to even."""

import pytest
import torch

from quamba.models.quantized import QuantLinear, int8_matmul
from quamba.numerics.quantizers import HALF_AWAY, HALF_EVEN

GEN = torch.Generator().manual_seed(0)


def int8(*shape):
    return torch.randint(-128, 128, shape, generator=GEN, dtype=torch.int8)


@pytest.mark.parametrize("m, k, n", [(1, 8, 8), (5, 13, 7), (40, 256, 96)])
def test_the_accumulator_is_the_exact_integer_product(m, k, n):
    x, w = int8(m, k), int8(n, k)
    assert torch.equal(int8_matmul(x, w), (x.double() @ w.double().t()).to(torch.int32))


def layer(epilogue, out_scale=None, qweight=None, scales=None, act_scale=0.0123):
    qweight = int8(24, 32) if qweight is None else qweight
    scales = torch.tensor([[0.00731]]) if scales is None else scales
    return QuantLinear(qweight, scales, 8, None, act_scale, None, epilogue=epilogue, out_scale=out_scale)


def integer_input(lin, x):
    """x's int8 values and their exact accumulator with the layer's weight (as the layer forms them)."""
    x_q = torch.round(x / lin.act_scale).clamp(-128, 127)
    return (x_q.double() @ lin.qweight.double().t()).float()


def f32(value):
    return torch.tensor(value, dtype=torch.float32)


def test_each_call_multiplies_in_its_own_order():
    x = torch.randn(64, 32, generator=GEN)
    s_in, s_w, s_out = f32(0.0123), f32(0.00731), f32(0.0417)
    ratio = f32(float(s_in) / float(s_out))  # a double rounded to float32
    expected = {
        "forward": lambda acc: (acc * s_w) * ratio,
        "seqlen_last": lambda acc: (acc * ratio) * s_w,
        "parallel": lambda acc: (acc * (s_w / s_out)) * s_in,
    }
    values = {}
    for epilogue, formula in expected.items():
        lin = layer(epilogue, out_scale=s_out.reshape(1))
        v = formula(integer_input(lin, x))
        q = torch.round(v).clamp(-128, 127)
        assert torch.equal(lin(x), q * s_out), epilogue
        values[epilogue] = v
    # the orders are not interchangeable: some values differ in float32 (so following one matters)
    assert not torch.equal(values["forward"], values["seqlen_last"])


def test_an_fp16_output_is_s_in_times_s_w_times_acc_then_the_cast():
    x = torch.randn(64, 32, generator=GEN)
    lin = layer("forward")
    v = (integer_input(lin, x) * f32(0.00731)) * f32(0.0123)
    assert torch.equal(lin(x), v)
    x16 = x.half()
    v16 = (integer_input(lin, x16.float()) * f32(0.00731)) * f32(0.0123)
    lin.half().scales = lin.scales.float()  # scales stay float32 in a half model, as loading keeps them
    assert torch.equal(lin(x16), v16.half())


def test_the_int8_output_rounds_ties_to_even_and_saturates():
    # one input column, weight 1: acc = x's integer; with s_w = s_in = 1 and s_out = 2: v = acc / 2
    lin = layer("forward", out_scale=torch.tensor([2.0]), qweight=torch.ones(1, 8, dtype=torch.int8),
                scales=torch.ones(1, 1), act_scale=1.0)
    x = torch.zeros(6, 8)
    x[:, 0] = torch.tensor([5.0, 7.0, -5.0, 1.0, 127.0, -128.0])  # v = 2.5, 3.5, -2.5, 0.5, 63.5, -64
    x[4:, 1:] = torch.tensor([127.0, -128.0]).reshape(2, 1)  # acc = 8 * 127 and 8 * -128: saturates
    q = lin(x)[:, 0] / 2
    assert q.tolist() == [2.0, 4.0, -2.0, 0.0, 127.0, -128.0]
    lin.out_rounding = HALF_AWAY
    assert (lin(x)[:4, 0] / 2).tolist() == [3.0, 4.0, -3.0, 1.0]
    assert lin.rounding == HALF_EVEN  # the input's own rounding is not the output's


def test_qqq_divides_its_row_scale_by_the_output_scale_first():
    q = torch.randint(-8, 8, (16, 256), generator=GEN, dtype=torch.int8)
    group_scales = torch.rand(16, 2, generator=GEN) * 0.01 + 1e-3
    s_out = torch.full((16,), 0.05)
    lin = QuantLinear(q, group_scales, 4, None, 0.02, None, qqq=True, out_scale=s_out)
    x = torch.randn(8, 256, generator=GEN)
    s_c = lin.scales.reshape(-1)
    v = (integer_input(lin, x) * (s_c / s_out)) * f32(0.02)
    assert torch.equal(lin(x), torch.round(v).clamp(-128, 127) * s_out)


@pytest.mark.parametrize("n, s_in", [(1024, 1 / 16), (5120, 0.0213)])
def test_out_proj_takes_its_int8_input_from_quambas_quantized_hadamard(n, s_in):
    """QHadamard (QUAMBA.md section 8): int8 = roundf(H x in float32 * float32((1 / sqrt n) / s_in)),
    saturated. Integer inputs keep every float32 sum of H x exact. n = 1024, s_in = 1/16: the factor
    is exactly 0.5, so odd sums are ties (half away from zero); an all-4 row saturates."""
    from quamba.numerics.hadamard import hadamard_matrix

    x = torch.randint(-1, 2, (6, n), generator=GEN).to(torch.float16)
    x[0] = 4.0  # H's first row is all ones
    lin = QuantLinear(torch.eye(n, dtype=torch.int8), torch.ones(1, 1), 8, None, s_in, "quamba",
                      rounding=HALF_AWAY)
    exact = (x.double() @ hadamard_matrix(n).T).float()  # integers, exact in float32
    v = exact * f32((1 / n ** 0.5) / s_in)
    codes = (v.sign() * (v.abs() + 0.5).floor()).clamp(-128, 127)  # roundf, saturated
    assert (codes.abs() == 127).any()
    if n == 1024:
        assert (v.frac().abs() == 0.5).any()  # ties occur
    # the identity weight, s_w = 1: out_proj's fp16 output is (codes * s_w) * s_in, cast
    assert torch.equal(lin(x), (codes * f32(1.0) * f32(s_in)).half())


def test_the_quantized_hadamard_never_rounds_the_rotated_value_to_fp16():
    """out_proj's codes are quantized_hadamard_transform's; hadamard_transform (fp16 out) then
    quantize would give other codes on some values, each one step away."""
    from quamba.numerics.hadamard import hadamard_transform, quantized_hadamard_factor, quantized_hadamard_transform
    from quamba.numerics.quantizers import quantize

    n, s_in = 5120, 0.0213
    x = (torch.randn(64, n, generator=GEN) * 2).to(torch.float16)
    factor = torch.tensor(quantized_hadamard_factor(n, s_in), dtype=torch.float32)
    codes = quantized_hadamard_transform(x, factor, "quamba", HALF_AWAY)
    lin = QuantLinear(torch.eye(n, dtype=torch.int8), torch.ones(1, 1), 8, None, s_in, "quamba", rounding=HALF_AWAY)
    assert torch.equal(lin(x), (codes.float() * f32(1.0) * f32(s_in)).half())
    two_steps = quantize(hadamard_transform(x, "quamba"), s_in, 8, HALF_AWAY)
    differ = (codes != two_steps).float().mean().item()
    assert 0 < differ < 0.05, differ
    assert (codes.int() - two_steps.int()).abs().max() == 1


def test_the_parallel_epilogue_at_one_row_rounds_as_quambas_gemv():
    """Mamba2's in_proj at one row is Quamba's Parallel GEMV (roundf); at more rows the GEMM (rint).
    s_w / s_out = 0.5 and s_in = 1 put odd accumulators on ties."""
    qweight = torch.eye(8, dtype=torch.int8)
    out_scale = torch.full((8,), 2.0)
    lin = QuantLinear(qweight, torch.ones(8, 1), 8, None, 1.0, None, epilogue="parallel", out_scale=out_scale,
                      gemv_rounding=HALF_AWAY)
    x = torch.tensor([[1.0, 3.0, 5.0, -1.0, -3.0, 7.0, 0.0, 2.0]])  # int8 as they are (s_in = 1)
    away = torch.tensor([1.0, 2.0, 3.0, -1.0, -2.0, 4.0, 0.0, 1.0]) * 2  # v = acc / 2, ties away, times s_out
    even = torch.tensor([0.0, 2.0, 2.0, -0.0, -2.0, 4.0, 0.0, 1.0]) * 2  # ties to even
    assert torch.equal(lin(x), away[None])
    assert torch.equal(lin(x.repeat(2, 1)), even.repeat(2, 1))


def test_in_proj_takes_the_int8_codes_of_the_float32_norm_as_quambas_qrmsnorm():
    """QRMSNorm writes int8 from the float32 norm (QUAMBA.md section 8: rint). RMSNorm.int8_output
    snaps the float32 output to that grid before the fp16 cast, and in_proj's quantizer takes
    exactly those codes back; quantizing the fp16-rounded norm would move some of them."""
    from quamba.models.lm import RMSNorm
    from quamba.models.taps import Tap
    from quamba.numerics.quantizers import quantize

    residual = torch.randn(64, 2560, generator=GEN) * 3  # float32, as the residual stream
    norm, s_in = RMSNorm(2560, 1e-5), 0.0371
    float32_norm = norm(residual)
    codes = quantize(float32_norm, s_in, 8, HALF_EVEN)
    norm.int8_output = Tap("in_proj:input")
    norm.int8_output.scale, norm.int8_output.rounding = s_in, HALF_EVEN
    hidden = norm(residual).to(torch.float16)  # what the block hands in_proj
    assert torch.equal(quantize(hidden, s_in, 8, HALF_EVEN), codes)
    assert not torch.equal(quantize(float32_norm.half(), s_in, 8, HALF_EVEN), codes)
