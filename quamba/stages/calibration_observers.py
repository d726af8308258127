"""What the calibration pass keeps about each tap, observed two ways with the same results.

- `TapObserver`: one tap, batch by batch, from inside its forward hook (the reference).
- `StackedObservers`: the same statistics of the same taps, but a hook only keeps the tap's
  tensor; after each forward the tensors of one tap point (say x_conv_out:input) from every block
  are stacked as rows and observed at once. A batch-1 window of mamba2-2.7b has 64 blocks x 11
  taps; per tap the reference launches about twenty small kernels and their Python dispatches,
  which set calibration's speed on a GPU (bench/README.md), where the stack needs about twenty per
  point plus one histogram kernel per row on CUDA. The cost is memory: one window's tap tensors
  of every block stay alive until its forward ends (about 1.6 GB at mamba2-2.7b x 512 tokens).

Stacking changes no value: histograms, tails, min, max, counts and finiteness are the
reference's bit for bit, and the float64 sums too on the CPU (row-wise reductions of the same
values; tests/test_calibration.py); on CUDA the sums may differ in their last bits, as CUDA's
own summation orders do. Activation samples are drawn by each tap's reservoir from the tap's own
tensors in window order, as the reference draws them.
"""

from __future__ import annotations

import torch

from quamba.formats.calibration import TapRecord
from quamba.models.taps import Tap
from quamba.numerics.hadamard import hadamard_transform
from quamba.numerics.observers import (
    Moments,
    Reservoir,
    StreamHistogram,
    abs_tail,
    batch_moments,
    compact_fp16_keys,
    float32_keys,
    observe_batch,
    tail_length,
)

STACK_ELEMENTS = 1 << 26  # values stacked at once (a few bytes of temporaries each)


class TapObserver:
    """Everything observed at one tap: moments, the stream histogram, the activation sample and,
    at percentile taps, each sample's tail of largest |x|."""

    def __init__(self, tap: Tap, percentile: bool, min_alpha: float, mantissa_bits: int, hadamard: str,
                 reservoir: Reservoir | None):
        self.tap, self.percentile, self.min_alpha, self.hadamard = tap, percentile, min_alpha, hadamard
        self.moments, self.histogram, self.reservoir = Moments(), StreamHistogram(mantissa_bits), reservoir
        self.tails: list[torch.Tensor] = []  # per sample, descending, in the activations' dtype
        self.numels: list[int] = []
        self.finite: list[torch.Tensor] = []  # per sample, a bool on the device: no host sync per batch
        self.shape: list[int] = []
        self.dtype: str | None = None  # of the values observed: Quamba's min/max observer divides in it

    def observed(self, x: torch.Tensor) -> torch.Tensor:
        """x as the quantizer sees it: after the Hadamard rotation Quamba inserts at rotated taps."""
        return hadamard_transform(x, self.hadamard) if self.tap.rotated else x

    def update(self, x: torch.Tensor) -> None:
        x = self.observed(x)
        self.shape, self.dtype = list(x.shape), dtype_name(x.dtype)
        self.finite.append(observe_batch(x, self.moments, self.histogram))  # NaN/inf in x make its sums so
        if self.percentile:
            self.tails.append(abs_tail(x, tail_length(x.numel(), self.min_alpha)))
            self.numels.append(x.numel())
        if self.reservoir is not None:
            self.reservoir.update(x)

    def first_nonfinite_sample(self) -> int | None:
        bad = (~torch.stack(self.finite)).nonzero()
        return int(bad[0]) if bad.numel() else None

    def summary(self) -> dict:
        """stats.json's entry for this tap (alpha-free)."""
        m = self.moments
        entry = {"observer": "percentile" if self.percentile else "minmax", "rotated": self.tap.rotated,
                 "batch_shape": self.shape, "dtype": self.dtype, "samples": len(self.finite),
                 "numel": m.numel, "min": m.min, "max": m.max, "absmax": m.absmax, "mean": m.mean, "std": m.std}
        if self.percentile:
            entry["tail_values"] = sum(len(t) for t in self.tails)
        return entry

    def record(self) -> TapRecord:
        """calibration.safetensors' entry for this tap."""
        offset, counts = self.histogram.stored()
        if not self.percentile:
            return TapRecord(offset, counts, None, None)
        return TapRecord(offset, counts, [t.cpu() for t in self.tails], list(self.numels))


class PointRows:
    """One tap point's observers, a row each (its taps in forward order, one per block): running
    statistics held as stacks, one row per tap, filled by `observe` and handed back to the
    TapObservers by `finish`."""

    def __init__(self, observers: list[TapObserver]):
        self.observers = observers
        self.percentile = observers[0].percentile
        self.histogram = observers[0].histogram  # the bins' layout, the same for every row
        self.started = False
        self.sums = self.low = self.high = None  # (rows, 2) float64, (rows,), (rows,)
        self.counts: torch.Tensor | None = None  # (rows, nbins) int64: bincount of the float32 keys
        self.fp16_counts: torch.Tensor | None = None  # (rows, fp16 bins) int64: histc's fast path
        self.finite: list[torch.Tensor] = []  # per window, (rows,) bool
        self.tails: list[torch.Tensor] = []  # per window, (rows, k), descending
        self.numels: list[int] = []  # per window, the values of one row
        self.shape: list[int] = []
        self.dtype: str | None = None

    def observe(self, tensors: list[torch.Tensor]) -> None:
        """One window's tensors of this point, a row each, in row order (as the taps gave them:
        rotated here, at rotated points, a stack at a time)."""
        if len(tensors) != len(self.observers) or len({(t.shape, t.dtype) for t in tensors}) != 1:
            raise RuntimeError(f"calibration: tap point {self.observers[0].tap.point} gave "
                               f"{[tuple(t.shape) for t in tensors]} in one forward; expected one tensor "
                               f"of one shape from each of its {len(self.observers)} taps")
        self.shape, self.dtype, numel = list(tensors[0].shape), dtype_name(tensors[0].dtype), tensors[0].numel()
        chunk = max(1, STACK_ELEMENTS // max(numel, 1))
        parts = []
        for start in range(0, len(tensors), chunk):
            stack = self.observers[0].observed(torch.stack([t.detach() for t in tensors[start:start + chunk]]))
            parts.append(self._rows(stack.reshape(stack.shape[0], -1)))
            for obs, x in zip(self.observers[start:start + chunk], stack):
                if obs.reservoir is not None:
                    obs.reservoir.update(x)
        sums, low, high, finite, counts, fp16_counts, tails = (
            _joined([p[j] for p in parts]) for j in range(7))
        if not self.started:
            self.sums, self.low, self.high, self.started = sums, low, high, True
        else:
            self.sums += sums
            torch.minimum(self.low, low, out=self.low)
            torch.maximum(self.high, high, out=self.high)
        if counts is not None:
            self.counts = counts if self.counts is None else self.counts.add_(counts)
        if fp16_counts is not None:
            self.fp16_counts = fp16_counts if self.fp16_counts is None else self.fp16_counts.add_(fp16_counts)
        self.finite.append(finite)
        self.numels.append(numel)
        if tails is not None:
            self.tails.append(tails)

    def _rows(self, rows: torch.Tensor) -> tuple:
        """The statistics of stacked rows (r, numel): (sums, min, max, finite, bincounts, fp16
        counts, tails), each row's exactly what the reference computes from it alone."""
        sums, low, high = batch_moments(rows)
        finite = torch.isfinite(sums).all(dim=1)  # NaN/inf in a row make its sums so
        histogram = self.histogram
        keys = float32_keys(rows, histogram.shift)
        counts = fp16_counts = None
        if histogram.takes_fp16_path(rows):
            fp16_counts = histogram.compact_row_counts(compact_fp16_keys(keys, histogram.fp16_low))
        else:
            offsets = torch.arange(rows.shape[0], device=rows.device)[:, None] * histogram.nbins
            flat = (keys.long() + offsets).reshape(-1)
            counts = torch.bincount(flat, minlength=rows.shape[0] * histogram.nbins).view(rows.shape[0], -1)
        tails = None
        if self.percentile:
            length = tail_length(rows.shape[1], self.observers[0].min_alpha)
            tails = torch.topk(rows.abs(), length, dim=1, sorted=True).values
        return sums, low, high, finite, counts, fp16_counts, tails

    def finish(self) -> None:
        """Give each row's statistics to its TapObserver, on the CPU (once per point)."""
        if not self.started:
            return
        sums, low, high = self.sums.cpu(), self.low.cpu(), self.high.cpu()
        counts = None if self.counts is None else self.counts.cpu()
        fp16_counts = None if self.fp16_counts is None else self.fp16_counts.cpu()
        finite = torch.stack(self.finite).cpu()  # (windows, rows)
        tails = [t.cpu() for t in self.tails]
        numel = sum(self.numels)
        for i, obs in enumerate(self.observers):
            obs.moments.set_running(sums[i], low[i], high[i], numel)
            obs.histogram.set_counts(None if counts is None else counts[i],
                                     None if fp16_counts is None else fp16_counts[i], numel)
            obs.finite = list(finite[:, i])
            obs.shape, obs.dtype = list(self.shape), self.dtype
            if self.percentile:
                obs.tails = [window[i].clone() for window in tails]
                obs.numels = list(self.numels)


def dtype_name(dtype: torch.dtype) -> str:
    """stats.json's name of a dtype: "float16", "float32", ..."""
    return str(dtype).removeprefix("torch.")


def _joined(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The row chunks' results as one stack (None where the chunks have none)."""
    if parts[0] is None:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class StackedObservers:
    """The TapObservers of a calibration pass, observed a tap point at a time (module docstring):
    `keep(name, x)` from a tap's forward hook, `end_window()` after each forward, `finish()` once."""

    def __init__(self, observers: dict[str, TapObserver]):
        self.observers = observers
        by_point: dict[str, list[str]] = {}
        for name, obs in observers.items():
            by_point.setdefault(obs.tap.point, []).append(name)
        self.points = {point: PointRows([observers[n] for n in names]) for point, names in by_point.items()}
        self.pending: dict[str, list[torch.Tensor]] = {point: [] for point in self.points}

    def keep(self, name: str, x: torch.Tensor) -> None:
        self.pending[self.observers[name].tap.point].append(x)

    def end_window(self) -> None:
        for point, tensors in self.pending.items():
            if tensors:
                self.points[point].observe(tensors)
            self.pending[point] = []

    def finish(self) -> None:
        for rows in self.points.values():
            rows.finish()
