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

import torch

EMA_SIGMA = 0.01  # Quamba's percentile observer moves 1% toward each batch's quantile


def abs_quantiles(x: torch.Tensor, alphas: list[float]) -> list[float]:
    """Quantiles of |x| at each alpha, linear interpolation (numpy's and torch's default).

    High quantiles need only the largest values: a top-k instead of a full sort, ~20x faster.
    """
    flat = x.detach().reshape(-1).abs().float()
    n = flat.numel()
    positions = [a * (n - 1) for a in alphas]  # 0-based positions in the ascending order
    first = math.floor(min(positions))
    if n - first <= max(n // 8, 1):
        ordered = torch.topk(flat, n - first).values.flip(0)  # the values at positions first..n-1
    else:  # also past torch.quantile's 2^24 limit, and with float64 positions (it rounds them to float32)
        ordered, first = flat.sort().values, 0
    result = []
    for pos in positions:
        lo, hi = math.floor(pos) - first, math.ceil(pos) - first
        result.append(torch.lerp(ordered[lo], ordered[hi], pos - math.floor(pos)).item())
    return result


class Moments:
    """Exact first and second moments and extremes of a stream of tensors."""

    def __init__(self) -> None:
        self.numel, self.total, self.total_sq = 0, 0.0, 0.0
        self.min, self.max = math.inf, -math.inf

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1)
        self.numel += flat.numel()
        self.total += torch.sum(flat, dtype=torch.float64).item()
        self.total_sq += torch.linalg.vector_norm(flat, dtype=torch.float64).item() ** 2
        low, high = torch.aminmax(flat)
        self.min = min(self.min, float(low))
        self.max = max(self.max, float(high))

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max))

    @property
    def mean(self) -> float:
        return self.total / self.numel

    @property
    def std(self) -> float:
        """Population standard deviation."""
        return math.sqrt(max(self.total_sq / self.numel - self.mean ** 2, 0.0))


class QuambaPercentile:
    """Quamba's percentile observer, for several alphas (each < 1) at once."""

    def __init__(self, alphas: list[float]):
        self.alphas = sorted(alphas)
        self.values: dict[float, float] = {}

    def update(self, x: torch.Tensor) -> None:
        batch = abs_quantiles(x, self.alphas)
        for alpha, t in zip(self.alphas, batch):
            w = self.values.get(alpha)
            self.values[alpha] = t if w is None else w + EMA_SIGMA * (t - w)


class StreamHistogram:
    """Counts of |x| per float32 bin: sign dropped, the 8 exponent bits and the first
    `mantissa_bits` mantissa bits select the bin. Zero and subnormals fall in the lowest bins."""

    def __init__(self, mantissa_bits: int = 6):
        self.mantissa_bits = mantissa_bits
        self.shift = 23 - mantissa_bits  # float32 has 23 mantissa bits
        self.nbins = 1 << (8 + mantissa_bits)
        self.counts = torch.zeros(self.nbins, dtype=torch.float64)
        self.numel = 0

    @property
    def bins_per_octave(self) -> int:
        return 1 << self.mantissa_bits

    def update(self, x: torch.Tensor) -> None:
        bits = x.detach().reshape(-1).float().abs().view(torch.int32)
        self.counts += torch.bincount(bits >> self.shift, minlength=self.nbins).double().cpu()
        self.numel += x.numel()

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
        self.keys = torch.empty(0, dtype=torch.float64)
        self.values = torch.empty(0, dtype=torch.float32)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1)
        if self.keys.numel() < self.size or flat.numel() < 4 * self.size:
            keys = torch.rand(flat.numel(), dtype=torch.float64, generator=self.generator)
            values = flat.float().cpu()
        else:
            keys, values = self._entrants(flat)
        keys = torch.cat([self.keys, keys])
        values = torch.cat([self.values, values])
        if keys.numel() > self.size:
            order = keys.topk(self.size, largest=False, sorted=False).indices
            keys, values = keys[order], values[order]
        self.keys, self.values = keys, values

    def _entrants(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Only values whose key would fall below the sample's largest key tau can enter. Their
        number is Binomial(m, tau), their positions a uniform subset, their keys uniform on
        (0, tau): the same law as drawing m keys, at the cost of the entrants alone."""
        m, tau = flat.numel(), self.keys.max().item()
        count = int(torch.binomial(torch.tensor(float(m), dtype=torch.float64),
                                   torch.tensor(tau, dtype=torch.float64), generator=self.generator))
        draws = torch.randint(m, (2 * count + 16,), generator=self.generator)
        while torch.unique(draws).numel() < count:  # rare: draw more until enough distinct positions
            draws = torch.cat([draws, torch.randint(m, (count + 16,), generator=self.generator)])
        # first occurrence of each position, kept in draw order: uniform sampling without replacement
        unique, inverse = torch.unique(draws, return_inverse=True)
        first_seen = torch.full((unique.numel(),), draws.numel(), dtype=torch.long)
        first_seen.scatter_reduce_(0, inverse, torch.arange(draws.numel()), reduce="amin")
        positions = unique[first_seen.argsort()[:count]]
        keys = torch.rand(count, dtype=torch.float64, generator=self.generator) * tau
        return keys, flat[positions.to(flat.device)].float().cpu()

    def sample(self) -> torch.Tensor:
        """The sample, ordered by key: a random order, the same for the same seed and stream."""
        return self.values[self.keys.argsort()]
