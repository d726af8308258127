"""On CUDA: calibration's observers stay on the GPU (histc histogram of fp16 activations, device
reservoir keys) and give the reference's statistics. Skipped without a GPU."""

import math

import numpy as np
import pytest
import torch
from conftest import random_model

from quamba.models import MambaConfig
from quamba.numerics import observers
from quamba.numerics.observers import Reservoir, StreamHistogram
from quamba.recipe import Recipe
from quamba.stages.calibrate import CalibrationSettings, calibrate

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_fp16_histogram_on_cuda_counts_as_the_cpu_bincount():
    g = torch.Generator().manual_seed(0)
    cpu, gpu = StreamHistogram(), StreamHistogram()
    for _ in range(3):
        x = (torch.randn(8, 512, 640, generator=g) * 10.0 ** torch.randint(-6, 4, (8, 512, 640), generator=g)).half()
        cpu.update(x)
        gpu.update(x.cuda())
    assert gpu._fp16_counts is not None and gpu._counts is None  # the fast path ran
    assert torch.equal(gpu.counts, cpu.counts) and gpu.numel == cpu.numel


def test_device_reservoir_is_seeded_and_uniform():
    total, size = 200_000, 2000

    def run(seed):
        reservoir = Reservoir(size, seed)
        for start in range(0, total, 25_000):
            reservoir.update(torch.arange(start, start + 25_000, dtype=torch.float32, device="cuda"))
        return reservoir.sample().numpy()

    a, b, c = run(0), run(0), run(1)
    assert np.array_equal(a, b) and not np.array_equal(np.sort(a), np.sort(c))
    assert a.size == size and np.unique(a).size == size
    ordered = np.sort(a) / total
    cdf = np.arange(1, size + 1) / size
    assert max(np.max(cdf - ordered), np.max(ordered - (cdf - 1 / size))) < 1.63 / math.sqrt(size)


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_calibration_on_cuda_keeps_the_reference_statistics(layer, monkeypatch):
    """The fast observers give the histograms and tails of the plain bincount path, bit for bit."""
    extra = {"d_state": 32, "headdim": 32, "chunk_size": 64} if layer == "Mamba2" else {}
    model = random_model(MambaConfig(d_model=128, n_layer=2, vocab_size=4096, layer=layer, **extra)).cuda().half()
    windows = torch.randint(0, 4096, (8, 256), generator=torch.Generator().manual_seed(0)).cuda()
    settings = CalibrationSettings(num_samples=8, seq_len=256, batch_size=4)
    packed = Recipe(calibration_data="packed")  # full windows, 4 per forward
    fast = calibrate(model, list(windows.split(4)), settings, packed, progress=False)[1]

    monkeypatch.setattr(StreamHistogram, "takes_fp16_path", lambda self, x: False)  # bincount for every batch
    plain = calibrate(model, list(windows.split(4)), settings, packed, progress=False)[1]
    assert fast.keys() == plain.keys()
    for name in fast:
        assert fast[name].histogram_offset == plain[name].histogram_offset, name
        assert torch.equal(fast[name].histogram, plain[name].histogram), name
        assert (fast[name].tails is None) == (plain[name].tails is None)
        for a, b in zip(fast[name].tails or [], plain[name].tails or []):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_fused_observer_statistics_on_cuda_equal_the_eager_ones(layer, monkeypatch):
    """observers.FUSE_ON_CUDA (tap by tap): histograms, tails, min and max bit for bit; mean and std
    to the last bits of their float64 sums. Batch 1, rows of their own lengths: Quamba's setting."""
    extra = {"d_state": 32, "headdim": 32, "chunk_size": 64} if layer == "Mamba2" else {}
    model = random_model(MambaConfig(d_model=128, n_layer=2, vocab_size=4096, layer=layer, **extra)).cuda().half()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 4096, (1, int(n)), generator=g).cuda() for n in (256, 131, 256, 77)]
    settings = CalibrationSettings(num_samples=4, seq_len=256)
    runs = {}
    for fused in (False, True):
        monkeypatch.setattr(observers, "FUSE_ON_CUDA", fused)
        runs[fused] = calibrate(model, rows, settings, Recipe(), progress=False, stacked=False)
    (taps, records, _), (fused_taps, fused_records, _) = runs[False], runs[True]
    for name in taps:
        assert fused_records[name].histogram_offset == records[name].histogram_offset, name
        assert torch.equal(fused_records[name].histogram, records[name].histogram), name
        for a, b in zip(fused_records[name].tails or [], records[name].tails or []):
            assert torch.equal(a, b), name
        for key in ("numel", "min", "max", "absmax", "samples"):
            assert fused_taps[name][key] == taps[name][key], (name, key)
        for key in ("mean", "std"):
            assert math.isclose(fused_taps[name][key], taps[name][key], rel_tol=1e-9, abs_tol=1e-12), (name, key)


@pytest.mark.parametrize("layer, width", [("Mamba1", 128), ("Mamba2", 128), ("Mamba2", 160)])
def test_stacked_observers_on_cuda_give_the_per_tap_statistics(layer, width):
    """calibrate's default on CUDA (each tap point of every block at once, one histc per row)
    against tap by tap in the hooks: histograms, tails, min, max, counts and the activation samples
    bit for bit (160: out_proj's input rotated through the 40 x 40 base, stacked), mean and std to
    the last bits of their float64 sums. Batch 1, rows of their own lengths: Quamba's setting."""
    extra = {"d_state": 32, "headdim": 32, "chunk_size": 64} if layer == "Mamba2" else {}
    model = random_model(MambaConfig(d_model=width, n_layer=4, vocab_size=4096, layer=layer, **extra)).cuda().half()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 4096, (1, int(n)), generator=g).cuda() for n in (256, 131, 256, 77)]
    settings = CalibrationSettings(num_samples=4, seq_len=256, activation_samples=500)
    taps, records, samples = calibrate(model, rows, settings, Recipe(), progress=False, stacked=False)
    stacked_taps, stacked_records, stacked_samples = calibrate(model, rows, settings, Recipe(), progress=False)
    for name in taps:
        assert stacked_records[name].histogram_offset == records[name].histogram_offset, name
        assert torch.equal(stacked_records[name].histogram, records[name].histogram), name
        assert stacked_records[name].numels == records[name].numels, name
        for a, b in zip(stacked_records[name].tails or [], records[name].tails or [], strict=True):
            assert torch.equal(a, b), name
        for key in ("numel", "min", "max", "absmax", "samples", "batch_shape", "dtype"):
            assert stacked_taps[name][key] == taps[name][key], (name, key)
        for key in ("mean", "std"):
            assert math.isclose(stacked_taps[name][key], taps[name][key], rel_tol=1e-9, abs_tol=1e-12), (name, key)
    assert samples.keys() == stacked_samples.keys() and samples
    for name in samples:
        assert np.array_equal(samples[name], stacked_samples[name]), name


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_calibration_replayed_as_cuda_graphs_equals_the_eager_pass(layer, monkeypatch):
    """calibration_graphs: windows of a recurring length replayed from one captured graph give
    every statistic and activation sample of the eager forwards bit for bit (the same kernels)."""
    from quamba.stages import calibration_graphs

    extra = {"d_state": 32, "headdim": 32, "chunk_size": 64} if layer == "Mamba2" else {}
    model = random_model(MambaConfig(d_model=128, n_layer=4, vocab_size=4096, layer=layer, **extra)).cuda().half()
    g = torch.Generator().manual_seed(0)
    lengths = (256, 131, 256, 256, 131, 256, 77, 131, 256, 131)
    rows = [torch.randint(0, 4096, (1, n), generator=g).cuda() for n in lengths]
    settings = CalibrationSettings(num_samples=len(rows), seq_len=256, activation_samples=500)
    monkeypatch.setattr(calibration_graphs, "MIN_REPEATS", 3)  # 256 (5 windows) and 131 (4), not 77
    captured = []
    capture = calibration_graphs.WindowGraphs._capture
    monkeypatch.setattr(calibration_graphs.WindowGraphs, "_capture",
                        lambda self, ids: captured.append(tuple(ids.shape)) or capture(self, ids))
    eager = calibrate(model, rows, settings, Recipe(), progress=False, graphs=False)
    graphed = calibrate(model, rows, settings, Recipe(), progress=False, graphs=True)
    assert captured == [(1, 256), (1, 131)]
    (taps, records, samples), (graphed_taps, graphed_records, graphed_samples) = eager, graphed
    assert graphed_taps == taps
    for name in records:
        assert graphed_records[name].histogram_offset == records[name].histogram_offset, name
        assert torch.equal(graphed_records[name].histogram, records[name].histogram), name
        for a, b in zip(graphed_records[name].tails or [], records[name].tails or [], strict=True):
            assert torch.equal(a, b), name
    assert samples.keys() == graphed_samples.keys() and samples
    for name in samples:
        assert np.array_equal(samples[name], graphed_samples[name]), name
