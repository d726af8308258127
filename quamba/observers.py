"""Observers: what calibration learns about one tensor stream, for every percentile at once.

- `Moments`: exact numel, min, max, mean and std (float64 accumulators).
- `QuambaPercentile`: Quamba's observer. Per batch t = quantile(|x|, alpha); the running
  value starts at the first t and follows w += 0.01 (t - w). Depends on batch size and order;
  it is not the percentile of the stream. Answers for several alphas from one sort per batch.
- `LogHistogram`: the estimator of the true stream percentile. A histogram of log2|x| with
  `bins_per_octave` bins, so any quantile it returns lies in a bracket whose ends differ by a
  factor 2^(1/bins_per_octave) (1.09% at the default 64), and the share of values above any
  threshold is known to within the mass of one bin, which it reports.
- `Reservoir`: a uniform sample of n values from the whole stream (bottom-k of seeded random
  keys), deterministic for a seed and the order of the stream.
"""

from __future__ import annotations

import math

import torch

EMA_SIGMA = 0.01  # Quamba's percentile observer moves 1% toward each batch's quantile
TORCH_QUANTILE_LIMIT = 1 << 24  # torch.quantile refuses larger inputs


def abs_quantiles(x: torch.Tensor, alphas: list[float]) -> list[float]:
    """Quantiles of |x| at each alpha, linear interpolation (numpy's default definition)."""
    flat = x.detach().reshape(-1).abs().float()
    q = torch.tensor(alphas, dtype=torch.float32, device=flat.device)
    if flat.numel() <= TORCH_QUANTILE_LIMIT:
        return torch.quantile(flat, q).tolist()
    ordered = flat.sort().values  # the same definition, for tensors torch.quantile refuses
    pos = q.double() * (flat.numel() - 1)
    lo, hi = pos.floor().long(), pos.ceil().long()
    frac = (pos - lo).to(ordered.device)
    return (ordered[lo] + (ordered[hi] - ordered[lo]) * frac).tolist()


class Moments:
    """Exact first and second moments and extremes of a stream of tensors."""

    def __init__(self) -> None:
        self.numel, self.total, self.total_sq = 0, 0.0, 0.0
        self.min, self.max = math.inf, -math.inf

    def update(self, x: torch.Tensor) -> None:
        x64 = x.detach().double()
        self.numel += x.numel()
        self.total += x64.sum().item()
        self.total_sq += x64.square().sum().item()
        self.min = min(self.min, x64.min().item())
        self.max = max(self.max, x64.max().item())

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


class LogHistogram:
    """Counts of log2|x| in fixed bins over [2^-64, 2^64); smaller magnitudes (and 0) go in bin 0."""

    LOW, HIGH = -64.0, 64.0

    def __init__(self, bins_per_octave: int = 64):
        self.bins_per_octave = bins_per_octave
        self.nbins = int((self.HIGH - self.LOW) * bins_per_octave)
        self.counts = torch.zeros(self.nbins, dtype=torch.float64)
        self.numel = 0

    def update(self, x: torch.Tensor) -> None:
        log_abs = torch.log2(x.detach().abs().float().reshape(-1)).clamp_(self.LOW, self.HIGH - 1e-3)
        self.counts += torch.histc(log_abs, self.nbins, self.LOW, self.HIGH).double().cpu()
        self.numel += x.numel()

    @property
    def relative_error(self) -> float:
        """Upper end / lower end - 1 of any bracket: the stated error bound of a quantile."""
        return 2 ** (1 / self.bins_per_octave) - 1

    def edge(self, i: int) -> float:
        """Lower edge of bin i (upper edge of bin i - 1), as a magnitude."""
        return 0.0 if i <= 0 else 2 ** (self.LOW + i / self.bins_per_octave)

    def quantile_bracket(self, alpha: float) -> tuple[float, float]:
        """(low, high) holding the linear-interpolation quantile of |x| at alpha."""
        cumulative = self.counts.cumsum(0)
        rank = alpha * (self.numel - 1)  # 0-based position of the quantile among sorted values
        first = int(torch.searchsorted(cumulative, torch.tensor(math.floor(rank) + 1.0, dtype=torch.float64)))
        last = int(torch.searchsorted(cumulative, torch.tensor(math.ceil(rank) + 1.0, dtype=torch.float64)))
        return self.edge(first), self.edge(last + 1)

    def fraction_above(self, threshold: float) -> tuple[float, float]:
        """(estimate, max abs error) of the share of |x| > threshold. Inside the bin holding the
        threshold the values are taken as spread evenly in log space; the error is that bin's mass."""
        if threshold <= 0:
            return 1.0, 0.0
        position = (math.log2(threshold) - self.LOW) * self.bins_per_octave
        if position >= self.nbins:
            return 0.0, 0.0
        i = max(int(position), 0)
        above = self.counts[i + 1:].sum().item()
        in_bin = self.counts[i].item()
        share_of_bin_above = 1.0 - (position - i) if position >= 0 else 1.0
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
        flat = x.detach().reshape(-1).float().cpu()
        keys = torch.rand(flat.numel(), dtype=torch.float64, generator=self.generator)
        if self.keys.numel() == self.size:  # only values that would enter the sample matter
            keep = keys < self.keys.max()
            flat, keys = flat[keep], keys[keep]
        keys = torch.cat([self.keys, keys])
        values = torch.cat([self.values, flat])
        if keys.numel() > self.size:
            order = keys.topk(self.size, largest=False, sorted=False).indices
            keys, values = keys[order], values[order]
        self.keys, self.values = keys, values

    def sample(self) -> torch.Tensor:
        """The sample, ordered by key: a random order, the same for the same seed and stream."""
        return self.values[self.keys.argsort()]
