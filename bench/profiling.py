"""Shared bench helpers: a random checkpoint of a real architecture, and a torch profile of one
call printed as the ops that took the most time (to find out where a stage's time goes)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType

from quamba.models.random_checkpoint import write_random_checkpoint


def random_model_dir(arch: str, layers: int | None, root: Path) -> Path:
    """A random-weight checkpoint of `arch` (its first `layers` blocks) under root."""
    return write_random_checkpoint(arch, root / f"{arch}-{layers or 'all'}", n_layer=layers)


def profile(fn, label: str, rows: int = 40) -> None:
    """Run fn once under torch.profiler; print the top ops by device time and by host time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    table = prof.key_averages()
    print(f"== profile: {label}", file=sys.stderr)
    if torch.cuda.is_available():
        kernels = [event for event in table if event.device_type == DeviceType.CUDA]
        print(f"device kernels launched: {sum(event.count for event in kernels)} of {len(kernels)} kinds, "
              f"{sum(event.self_device_time_total for event in kernels) / 1e3:.3f} ms of device time", file=sys.stderr)
        print(table.table(sort_by="self_cuda_time_total", row_limit=rows), file=sys.stderr)
    print(table.table(sort_by="self_cpu_time_total", row_limit=rows), file=sys.stderr)
