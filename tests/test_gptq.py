"""GPTQ for one Linear, in Quamba's arithmetic: it beats round-to-nearest on the layer output, its
grid and rounding follow the rules on cases checked by hand, and its bookkeeping is exact."""

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
    for sequence in calibration.split(256):  # 8 sequences of 256 tokens
        solver.add_batch(sequence[None])
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
    hessian = solver.hessian.double()
    hessian.diagonal().add_(0.01 * hessian.diagonal().mean())
    delta = weight.double() - result.dequantize().half().double()  # (out, in): the fp16 values GPTQ kept
    assert result.error == pytest.approx(torch.einsum("oi,ij,oj->", delta, hessian, delta).item(), rel=1e-3)


def test_act_order_returns_the_original_column_order():
    """On a diagonal Hessian no error propagates, so GPTQ with act_order must equal RTN column for column."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator)
    solver = GPTQ(IN_FEATURES)
    solver.add_batch(torch.diag(torch.rand(IN_FEATURES, generator=generator) + 0.1)[None])  # H diagonal, uneven
    result = solver.quantize(weight, 4, "group", act_order=True)
    assert not torch.equal(result.perm, torch.arange(IN_FEATURES))
    baseline = rtn(weight, 4, "group")
    assert torch.equal(result.q, baseline.q) and torch.equal(result.scales, baseline.scales)
    assert torch.equal(solver.quantize(weight, 4, "group").q, baseline.q)  # and without act_order


def test_same_inputs_give_bit_identical_outputs(layer):
    weight, calibration, _, solver = layer
    again = GPTQ(IN_FEATURES)
    for sequence in calibration.split(256):
        again.add_batch(sequence[None])
    assert torch.equal(again.hessian, solver.hessian)
    for act_order in (False, True):
        first = solver.quantize(weight, 4, "group", act_order=act_order)
        second = again.quantize(weight, 4, "group", act_order=act_order)
        assert torch.equal(first.q, second.q) and torch.equal(first.scales, second.scales)
        assert first.error == second.error


def test_hessian_is_quambas_float32_running_average_over_sequences():
    """H <- H n / (n + 1), n <- n + 1, H <- H + (2 / n) x^T x per sequence: (2 / sequences) sum x x^T."""
    x = correlated_inputs(1000, seed=4).reshape(10, 100, IN_FEATURES)  # 10 sequences of 100 tokens
    batched, one_by_one = GPTQ(IN_FEATURES), GPTQ(IN_FEATURES)
    batched.add_batch(x)
    expected = torch.zeros(IN_FEATURES, IN_FEATURES)
    for n, sequence in enumerate(x, start=1):
        one_by_one.add_batch(sequence[None])
        expected = expected * ((n - 1) / n) + ((2 / n) ** 0.5 * sequence).T @ ((2 / n) ** 0.5 * sequence)
    assert batched.nsamples == one_by_one.nsamples == 10
    assert batched.hessian.dtype == torch.float32 and torch.equal(batched.hessian, expected)
    assert torch.equal(one_by_one.hessian, expected)
    flat = x.reshape(-1, IN_FEATURES).double()
    torch.testing.assert_close(batched.hessian.double(), 2 / 10 * flat.T @ flat, rtol=1e-4, atol=1e-2)


DIAGONAL = torch.eye(6) * 4.0  # no error feedback between columns: GPTQ is RTN column for column


def one_row_solver(hessian: torch.Tensor) -> GPTQ:
    solver = GPTQ(hessian.shape[0])
    solver.hessian, solver.nsamples = hessian.clone(), 1
    return solver


def test_int4_grid_and_rounding_on_a_case_checked_by_hand():
    """absmax 0.9375: Quamba's scale 2 * 0.9375 / 15 = 0.125 exactly, so w / s = 7.5, -7.5, -2.5,
    4.5, -0.5, 1.5. Ties to even: 8 -> clipped to 7, -8, -2, 4, -0, 2. Away from zero: 7, -8, -3,
    5, -1, 2. The symmetric grid (absmax / 7) reaches only -7..7."""
    weight = torch.tensor([[0.9375, -0.9375, -0.3125, 0.5625, -0.0625, 0.1875]])
    solver = one_row_solver(DIAGONAL)
    even = solver.quantize(weight, 4, "group", group_size=128, percdamp=0.0)
    assert even.q.tolist() == [[7, -8, -2, 4, 0, 2]] and even.scales.item() == 0.125
    away = solver.quantize(weight, 4, "group", group_size=128, percdamp=0.0, rounding="half_away")
    assert away.q.tolist() == [[7, -8, -3, 5, -1, 2]]
    symmetric = solver.quantize(weight, 4, "group", group_size=128, percdamp=0.0, grid="symmetric")
    assert symmetric.q.tolist() == [[7, -7, -2, 4, 0, 1]] and symmetric.scales.item() == pytest.approx(0.9375 / 7)
    assert torch.equal(even.q, rtn(weight, 4, "group").q)  # RTN on the same grid agrees without feedback


def test_error_feedback_on_two_columns_checked_by_hand():
    """H = [[1, 0.5], [0.5, 1]] (no damping): U = chol(H^-1) upper has U00 = sqrt(4/3), U01 = -sqrt(1/3).
    Column 0: w0 = 0.3, s = 2 * 0.9 / 15 = 0.12 (the group's absmax is 0.9), q0 = round(2.5) = 2 (even),
    error e = (0.3 - 0.24) / U00; column 1 becomes w1 - e U01 = 0.9 + 0.06 * 0.5 = 0.93 -> 7.75 -> 7."""
    hessian = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    result = one_row_solver(hessian).quantize(torch.tensor([[0.3, 0.9]]), 4, "group", group_size=128, percdamp=0.0)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    assert u[0, 0].item() == pytest.approx((4 / 3) ** 0.5) and u[0, 1].item() == pytest.approx(-(1 / 3) ** 0.5)
    updated = 0.9 - (0.3 - 2 * 0.12) / u[0, 0].item() * u[0, 1].item()
    assert updated == pytest.approx(0.93)
    assert result.q.tolist() == [[2, 7]] and result.scales.item() == pytest.approx(0.12)


def test_an_all_zero_group_gets_absmax_one_as_gptqs_quantizer():
    weight = torch.zeros(2, 4)
    weight[1] = torch.tensor([0.1, -0.2, 0.3, 0.0])
    result = one_row_solver(torch.eye(4)).quantize(weight, 4, "group", group_size=128, percdamp=0.0)
    assert result.scales[0].item() == pytest.approx(2 / 15) and result.q[0].tolist() == [0, 0, 0, 0]


def test_dequantized_columns_are_kept_in_fp16_before_the_error_feedback():
    """Quamba's solve casts each dequantized column to fp16: the error it propagates is w - fp16(q s)."""
    hessian = torch.tensor([[1.0, 0.9], [0.9, 1.0]])
    weight = torch.tensor([[0.123456, 0.777777]])
    result = one_row_solver(hessian).quantize(weight, 8, "group", group_size=128, percdamp=0.0)
    s = result.scales.item()
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    q0 = round(weight[0, 0].item() / s)
    kept = torch.tensor(q0 * s, dtype=torch.float32).half().float().item()
    w1 = weight[0, 1].item() - (weight[0, 0].item() - kept) / u[0, 0].item() * u[0, 1].item()
    assert result.q[0, 0].item() == q0 and result.q[0, 1].item() == min(127, round(w1 / s))  # +absmax clips


def test_dead_input_columns_get_zero_weights_and_no_nan(layer):
    weight, calibration, _, _ = layer
    x = calibration.clone()
    x[:, [3, 130]] = 0.0  # inputs that never fire
    solver = GPTQ(IN_FEATURES)
    solver.add_batch(x[None])
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
