"""How busy the GPU was while a block of code ran: nvidia-smi's utilization.gpu (the share of
each sample period in which a kernel ran), sampled every 100 ms, averaged.

    with GpuBusy() as busy:
        work()
    print(busy.fraction)   # None where nvidia-smi is missing
"""

from __future__ import annotations

import os
import shutil
import subprocess


class GpuBusy:
    def __init__(self, period_ms: int = 100):
        self.period_ms = period_ms
        self.samples: list[float] = []
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> GpuBusy:
        if shutil.which("nvidia-smi"):
            index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
            self._proc = subprocess.Popen(
                ["nvidia-smi", "-i", index, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", str(self.period_ms)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            out, _ = self._proc.communicate()
            self.samples = [float(line) for line in out.split() if line.strip().replace(".", "", 1).isdigit()]

    @property
    def fraction(self) -> float | None:
        return sum(self.samples) / (100 * len(self.samples)) if self.samples else None
