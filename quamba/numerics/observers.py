"""Observers: what calibration learns about one tensor stream, for every percentile at once.

- `Moments`: exact numel, min, max, mean and std (float64 accumulators).
- `QuambaPercentile`, `QuambaMinMax`: Quamba's observers as its code runs them. Per sample
  t = torch.quantile(|x| in float32, alpha); the running value starts at the first t and follows
  w += 0.01 (t - w) in float32, alpha 1.0 included (an EMA of per-sample maxima, so it clips).
  Min/max: the running max of each sample's absmax clamped at 1e-5.
- `abs_tail`, `tail_quantiles`, `ema`: the same percentile from a stored tail of each sample's
  largest |x|, for any alpha >= the tail's min_alpha after the fact, bit for bit.
- `StreamHistogram`: the estimator of the true stream percentile. It counts |x| by the top bits
  of its float32 pattern (exponent and the first mantissa bits): 2^mantissa_bits bins per
  octave, so any quantile it returns lies in a bracket whose ends differ by at most a factor
  1 + 2^-mantissa_bits (1.56% at the default 6 bits), and the share of values above any
  threshold is known to within the mass of one bin, which it reports. One bincount per batch.
- `Reservoir`: a uniform sample of n values from the whole stream (bottom-k of seeded random
  keys), deterministic for a seed and the order of the stream.
- `observe_batch`: one batch into a tap's moments and histogram; on CUDA (`FUSE_ON_CUDA`) as one
  compiled kernel and a histc instead of about fifteen kernels, for calibration's launch-bound
  batch-1 loop.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from quamba.numerics.quantizers import compiled

# On CUDA, fp16 batches: moments, finiteness and histogram keys as one compiled kernel
# (`observe_batch`). Off until tests/test_cuda_calibration.py's equality test has run on a GPU
# (on the CPU the compiled function equals the eager one: tests/test_observers.py).
FUSE_ON_CUDA = False
EMA_SIGMA = 0.01  # Quamba's percentile observer moves 1% toward each sample's quantile
ABSMAX_FLOOR = 1e-5  # Quamba's min/max observer clamps each sample's absmax here (the percentile has no floor)


def quantile_positions(numel: int, alphas: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where torch.quantile(x, alpha) of a float32 x with `numel` values reads its sorted input:
    (below, above, weight) per alpha. The rank alpha * (numel - 1) is computed in float32, as
    torch does for a float32 input, so the positions (not only the values) are torch's."""
    last = torch.tensor(numel - 1, dtype=torch.float32)
    ranks = torch.tensor(alphas, dtype=torch.float32) * last
    below, above = ranks.floor(), ranks.ceil()
    # float32(numel - 1) can round up past the last index beyond 2^24 values (torch.quantile refuses those)
    return below.clamp(max=numel - 1).long(), above.clamp(max=numel - 1).long(), ranks - below


@functools.lru_cache(maxsize=4096)  # one value per window length: no small CPU tensors per batch
def tail_length(numel: int, min_alpha: float) -> int:
    """How many of the largest values answer every alpha >= min_alpha: numel - floor(rank)."""
    below, _, _ = quantile_positions(numel, [min_alpha])
    return numel - int(below)


def abs_tail(x: torch.Tensor, length: int) -> torch.Tensor:
    """The `length` largest |x|, descending, in x's dtype (1-D): the values a high quantile reads."""
    return torch.topk(x.detach().reshape(-1).abs(), length, sorted=True).values


def tail_quantiles(tail: torch.Tensor, numel: int, alphas: list[float]) -> torch.Tensor:
    """torch.quantile(|x| in float32, alpha) for each alpha, bit for bit, from the descending tail
    of |x| (abs_tail) and numel: the same two order statistics, the same float32 lerp.
    Unlike torch.quantile it also works past 2^24 values."""
    below, above, weight = quantile_positions(numel, alphas)
    if int(below.min()) < numel - tail.numel():
        raise ValueError(f"tail_quantiles: a tail of {tail.numel()} of {numel} values cannot answer alpha "
                         f"{min(alphas)}; store a longer tail (a lower min_alpha)")
    descending = tail.float()
    low = descending[(numel - 1 - below).to(tail.device)]  # ascending position i is descending numel - 1 - i
    high = descending[(numel - 1 - above).to(tail.device)]
    return torch.lerp(low, high, weight.to(tail.device))  # (alphas,) float32


def ema(values: torch.Tensor) -> torch.Tensor:
    """Quamba's running value over samples (samples, ...) in float32: w = v_0, then w += 0.01 (v - w)."""
    running = values[0].float()
    for value in values[1:].float():
        running = running + EMA_SIGMA * (value - running)
    return running


class QuambaPercentile:
    """Quamba's percentile observer as it runs in Quamba, for several alphas (1.0 included):
    per sample t = torch.quantile(|x| in float32, alpha), then the float32 EMA of those. It is
    not the percentile of the stream: it depends on how the stream is cut into samples. The
    reference the stored tails (`abs_tail` + `tail_quantiles` + `ema`) must equal bit for bit."""

    def __init__(self, alphas: list[float]):
        self.alphas = sorted(alphas)
        self.per_sample: list[torch.Tensor] = []  # (alphas,) float32 per sample

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).abs().float()
        q = torch.tensor(self.alphas, dtype=torch.float32, device=flat.device)
        self.per_sample.append(torch.quantile(flat, q).cpu())

    @property
    def values(self) -> dict[float, float]:
        return dict(zip(self.alphas, ema(torch.stack(self.per_sample)).tolist()))


class QuambaMinMax:
    """Quamba's min/max observer: per sample m = clamp(absmax(x), 1e-5), the running max of m, all
    in x's dtype (fp16 on its fp16 model), and the scale m / 127 divided in that dtype too."""

    def __init__(self) -> None:
        self._running: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        m = x.detach().abs().amax().clamp(min=ABSMAX_FLOOR)
        self._running = m if self._running is None else torch.maximum(self._running, m)

    @property
    def value(self) -> float:
        return float(self._running)

    @property
    def scale(self) -> float:
        """The int8 scale as Quamba's observer returns it: (m / 127) in x's dtype, then float32,
        floored at 1e-6."""
        return float((self._running / 127).float().clamp(min=1e-6))


class Moments:
    """Exact first and second moments and extremes of a stream of tensors (accumulated on the
    tensors' device in float64; read them after the stream)."""

    def __init__(self) -> None:
        self.numel = 0
        self._sums: torch.Tensor | None = None  # (sum, sum of squares), float64
        self._low: torch.Tensor | None = None
        self._high: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """Add a batch; returns its (sum, sum of squares), finite exactly when every value is."""
        sums, low, high = batch_moments(x.detach().reshape(-1))
        self.numel += x.numel()
        if self._sums is None:
            self._sums, self._low, self._high = sums, low, high
        else:
            self._sums = self._sums + sums
            self._low, self._high = torch.minimum(self._low, low), torch.maximum(self._high, high)
        return sums

    def running(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sums, min, max) so far; before any batch their identities 0, +inf, -inf on like's device."""
        if self._sums is None:
            return (torch.zeros(2, dtype=torch.float64, device=like.device),
                    torch.full((), float("inf"), dtype=like.dtype, device=like.device),
                    torch.full((), float("-inf"), dtype=like.dtype, device=like.device))
        return self._sums, self._low, self._high

    def set_running(self, sums: torch.Tensor, low: torch.Tensor, high: torch.Tensor, added: int) -> None:
        """The running values after `added` more values were folded in elsewhere."""
        self._sums, self._low, self._high = sums, low, high
        self.numel += added

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


def batch_moments(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum, sum of squares) in float64, min and max of one flat batch, or of each row of a
    stack of them (r, numel): (r, 2), (r,), (r,)."""
    sums = torch.stack([torch.sum(flat, dim=-1, dtype=torch.float64),
                        torch.linalg.vector_norm(flat, dim=-1, dtype=torch.float64).square()], dim=-1)
    low, high = torch.aminmax(flat, dim=-1)
    return sums, low, high


class StreamHistogram:
    """Counts of |x| per float32 bin: sign dropped, the 8 exponent bits and the first
    `mantissa_bits` mantissa bits select the bin. Zero and subnormals fall in the lowest bins.

    On CUDA, fp16 activations take a faster path with the same counts: their |x| is 0 or lies
    in [2^-24, 65504], a few thousand of the bins, whose compact histogram fits a GPU block's
    shared memory; torch.histc counts it with no host sync (torch.bincount of all 2^14 bins
    counts in global memory and syncs twice per call). Counts are integers held in float32
    there, exact because no chunk counted at once holds 2^24 values or more."""

    HISTC_CHUNK = 1 << 24  # values per histc call: float32 counts stay exact

    def __init__(self, mantissa_bits: int = 6):
        self.mantissa_bits = mantissa_bits
        self.shift = 23 - mantissa_bits  # float32 has 23 mantissa bits
        self.nbins = 1 << (8 + mantissa_bits)
        self._counts: torch.Tensor | None = None  # int64 over all bins, on the stream's device
        self._fp16_counts: torch.Tensor | None = None  # int64 over the fp16 bins (fast path)
        self.numel = 0
        # the bins finite fp16 magnitudes fall in: 0 (bin 0) and [2^-24, 65504]
        self.fp16_low = _float32_key(2.0 ** -24, self.shift)
        self.fp16_high = _float32_key(65504.0, self.shift)
        # histc bins a value k at float32 (k + 0.5) n / n: exact while 2 n^2 < 2^24 (mantissa_bits <= 6)
        n = self.fp16_high - self.fp16_low + 2
        self.fp16_fast = 2 * n * n < 1 << 24

    @property
    def bins_per_octave(self) -> int:
        return 1 << self.mantissa_bits

    def takes_fp16_path(self, x: torch.Tensor) -> bool:
        """Whether a batch is counted by the fp16 fast path (histc on CUDA)."""
        return (x.is_cuda and x.dtype == torch.float16 and self.fp16_fast
                and not torch.are_deterministic_algorithms_enabled())

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1)
        keys = float32_keys(flat, self.shift)
        if self.takes_fp16_path(flat):
            self._update_fp16(keys)
        else:
            counts = torch.bincount(keys, minlength=self.nbins)
            self._counts = counts if self._counts is None else self._counts + counts
        self.numel += flat.numel()

    def _update_fp16(self, keys: torch.Tensor) -> None:
        self.add_compact(compact_fp16_keys(keys, self.fp16_low))

    def add_compact(self, compact: torch.Tensor) -> None:
        """Count compact fp16 keys (`compact_fp16_keys`) by histc, no host sync; the caller adds numel."""
        counts = self.compact_counts(compact)
        self._fp16_counts = counts if self._fp16_counts is None else self._fp16_counts + counts

    def compact_counts(self, compact: torch.Tensor) -> torch.Tensor:
        """int64 counts of compact fp16 keys over the fp16 bins, by histc in exact chunks."""
        n = self.fp16_high - self.fp16_low + 2
        return sum(torch.histc(chunk, bins=n, min=-0.5, max=n - 0.5).long()
                   for chunk in compact.split(self.HISTC_CHUNK))

    def compact_row_counts(self, rows: torch.Tensor) -> torch.Tensor:
        """`compact_counts` of each row of (r, numel) compact keys, (r, fp16 bins) int64: one histc
        per row and one cast for all where a row's counts are exact in float32."""
        if rows.shape[1] >= self.HISTC_CHUNK:
            return torch.stack([self.compact_counts(row) for row in rows])
        n = self.fp16_high - self.fp16_low + 2
        return torch.stack([torch.histc(row, bins=n, min=-0.5, max=n - 0.5) for row in rows]).long()

    def set_counts(self, counts: torch.Tensor | None, fp16_counts: torch.Tensor | None, numel: int) -> None:
        """The histogram as counted elsewhere (by rows of a stack): counts over all bins and over
        the fp16 bins, either None where that path counted nothing."""
        self._counts, self._fp16_counts, self.numel = counts, fp16_counts, numel

    def _all_counts(self) -> torch.Tensor:
        """int64 counts over all bins, both paths merged."""
        counts = self._counts
        if self._fp16_counts is not None:
            full = torch.zeros(self.nbins, dtype=torch.int64, device=self._fp16_counts.device)
            full[0] = self._fp16_counts[0]
            full[self.fp16_low:self.fp16_high + 1] = self._fp16_counts[1:]
            counts = full if counts is None else counts + full.to(counts.device)
        return counts

    @property
    def counts(self) -> torch.Tensor:
        """Counts per bin as float64 on the CPU (read after the stream)."""
        return self._all_counts().double().cpu()

    def stored(self) -> tuple[int, torch.Tensor]:
        """(first nonempty bin, int64 counts from there to the last nonempty one): what is kept."""
        counts = self._all_counts().cpu()
        nonzero = counts.nonzero()
        first, last = int(nonzero[0]), int(nonzero[-1])
        return first, counts[first:last + 1].clone()

    @classmethod
    def from_stored(cls, offset: int, counts: torch.Tensor, mantissa_bits: int) -> StreamHistogram:
        """The histogram again, from `stored()`'s output."""
        histogram = cls(mantissa_bits)
        full = torch.zeros(histogram.nbins, dtype=torch.int64)
        full[offset:offset + counts.numel()] = counts
        histogram._counts, histogram.numel = full, int(full.sum())
        return histogram

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


def float32_keys(flat: torch.Tensor, shift: int) -> torch.Tensor:
    """The bin of each |x|: its float32 bit pattern shifted right by `shift` (int32)."""
    return flat.float().abs().view(torch.int32) >> shift


def compact_fp16_keys(keys: torch.Tensor, fp16_low: int) -> torch.Tensor:
    """Bin 0 -> compact 0, bins fp16_low.. -> 1.., as float32 for histc. Non-finite values (their
    key is past the last fp16 bin) fall outside histc's range: calibration refuses them anyway."""
    return torch.where(keys == 0, 0, keys - (fp16_low - 1)).float()


def _fp16_batch_statistics(flat: torch.Tensor, sums: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                           shift: int, fp16_low: int):
    """One fp16 batch of a tap, as `observe_batch` compiles it: the running sums, min and max with
    the batch added, whether the batch's sums are finite, and its compact histogram keys."""
    batch, b_low, b_high = batch_moments(flat)
    compact = compact_fp16_keys(float32_keys(flat, shift), fp16_low)
    return sums + batch, torch.minimum(low, b_low), torch.maximum(high, b_high), torch.isfinite(batch).all(), compact


def observe_batch(x: torch.Tensor, moments: Moments, histogram: StreamHistogram) -> torch.Tensor:
    """Add one batch to a tap's moments and histogram; returns a device bool: the batch's sums are
    finite (NaN or inf anywhere make them so). With FUSE_ON_CUDA an fp16 CUDA batch runs as one
    compiled kernel plus histc; min, max and the counts are exactly the eager ones, the float64
    sums may differ in the last bits (another summation order, as CUDA's eager one is too)."""
    flat = x.detach().reshape(-1)
    if not (FUSE_ON_CUDA and histogram.takes_fp16_path(flat)):
        finite = torch.isfinite(moments.update(flat)).all()
        histogram.update(flat)
        return finite
    fused = compiled(_fp16_batch_statistics, shift=histogram.shift, fp16_low=histogram.fp16_low)
    sums, low, high, finite, compact = fused(flat, *moments.running(flat))
    moments.set_running(sums, low, high, flat.numel())
    histogram.add_compact(compact)
    histogram.numel += flat.numel()
    return finite


def _float32_key(value: float, shift: int) -> int:
    """The bin of a float32 magnitude: its bit pattern shifted right by `shift`."""
    return int(torch.tensor(value, dtype=torch.float32).view(torch.int32)) >> shift


class Reservoir:
    """A uniform random sample of `size` values from a stream: keep the values with the
    smallest of independent uniform keys (bottom-k sampling), drawn from a seeded generator.

    On the CPU only the keys that can enter are drawn (their law, not one key per value). A
    CUDA stream draws a key for every value on the device with the device's generator and keeps
    the bottom keys with topk: no host sync, nothing leaves the GPU until `sample()`. Same law,
    a different random stream: a CUDA run samples other values than a CPU run of the same seed."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.scalar_rng = np.random.default_rng(seed)  # the one Beta draw per large first batch
        self.device_generator: torch.Generator | None = None  # made on the first CUDA batch
        self.keys = torch.empty(0, dtype=torch.float64)
        self.values = torch.empty(0, dtype=torch.float32)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1)
        if flat.is_cuda:
            self._update_on_device(flat)
            return
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

    def _update_on_device(self, flat: torch.Tensor) -> None:
        if self.device_generator is None or self.keys.device != flat.device:
            self.device_generator = torch.Generator(device=flat.device).manual_seed(self.seed)
            self.keys, self.values = self.keys.to(flat.device), self.values.to(flat.device)
        keys = torch.rand(flat.numel(), dtype=torch.float64, device=flat.device, generator=self.device_generator)
        values = flat.float()
        if keys.numel() > self.size:
            keys, order = keys.topk(self.size, largest=False, sorted=False)
            values = values[order]
        keys, values = torch.cat([self.keys, keys]), torch.cat([self.values, values])
        if keys.numel() > self.size:
            keys, order = keys.topk(self.size, largest=False, sorted=False)
            values = values[order]
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
        """The sample on the CPU, ordered by key: a random order, the same for the same seed and stream."""
        return self.values[self.keys.argsort()].cpu()


def replay_percentile(tails: list[torch.Tensor], numels: list[int], alpha: float) -> float:
    """Quamba's percentile observer at `alpha`, replayed from stored per-sample tails: the float32
    EMA over samples of torch.quantile(|x| in float32, alpha), bit for bit (QuambaPercentile is
    the in-pass reference). All samples at once: one gather and one lerp, then the EMA."""
    numel = torch.tensor(numels, dtype=torch.int64)  # (samples,)
    lengths = torch.tensor([len(t) for t in tails], dtype=torch.int64)
    ranks = torch.tensor(alpha, dtype=torch.float32) * (numel - 1).to(torch.float32)  # as quantile_positions
    below = ranks.floor().clamp(max=(numel - 1).to(torch.float32))
    above = ranks.ceil().clamp(max=(numel - 1).to(torch.float32))
    from_top_below, from_top_above = numel - 1 - below.long(), numel - 1 - above.long()
    if bool((from_top_below >= lengths).any()):
        raise ValueError(f"replay_percentile: the stored tails cannot answer alpha {alpha}; they were kept for a "
                         f"higher min_alpha")
    starts = lengths.cumsum(0) - lengths  # where each sample's tail begins in the concatenation
    flat = torch.cat(tails).float()
    per_sample = torch.lerp(flat[starts + from_top_below], flat[starts + from_top_above], ranks - below)
    return float(ema(per_sample))
