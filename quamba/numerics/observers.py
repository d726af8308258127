"""Observers: what calibration learns about one tensor stream, for every percentile at once.

- `Moments`: exact numel, min, max, mean and std (float64 accumulators).
- `QuambaPercentile`: Quamba's observer. Per batch t = quantile(|x|, alpha); the running
  value starts at the first t and follows w += 0.01 (t - w). Depends on batch size and order;
  it is not the percentile of the stream. Answers for several alphas from one sort per batch.
- `StreamHistogram`: the estimator of the true stream percentile. It counts |x| by the top bits
  of its float32 pattern (exponent and the first mantissa bits): 2^mantissa_bits bins per
  octave, so any quantile it returns lies in a bracket whose ends differ by at most a factor
  1 + 2^-mantissa_bits (1.56% at the default 6 bits), and the share of values above any
  threshold is known to within the mass of one bin, which it reports. One bincount per batch.
- `Reservoir`: a uniform sample of n values from the whole stream (bottom-k of seeded random
  keys), deterministic for a seed and the order of the stream.
"""

from __future__ import annotations

import math

import numpy as np
import torch

EMA_SIGMA = 0.01  # Quamba's percentile observer moves 1% toward each batch's quantile


def abs_quantiles(x: torch.Tensor, alphas: list[float]) -> torch.Tensor:
    """Quantiles of |x| at each alpha (float64, on x's device), linear interpolation as numpy's
    and torch's default. High quantiles need only the largest values: a top-k instead of a full
    sort, ~20x faster. No host sync, so GPU calibration does not stall on it."""
    flat = x.detach().reshape(-1).abs().float()
    n = flat.numel()
    positions = [a * (n - 1) for a in alphas]  # 0-based positions in the ascending order
    first = math.floor(min(positions))
    if n - first <= max(n // 8, 1):
        ordered = torch.topk(flat, n - first).values.flip(0)  # the values at positions first..n-1
    else:  # also past torch.quantile's 2^24 limit, and with float64 positions (it rounds them to float32)
        ordered, first = flat.sort().values, 0
    lo = torch.tensor([math.floor(p) - first for p in positions], device=flat.device)
    hi = torch.tensor([math.ceil(p) - first for p in positions], device=flat.device)
    weight = torch.tensor([p - math.floor(p) for p in positions], dtype=torch.float64, device=flat.device)
    low, high = ordered[lo].double(), ordered[hi].double()
    return low + (high - low) * weight


class Moments:
    """Exact first and second moments and extremes of a stream of tensors (accumulated on the
    tensors' device in float64; read them after the stream)."""

    def __init__(self) -> None:
        self.numel = 0
        self._sums: torch.Tensor | None = None  # (sum, sum of squares), float64
        self._low: torch.Tensor | None = None
        self._high: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1)
        sums = torch.stack([torch.sum(flat, dtype=torch.float64),
                            torch.linalg.vector_norm(flat, dtype=torch.float64).square()])
        low, high = torch.aminmax(flat)
        self.numel += flat.numel()
        if self._sums is None:
            self._sums, self._low, self._high = sums, low, high
        else:
            self._sums = self._sums + sums
            self._low, self._high = torch.minimum(self._low, low), torch.maximum(self._high, high)

    @property
    def min(self) -> float:
        return float(self._low)

    @property
    def max(self) -> float:
        return float(self._high)

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max))

    @property
    def mean(self) -> float:
        return float(self._sums[0]) / self.numel

    @property
    def std(self) -> float:
        """Population standard deviation."""
        return math.sqrt(max(float(self._sums[1]) / self.numel - self.mean ** 2, 0.0))


class QuambaPercentile:
    """Quamba's percentile observer, for several alphas (each < 1) at once."""

    def __init__(self, alphas: list[float]):
        self.alphas = sorted(alphas)
        self._ema: torch.Tensor | None = None  # float64, one value per alpha

    def update(self, x: torch.Tensor) -> None:
        batch = abs_quantiles(x, self.alphas)
        self._ema = batch if self._ema is None else self._ema + EMA_SIGMA * (batch - self._ema)

    @property
    def values(self) -> dict[float, float]:
        return dict(zip(self.alphas, self._ema.tolist()))


class StreamHistogram:
    """Counts of |x| per float32 bin: sign dropped, the 8 exponent bits and the first
    `mantissa_bits` mantissa bits select the bin. Zero and subnormals fall in the lowest bins."""

    def __init__(self, mantissa_bits: int = 6):
        self.mantissa_bits = mantissa_bits
        self.shift = 23 - mantissa_bits  # float32 has 23 mantissa bits
        self.nbins = 1 << (8 + mantissa_bits)
        self._counts: torch.Tensor | None = None  # int64, on the stream's device
        self.numel = 0

    @property
    def bins_per_octave(self) -> int:
        return 1 << self.mantissa_bits

    def update(self, x: torch.Tensor) -> None:
        bits = x.detach().reshape(-1).float().abs().view(torch.int32)
        counts = torch.bincount(bits >> self.shift, minlength=self.nbins)
        self._counts = counts if self._counts is None else self._counts + counts
        self.numel += x.numel()

    @property
    def counts(self) -> torch.Tensor:
        """Counts per bin as float64 on the CPU (read after the stream)."""
        return self._counts.double().cpu()

    @property
    def relative_error(self) -> float:
        """Upper end / lower end - 1 of any one-bin bracket: the stated error bound of a quantile."""
        return 2.0 ** -self.mantissa_bits

    def edge(self, i: int) -> float:
        """Lower edge of bin i (upper edge of bin i - 1), exactly a float32 value."""
        return torch.tensor(min(i, self.nbins) << self.shift, dtype=torch.int32).view(torch.float32).item()

    def quantile_bracket(self, alpha: float) -> tuple[float, float]:
        """(low, high) holding the linear-interpolation quantile of |x| at alpha."""
        cumulative = self.counts.cumsum(0)
        rank = alpha * (self.numel - 1)  # 0-based position of the quantile among sorted values
        first = int(torch.searchsorted(cumulative, torch.tensor(math.floor(rank) + 1.0, dtype=torch.float64)))
        last = int(torch.searchsorted(cumulative, torch.tensor(math.ceil(rank) + 1.0, dtype=torch.float64)))
        return self.edge(first), self.edge(last + 1)

    def fraction_above(self, threshold: float) -> tuple[float, float]:
        """(estimate, max abs error) of the share of |x| > threshold. Inside the bin holding the
        threshold the values are taken as spread evenly; the error is that bin's mass."""
        i = int(torch.tensor(abs(threshold), dtype=torch.float32).view(torch.int32)) >> self.shift
        above = self.counts[i + 1:].sum().item()
        in_bin = self.counts[i].item()
        low, high = self.edge(i), self.edge(i + 1)
        share_of_bin_above = (high - threshold) / (high - low) if high > low else 0.0
        return (above + in_bin * share_of_bin_above) / self.numel, in_bin / self.numel


class Reservoir:
    """A uniform random sample of `size` values from a stream: keep the values with the
    smallest of independent uniform keys (bottom-k sampling), drawn from a seeded generator."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.scalar_rng = np.random.default_rng(seed)  # the one Beta draw per large first batch
        self.keys = torch.empty(0, dtype=torch.float64)
        self.values = torch.empty(0, dtype=torch.float32)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1)
        if flat.numel() < 4 * self.size:  # small batch: a key for every value is cheap
            keys = torch.rand(flat.numel(), dtype=torch.float64, generator=self.generator)
            values = flat.float().cpu()
        elif self.keys.numel() < self.size:
            keys, values = self._smallest_keys(flat)
        else:
            keys, values = self._entrants(flat)
        keys = torch.cat([self.keys, keys])
        values = torch.cat([self.values, values])
        if keys.numel() > self.size:
            order = keys.topk(self.size, largest=False, sorted=False).indices
            keys, values = keys[order], values[order]
        self.keys, self.values = keys, values

    def _smallest_keys(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The `size` smallest of m uniform keys, without drawing m: the (size+1)-th smallest,
        tau, is Beta(size + 1, m - size); given tau the smaller ones are uniform on (0, tau) and
        sit at a uniform subset of positions."""
        m = flat.numel()
        tau = float(self.scalar_rng.beta(self.size + 1, m - self.size))
        positions = self._distinct_positions(m, self.size)
        keys = torch.rand(self.size, dtype=torch.float64, generator=self.generator) * tau
        return keys, flat[positions.to(flat.device)].float().cpu()

    def _entrants(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Only values whose key would fall below the sample's largest key tau can enter. Their
        number is Binomial(m, tau), their positions a uniform subset, their keys uniform on
        (0, tau): the same law as drawing m keys, at the cost of the entrants alone."""
        m, tau = flat.numel(), self.keys.max().item()
        count = int(torch.binomial(torch.tensor(float(m), dtype=torch.float64),
                                   torch.tensor(tau, dtype=torch.float64), generator=self.generator))
        positions = self._distinct_positions(m, count)
        keys = torch.rand(count, dtype=torch.float64, generator=self.generator) * tau
        return keys, flat[positions.to(flat.device)].float().cpu()

    def _distinct_positions(self, m: int, count: int) -> torch.Tensor:
        """`count` distinct positions out of m, uniformly: draw with replacement, keep the first
        occurrence of each in draw order (sequential sampling without replacement)."""
        draws = torch.randint(m, (2 * count + 16,), generator=self.generator)
        while torch.unique(draws).numel() < count:  # rare: draw more until enough distinct positions
            draws = torch.cat([draws, torch.randint(m, (count + 16,), generator=self.generator)])
        unique, inverse = torch.unique(draws, return_inverse=True)
        first_seen = torch.full((unique.numel(),), draws.numel(), dtype=torch.long)
        first_seen.scatter_reduce_(0, inverse, torch.arange(draws.numel()), reduce="amin")
        return unique[first_seen.argsort()[:count]]

    def sample(self) -> torch.Tensor:
        """The sample, ordered by key: a random order, the same for the same seed and stream."""
        return self.values[self.keys.argsort()]
