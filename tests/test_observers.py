"""Observers agree with direct numpy computations; the reservoir is seeded and uniform."""

import math

import numpy as np
import pytest
import torch

from quamba.numerics.observers import Moments, QuambaPercentile, Reservoir, StreamHistogram, abs_quantiles


def batches(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed, like real activations: a few large outliers
    return [torch.randn(4, 300, generator=g) * (1 + 20 * (torch.rand(4, 300, generator=g) > 0.999))
            for _ in range(n)]


def test_moments_equal_numpy():
    data = batches()
    moments = Moments()
    for x in data:
        moments.update(x)
    flat = np.concatenate([x.numpy().ravel() for x in data]).astype(np.float64)
    assert moments.numel == flat.size
    assert moments.min == flat.min() and moments.max == flat.max()
    assert moments.absmax == np.abs(flat).max()
    assert math.isclose(moments.mean, flat.mean(), rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(moments.std, flat.std(), rel_tol=1e-9)


def test_quamba_percentile_is_an_ema_of_per_batch_quantiles():
    data, alphas = batches(), [0.99, 0.9995]
    observer = QuambaPercentile(alphas)
    for x in data:
        observer.update(x)
    for alpha in alphas:
        expected = None
        for x in data:
            t = np.quantile(np.abs(x.numpy()).ravel(), alpha)
            expected = t if expected is None else expected + 0.01 * (t - expected)
        assert math.isclose(observer.values[alpha], expected, rel_tol=1e-5)


@pytest.mark.parametrize("alphas", [[0.999, 0.99999, 1.0], [0.5, 0.999]])
def test_abs_quantiles_equal_numpy_on_the_top_k_and_the_sort_path(alphas):
    x = batches(n=1)[0]  # the first list needs only the top values, the second a full sort
    expected = np.quantile(np.abs(x.numpy()).astype(np.float64).ravel(), alphas)
    assert np.allclose(abs_quantiles(x, alphas), expected, rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 0.99, 0.9995, 0.99999, 1.0])
def test_stream_percentile_bracket_holds_the_true_percentile(alpha):
    data = batches()
    histogram = StreamHistogram()
    for x in data:
        histogram.update(x)
    true = np.quantile(np.abs(np.concatenate([x.numpy().ravel() for x in data])), alpha)
    low, high = histogram.quantile_bracket(alpha)
    assert low <= true <= high


def test_stream_percentile_bracket_is_within_the_stated_error():
    histogram = StreamHistogram(mantissa_bits=6)
    histogram.update(torch.linspace(1, 2, 100001))  # values evenly spread: bracket is one bin
    low, high = histogram.quantile_bracket(0.5)
    assert high / low - 1 <= histogram.relative_error + 1e-12
    assert math.isclose(histogram.relative_error, 2 ** -6)


@pytest.mark.parametrize("threshold", [0.1, 1.0, 2.5, 10.0])
def test_clipped_fraction_is_within_its_error_of_the_exact_count(threshold):
    data = batches()
    histogram = StreamHistogram()
    for x in data:
        histogram.update(x)
    flat = np.abs(np.concatenate([x.numpy().ravel() for x in data]))
    exact = (flat > threshold).mean()
    estimate, error = histogram.fraction_above(threshold)
    assert abs(estimate - exact) <= error + 1e-12


def stream_of_positions(reservoir, total=100_000, seed=0, max_batch=5000):
    """Feed positions 0..total-1 in batches of varying size."""
    sizes = torch.randint(1, max_batch, (1000,), generator=torch.Generator().manual_seed(seed))
    start = 0
    for size in sizes.tolist():
        if start >= total:
            break
        end = min(start + size, total)
        reservoir.update(torch.arange(start, end, dtype=torch.float32))
        start = end
    return reservoir.sample().numpy()


def test_reservoir_is_deterministic_per_seed():
    a = stream_of_positions(Reservoir(1000, seed=3))
    b = stream_of_positions(Reservoir(1000, seed=3))
    c = stream_of_positions(Reservoir(1000, seed=4))
    assert np.array_equal(a, b)
    assert not np.array_equal(np.sort(a), np.sort(c))


@pytest.mark.parametrize("size, max_batch", [(2000, 5000), (300, 20_000)])  # the 2nd skips ahead
def test_reservoir_samples_stream_positions_uniformly(size, max_batch):
    total = 100_000
    sample = stream_of_positions(Reservoir(size, seed=0), total, max_batch=max_batch)
    assert sample.size == size and np.unique(sample).size == size  # without replacement
    # Kolmogorov-Smirnov distance to the uniform distribution over positions, 1% level
    ordered = np.sort(sample) / total
    cdf = np.arange(1, size + 1) / size
    distance = max(np.max(cdf - ordered), np.max(ordered - (cdf - 1 / size)))
    assert distance < 1.63 / math.sqrt(size)
    # a first-N sampler would keep only the start of the stream
    assert sample.max() > 0.95 * total and sample.min() < 0.05 * total


def test_reservoir_keeps_everything_from_a_short_stream():
    reservoir = Reservoir(50, seed=0)
    reservoir.update(torch.arange(30, dtype=torch.float32))
    assert sorted(reservoir.sample().tolist()) == list(range(30))
