"""Observers agree with direct numpy computations; the reservoir is seeded and uniform."""

import math

import numpy as np
import pytest
import torch

from quamba.numerics import observers
from quamba.numerics.observers import (
    Moments,
    QuambaMinMax,
    QuambaPercentile,
    Reservoir,
    StreamHistogram,
    abs_tail,
    ema,
    observe_batch,
    replay_percentile,
    tail_length,
    tail_quantiles,
)


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


def test_quamba_percentile_is_the_float32_ema_of_per_sample_torch_quantiles():
    data, alphas = batches(), [0.99, 0.9995]
    observer = QuambaPercentile(alphas)
    for x in data:
        observer.update(x)
    for alpha in alphas:
        expected = None
        for x in data:
            t = torch.quantile(x.abs().reshape(-1), alpha)  # float32, as Quamba's observer
            expected = t if expected is None else expected + 0.01 * (t - expected)  # float32 tensors
        assert observer.values[alpha] == float(expected)


def test_quamba_percentile_at_alpha_one_is_the_ema_of_per_sample_maxima_not_the_max():
    """A known stream: sample maxima 10, 1, 1, 1 -> EMA 10, 9.91, 9.8209, 9.732691 (float32), well
    below the stream maximum 10: Quamba's "1.0" clips."""
    data = [torch.tensor([10.0, -3.0]), torch.tensor([1.0, 0.5]), torch.tensor([-1.0]), torch.tensor([0.2, 1.0])]
    observer = QuambaPercentile([1.0])
    for x in data:
        observer.update(x)
    running = torch.tensor(10.0)
    for m in (1.0, 1.0, 1.0):
        running = running + 0.01 * (torch.tensor(m) - running)
    assert observer.values[1.0] == float(running) == pytest.approx(9.732691, rel=1e-6)
    assert observer.values[1.0] < max(float(x.abs().max()) for x in data)


def test_quamba_minmax_floors_each_sample_at_1e5_and_keeps_the_running_max():
    observer = QuambaMinMax()
    observer.update(torch.zeros(4))
    assert observer.value == pytest.approx(1e-5)
    observer.update(torch.tensor([-0.5, 0.25]))
    observer.update(torch.tensor([0.1]))
    assert observer.value == 0.5


@pytest.mark.parametrize("numel", [2, 7, 1000, 65_537, 300_001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tail_quantiles_equal_torch_quantile_bit_for_bit(numel, dtype):
    x = (torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 3).to(dtype)
    alphas = [0.999, 0.9995, 0.99999, 1.0]
    tail = abs_tail(x, tail_length(numel, 0.999))
    assert tail.dtype == dtype and len(tail) <= numel
    expected = torch.quantile(x.abs().float(), torch.tensor(alphas))
    assert torch.equal(tail_quantiles(tail, numel, alphas), expected)


def test_tail_quantiles_refuse_an_alpha_below_the_tail():
    x = torch.randn(10_000)
    tail = abs_tail(x, tail_length(x.numel(), 0.999))
    with pytest.raises(ValueError, match="lower min_alpha"):
        tail_quantiles(tail, x.numel(), [0.99])


@pytest.mark.parametrize("alpha", [0.999, 0.9995, 0.99973, 1.0])
def test_replay_from_stored_tails_equals_the_in_pass_observer_bit_for_bit(alpha):
    data = [x * (1 + i) for i, x in enumerate(batches(n=8))] + [torch.randn(3, 77)]  # unequal sample sizes
    observer = QuambaPercentile([alpha])
    tails, numels = [], []
    for x in data:
        observer.update(x)
        tails.append(abs_tail(x, tail_length(x.numel(), 0.999)))
        numels.append(x.numel())
    assert replay_percentile(tails, numels, alpha) == observer.values[alpha]


def test_ema_runs_in_float32():
    values = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    w = torch.tensor(1.0)
    for v in (3.0, 2.0):
        w = w + 0.01 * (torch.tensor(v) - w)
    assert ema(values).dtype == torch.float32 and float(ema(values)) == float(w)


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


def test_histogram_survives_storage():
    histogram = StreamHistogram()
    for x in batches():
        histogram.update(x)
    offset, counts = histogram.stored()
    again = StreamHistogram.from_stored(offset, counts, histogram.mantissa_bits)
    assert again.numel == histogram.numel and torch.equal(again.counts, histogram.counts)
    assert again.quantile_bracket(0.9995) == histogram.quantile_bracket(0.9995)


def fp16_extremes(seed=0):
    """fp16 activations with every kind of magnitude: zeros, subnormals, the largest finite value."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(6, 700, generator=g) * 10.0 ** torch.randint(-7, 4, (6, 700), generator=g)).half()
    x.view(-1)[:5] = torch.tensor([0.0, -0.0, 2.0 ** -24, -65504.0, 65504.0]).half()
    return x


@pytest.mark.parametrize("chunk", [StreamHistogram.HISTC_CHUNK, 1000])  # 1000: several histc calls per batch
def test_fp16_histogram_path_counts_exactly_as_bincount(monkeypatch, chunk):
    """The compact fp16 path (CUDA's, no host sync) gives the full histogram's counts bit for bit."""
    monkeypatch.setattr(StreamHistogram, "HISTC_CHUNK", chunk)
    full, compact = StreamHistogram(), StreamHistogram()
    for seed in range(3):
        x = fp16_extremes(seed)
        full.update(x)  # the CPU: bincount over all bins
        keys = x.reshape(-1).float().abs().view(torch.int32) >> compact.shift
        compact._update_fp16(keys)
        compact.numel += x.numel()
    assert torch.equal(compact.counts, full.counts) and compact.stored()[0] == full.stored()[0]
    assert torch.equal(compact.stored()[1], full.stored()[1])
    zeros = sum(int((fp16_extremes(seed) == 0).sum()) for seed in range(3))
    assert compact.fp16_fast and not StreamHistogram(7).fp16_fast  # finer bins: histc's binning would round
    assert compact.counts[0] == zeros >= 6 and compact.counts[compact.fp16_high] >= 6  # 0 and 65504 counted


def test_fused_batch_statistics_equal_the_eager_observers(monkeypatch):
    """What CUDA runs compiled with observers.FUSE_ON_CUDA, compiled here on the CPU (the fp16 path
    forced on): min, max, counts and the finite flags exactly the eager ones; the float64 sums
    to their last bits (another summation order)."""
    monkeypatch.setattr(observers, "FUSE_ON_CUDA", True)
    monkeypatch.setattr(StreamHistogram, "takes_fp16_path", lambda self, x: x.dtype == torch.float16)
    xs = [fp16_extremes(seed) for seed in range(3)]
    xs.append(xs[0].reshape(-1)[:-7])  # another length: the compiled function runs dynamic
    eager_moments, eager_histogram, fused_moments, fused_histogram = Moments(), StreamHistogram(), Moments(), \
        StreamHistogram()
    for x in xs:
        eager_moments.update(x)
        eager_histogram.update(x)  # bincount over all bins
        assert bool(observe_batch(x, fused_moments, fused_histogram))
    assert fused_histogram._fp16_counts is not None and fused_histogram._counts is None  # the fused path ran
    assert torch.equal(fused_histogram.counts, eager_histogram.counts)
    assert fused_moments.numel == eager_moments.numel == fused_histogram.numel == eager_histogram.numel
    assert (fused_moments.min, fused_moments.max) == (eager_moments.min, eager_moments.max) == (-65504.0, 65504.0)
    assert math.isclose(fused_moments.mean, eager_moments.mean, rel_tol=1e-12)
    assert math.isclose(fused_moments.std, eager_moments.std, rel_tol=1e-12)
    for bad in (float("nan"), float("inf")):
        assert not bool(observe_batch(torch.tensor([1.0, bad, -3.0]).half(), Moments(), StreamHistogram()))
