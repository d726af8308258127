"""One GPU per job on a multi-GPU machine: a lease on a free device, taken at the start of a GPU job.

Snakemake only counts the `gpu` resource; it never sets CUDA_VISIBLE_DEVICES, so `--resources gpu=8`
puts eight jobs on cuda:0. A job that runs `with gpu_lease(label=...)` first claims one free device
by an exclusive `flock` on `<lock_dir>/gpu-<id>.lock` and sees only that device (as cuda:0) until
the lease ends. The kernel drops a flock when its process dies, even by SIGKILL, so there are no
stale locks to clean up. Under SLURM the scheduler already assigned the device and the lease does
nothing. `jobs_per_device` > 1 lets that many jobs share one device (a lock per slot,
`gpu-<id>.slot<k>.lock` for slots after the first), so jobs that leave a big GPU mostly idle
(batch-1 calibration, model loading, lm-eval's host work) run beside each other. This module
never imports torch: CUDA must not be initialised before CUDA_VISIBLE_DEVICES is set, or the
setting has no effect.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from quamba.errors import QuambaError

__all__ = ["GPULeaseTimeout", "LOCK_DIR_ENV", "NoGPUError", "gpu_lease", "lock_holder", "release_lock", "try_lock",
           "visible_devices"]

LOCK_DIR_ENV = "QUAMBA_GPU_LOCK_DIR"  # a lock dir shared by several snakemake runs on one machine
DEFAULT_LOCK_DIR = Path(".snakemake") / "gpu-locks"  # under the current (Snakemake's work) dir
_HELD_ENV = "QUAMBA_GPU_LEASE"  # the device this process (or its parent) holds: a nested lease reuses it

log = logging.getLogger(__name__)


class NoGPUError(QuambaError):
    """There is no candidate device to lease."""


class GPULeaseTimeout(QuambaError):
    """Every candidate device stayed leased by other jobs for longer than the timeout."""


def visible_devices() -> list[str]:
    """The device ids this process may use, found without initialising CUDA.

    CUDA_VISIBLE_DEVICES when it is set (integers or GPU UUIDs, as given), else the indices that
    `nvidia-smi` lists; [] when neither names a device.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [entry.strip() for entry in env.split(",") if entry.strip()]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):  # no driver, driver/library mismatch, hung
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


@contextlib.contextmanager
def gpu_lease(label: str = "", devices: Sequence[str | int] | None = None, lock_dir: str | os.PathLike | None = None,
              timeout: float = 3600.0, poll: float = 1.0, logger: logging.Logger | None = None,
              jobs_per_device: int = 1) -> Iterator[str | None]:
    """Hold one free device of `devices` (default: the visible ones) for the block; yield its id.

    Inside the block CUDA_VISIBLE_DEVICES is that id, so later CUDA work (and child processes)
    see only it; afterwards the previous value is back. When every device is leased it waits,
    polling every `poll` s, and raises GPULeaseTimeout after `timeout` s. Lock files live in
    `lock_dir`, else $QUAMBA_GPU_LOCK_DIR, else .snakemake/gpu-locks under the current dir.
    Under SLURM (SLURM_JOB_ID set) it yields None and changes nothing: the scheduler assigned
    the device. A lease nested in one this process or its parent holds yields that device.
    jobs_per_device: how many leases one device grants at once (each a slot with its own lock);
    free slots are taken spreading over the devices first (slot 1 of every device, then slot 2).
    """
    logger = logger or log
    if "SLURM_JOB_ID" in os.environ:
        assigned = os.environ.get("CUDA_VISIBLE_DEVICES")
        logger.info("GPU lease: none taken, SLURM job %s: the scheduler assigned CUDA_VISIBLE_DEVICES=%s",
                    os.environ["SLURM_JOB_ID"], assigned)
        if assigned is not None and "," in assigned:
            logger.warning("GPU lease: this SLURM job sees several GPUs (%s); a job that does not pick one "
                           "itself runs on the first", assigned)
        yield None
        return
    held = os.environ.get(_HELD_ENV)
    if held is not None and held == os.environ.get("CUDA_VISIBLE_DEVICES"):
        logger.info("GPU lease: device %s, already held by this process or its parent", held)
        yield held
        return
    candidates = _candidates(devices)
    if timeout < 0 or poll <= 0:
        raise ValueError(f"gpu_lease: timeout must be >= 0 and poll > 0, got timeout={timeout}, poll={poll}")
    if isinstance(jobs_per_device, bool) or not isinstance(jobs_per_device, int) or jobs_per_device < 1:
        raise ValueError(f"gpu_lease: jobs_per_device must be an integer >= 1, got {jobs_per_device!r}")
    directory = Path(lock_dir if lock_dir is not None else os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR)
    directory = directory.absolute()
    directory.mkdir(parents=True, exist_ok=True)
    slots = [(device, slot) for slot in range(jobs_per_device) for device in candidates]
    (device, slot), fd, path = _acquire(slots, directory, label, timeout, poll, logger)
    previous = {name: os.environ.get(name) for name in ("CUDA_VISIBLE_DEVICES", _HELD_ENV)}
    os.environ["CUDA_VISIBLE_DEVICES"] = os.environ[_HELD_ENV] = device
    shared = f", job slot {slot + 1} of {jobs_per_device}" if jobs_per_device > 1 else ""
    logger.info("GPU lease: device %s of [%s]%s (lock %s)", device, ", ".join(candidates), shared, path)
    try:
        yield device
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        release_lock(fd)
        logger.info("GPU lease: released device %s", device)


def _candidates(devices: Sequence[str | int] | None) -> list[str]:
    """The given ids as strings, in order, without repeats; the visible ones when none are given."""
    found = visible_devices() if devices is None else [str(device).strip() for device in devices]
    found = list(dict.fromkeys(device for device in found if device))
    if not found:
        where = ("the list given (config key `gpus:`)" if devices is not None else
                 "CUDA_VISIBLE_DEVICES is set but empty" if "CUDA_VISIBLE_DEVICES" in os.environ else
                 "CUDA_VISIBLE_DEVICES is unset and `nvidia-smi --query-gpu=index` listed none (or is not on PATH)")
        raise NoGPUError(f"GPU lease: no GPU found to run this job on: {where}. Run the GPU jobs on a machine "
                         "with an NVIDIA GPU, or set device: cpu in the config")
    return found


def _lock_path(directory: Path, device: str, slot: int = 0) -> Path:
    """gpu-<id>.lock (gpu-<id>.slot<k>.lock for a shared device's later slots); characters a file
    name should not hold (a MIG id's '/') become '_'."""
    return directory / f"gpu-{re.sub(r'[^A-Za-z0-9._-]', '_', device)}{f'.slot{slot + 1}' if slot else ''}.lock"


def try_lock(path: Path, label: str) -> int | None:
    """An open descriptor holding an exclusive flock on `path`, or None when another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "label": label,
              "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(holder) + "\n").encode())
    return fd


def release_lock(fd: int) -> None:
    """Drop a `try_lock` flock: the holder record emptied, then the descriptor closed."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)  # no holder named once it is free
    os.close(fd)  # closing the last descriptor drops the flock


def lock_holder(path: Path) -> str:
    """Who holds `path`, as its holder wrote it: for messages only, the flock is the lock."""
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on {holder['host']} ({holder['label']!r}, since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown holder"  # just locked, its holder not yet written


def _acquire(slots: list[tuple[str, int]], directory: Path, label: str, timeout: float, poll: float,
             logger: logging.Logger) -> tuple[tuple[str, int], int, Path]:
    """The first free (device, slot), its locked descriptor and lock path; waits up to `timeout` s."""
    deadline = time.monotonic() + timeout
    waiting = False
    devices = list(dict.fromkeys(device for device, _ in slots))
    while True:
        for device, slot in slots:
            fd = try_lock(_lock_path(directory, device, slot), label)
            if fd is not None:
                return (device, slot), fd, _lock_path(directory, device, slot)
        holders = "; ".join(f"device {device}" + (f" slot {slot + 1}" if len(slots) > len(devices) else "")
                            + f": {lock_holder(_lock_path(directory, device, slot))}" for device, slot in slots)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GPULeaseTimeout(
                f"GPU lease for {label!r}: no device of [{', '.join(devices)}] came free within {timeout:g} s "
                f"(locks in {directory}). Holders: {holders}. Wait longer with gpu_lease(timeout=...), "
                "or run fewer GPU jobs at once (--resources gpu=N)")
        if not waiting:
            logger.info("GPU lease: every device is taken, waiting up to %g s for one. Holders: %s",
                        timeout, holders)
            waiting = True
        time.sleep(min(poll, remaining))


def lease_for(device: str | None, label: str, devices: Sequence[str | int] | None = None,
              logger: logging.Logger | None = None, jobs_per_device: int = 1) -> contextlib.AbstractContextManager:
    """What a job on `device` holds while it works: a GPU lease for cuda, nothing otherwise."""
    if device is None or not str(device).startswith("cuda"):
        return contextlib.nullcontext(None)
    return gpu_lease(label=label, devices=devices, logger=logger, jobs_per_device=jobs_per_device)


def lease_for_job(job, label: str, logger: logging.Logger | None = None) -> contextlib.AbstractContextManager:
    """`lease_for` as a Snakemake job script needs it: the rule's `device` param and the study's
    `gpus` and `jobs_per_gpu` keys, read from the script's `snakemake` object."""
    return lease_for(job.params.device, label, job.config.get("gpus"), logger, job.config.get("jobs_per_gpu", 1))
