"""GPTQ for one Linear: it beats round-to-nearest on the layer output, and it is exact bookkeeping."""

import pytest
import torch

from quamba.numerics.gptq import GPTQ, QuantizedLinearWeight, rtn
from quamba.numerics.quantizers import qrange

IN_FEATURES, OUT_FEATURES, ROWS = 256, 192, 2048
SETTINGS = [(4, "group"), (8, "tensor"), (4, "channel")]  # (bits, granularity)


def correlated_inputs(rows: int, seed: int) -> torch.Tensor:
    """x = z M: a Hessian far from the identity, where GPTQ's error feedback matters."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(IN_FEATURES, IN_FEATURES, generator=torch.Generator().manual_seed(100))
    return torch.randn(rows, IN_FEATURES, generator=generator) @ mixing  # (rows, in)


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, GPTQ]:
    """A random weight (out, in), calibration and held-out inputs, and the streamed solver."""
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=torch.Generator().manual_seed(7)) / 16
    calibration, held_out = correlated_inputs(ROWS, seed=1), correlated_inputs(ROWS, seed=2)
    solver = GPTQ(IN_FEATURES)
    for batch in calibration.split(512):
        solver.add_batch(batch)
    return weight, calibration, held_out, solver


def output_error(x: torch.Tensor, weight: torch.Tensor, result: QuantizedLinearWeight) -> float:
    """||X W^T - X W_hat^T||^2, in float64."""
    return (x.double() @ (weight.double() - result.dequantize().double()).T).square().sum().item()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits, granularity", SETTINGS)
def test_gptq_reconstructs_the_output_better_than_rtn(layer, bits, granularity, act_order):
    weight, calibration, held_out, solver = layer
    result = solver.quantize(weight, bits, granularity, act_order=act_order)
    baseline = rtn(weight, bits, granularity)
    for x in (calibration, held_out):
        assert output_error(x, weight, result) < 0.9 * output_error(x, weight, baseline)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits, granularity", SETTINGS)
def test_integers_in_range_and_scales_positive(layer, bits, granularity, act_order):
    weight, _, _, solver = layer
    result = solver.quantize(weight, bits, granularity, act_order=act_order)
    qmin, qmax = qrange(bits)
    assert result.q.dtype == torch.int8 and result.q.shape == weight.shape
    assert qmin <= int(result.q.min()) and int(result.q.max()) <= qmax
    assert result.scales.dtype == torch.float32 and bool((result.scales > 0).all())
    assert result.scales.shape == {"group": (OUT_FEATURES, 2), "tensor": (1, 1), "channel": (OUT_FEATURES, 1)}[
        granularity]


@pytest.mark.parametrize("act_order", [False, True])
def test_tracked_error_equals_the_damped_hessian_quadratic_form(layer, act_order):
    """sum (w - q)^2 / d^2 = trace(dW H_damped dW^T): the OBS bookkeeping is exact."""
    weight, _, _, solver = layer
    result = solver.quantize(weight, 4, "group", percdamp=0.01, act_order=act_order)
    hessian = solver.hessian.clone()
    hessian.diagonal().add_(0.01 * hessian.diagonal().mean())
    delta = weight.double() - result.dequantize().double()  # (out, in)
    assert result.error == pytest.approx(torch.einsum("oi,ij,oj->", delta, hessian, delta).item(), rel=1e-4)


def test_act_order_returns_the_original_column_order():
    """On a diagonal Hessian no error propagates, so GPTQ with act_order must equal RTN column for column."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator)
    solver = GPTQ(IN_FEATURES)
    solver.add_batch(torch.diag(torch.rand(IN_FEATURES, generator=generator) + 0.1))  # H diagonal, uneven
    result = solver.quantize(weight, 4, "group", act_order=True)
    assert not torch.equal(result.perm, torch.arange(IN_FEATURES))
    baseline = rtn(weight, 4, "group")
    assert torch.equal(result.q, baseline.q) and torch.equal(result.scales, baseline.scales)
    assert torch.equal(solver.quantize(weight, 4, "group").q, baseline.q)  # and without act_order


def test_same_inputs_give_bit_identical_outputs(layer):
    weight, calibration, _, solver = layer
    again = GPTQ(IN_FEATURES)
    for batch in calibration.split(512):
        again.add_batch(batch)
    assert torch.equal(again.hessian, solver.hessian)
    for act_order in (False, True):
        first = solver.quantize(weight, 4, "group", act_order=act_order)
        second = again.quantize(weight, 4, "group", act_order=act_order)
        assert torch.equal(first.q, second.q) and torch.equal(first.scales, second.scales)
        assert first.error == second.error


def test_add_batch_over_two_halves_equals_one_call():
    x = correlated_inputs(1000, seed=4)
    whole, halves = GPTQ(IN_FEATURES), GPTQ(IN_FEATURES)
    whole.add_batch(x)
    halves.add_batch(x[:300])
    halves.add_batch(x[300:])
    assert whole.nsamples == halves.nsamples == 1000
    torch.testing.assert_close(halves.hessian, whole.hessian, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(whole.hessian, 2 / 1000 * x.double().T @ x.double())


def test_add_batch_flattens_leading_dimensions():
    x = correlated_inputs(96, seed=5)
    flat, batched = GPTQ(IN_FEATURES), GPTQ(IN_FEATURES)
    flat.add_batch(x)
    batched.add_batch(x.reshape(4, 24, IN_FEATURES))
    assert torch.equal(flat.hessian, batched.hessian)


def test_dead_input_columns_get_zero_weights_and_no_nan(layer):
    weight, calibration, _, _ = layer
    x = calibration.clone()
    x[:, [3, 130]] = 0.0  # inputs that never fire
    solver = GPTQ(IN_FEATURES)
    solver.add_batch(x)
    for act_order in (False, True):
        result = solver.quantize(weight, 4, "group", act_order=act_order)
        assert torch.isfinite(result.dequantize()).all() and result.error == result.error
        assert not result.q[:, [3, 130]].any()


def test_group_blocksize_only_changes_speed(layer):
    weight, _, _, solver = layer
    reference = solver.quantize(weight, 4, "group", group_size=64, blocksize=128)
    for blocksize in (32, 100, 256):
        other = solver.quantize(weight, 4, "group", group_size=64, blocksize=blocksize)
        assert (other.q != reference.q).float().mean() < 0.01  # float rounding only


def test_quantize_needs_inputs_and_a_matching_weight():
    solver = GPTQ(8)
    with pytest.raises(RuntimeError, match="add_batch"):
        solver.quantize(torch.randn(4, 8), 4, "channel")
    solver.add_batch(torch.randn(16, 8))
    with pytest.raises(ValueError, match="weight"):
        solver.quantize(torch.randn(4, 9), 4, "channel")
    with pytest.raises(ValueError, match="inputs"):
        solver.add_batch(torch.randn(16, 9))
