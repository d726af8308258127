"""One process at a time through its first GPU work, so that kernels compile once per machine.

A quantized model's first forward compiles torch.compile / inductor / Triton kernels (the fused
activation quantizers, the int8 GEMM epilogue, the quantized Hadamard) and autotunes mamba_ssm's
Triton kernels. Jobs that start together on one GPU each compile the same kernels at the same time
(a minute each, against seconds for a job that finds inductor's and Triton's on-disk caches warm).
`first_compile_lock` makes them take turns: the first compiles and fills the caches, the others
wait on an exclusive `flock` in inductor's cache dir, then read what it wrote. Only a process's
first batch goes through it; steady work is never serialized. The kernel drops a flock when its
holder dies, so there are no stale locks; a waiter that gives up (a hung holder) goes on unlocked.
QUAMBA_COMPILE_LOCK=1 turns it on; 0, the default, leaves it off until bench/compile_lock.py has
measured on a GPU that it pays (a job whose kernels are cached would still wait for a holder's
whole first batch). Off CUDA it does nothing.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from quamba.errors import ConfigError
from quamba.gpu_lease import lock_holder, release_lock, try_lock

__all__ = ["ENV", "LOCK_FILE", "compile_lock_enabled", "first_compile_lock"]

ENV = "QUAMBA_COMPILE_LOCK"
ALLOWED = ("0", "1")
LOCK_FILE = "quamba-first-compile.lock"
DEFAULT_TIMEOUT = 900.0  # s; well past a cold first batch (about a minute), short of a job's runtime
log = logging.getLogger(__name__)
_held = False  # this process holds the lock: a nested use must not wait on itself (flocks of two opens conflict)


def compile_lock_enabled() -> bool:
    """Whether $QUAMBA_COMPILE_LOCK asks for the lock (unset: no); any value but 0 or 1 is a ConfigError."""
    value = os.environ.get(ENV, "0").strip()
    if value not in ALLOWED:
        raise ConfigError(f"{ENV}={os.environ[ENV]!r} is not allowed; allowed: 1 (one process compiles "
                          f"at a time) or 0 (no lock, the default)")
    return value == "1"


def lock_dir() -> Path:
    """Inductor's cache dir (TORCHINDUCTOR_CACHE_DIR, else its per-user default): the lock guards
    what is written there, and processes that share one cache dir share one lock."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # an older or changed torch: the same rule as inductor's
        directory = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(
            tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
        os.makedirs(directory, exist_ok=True)
        return Path(directory).absolute()
    return Path(cache_dir()).absolute()


@contextlib.contextmanager
def first_compile_lock(device: Any, label: str, enabled: bool | None = None, timeout: float = DEFAULT_TIMEOUT,
                       poll: float = 0.2) -> Iterator[None]:
    """Hold the machine's first-compile lock for the block when `device` is CUDA; else nothing.

    device: a torch.device or its name ("cuda", "cuda:0", "cpu"). label: what the block does, for
    the holder record and logs. enabled: None reads $QUAMBA_COMPILE_LOCK. Waits polling every
    `poll` s; after `timeout` s it warns and runs the block without the lock.
    """
    global _held
    if enabled is None:
        enabled = compile_lock_enabled()
    kind = getattr(device, "type", None) or str(device).partition(":")[0]
    if not enabled or kind != "cuda" or _held:
        yield
        return
    if timeout < 0 or poll <= 0:
        raise ValueError(f"first_compile_lock: timeout must be >= 0 and poll > 0, got timeout={timeout}, poll={poll}")
    path = lock_dir() / LOCK_FILE
    begun = time.monotonic()
    fd = try_lock(path, label)
    contended = fd is None
    if contended:
        log.info("compile lock: %s waits for %s to compile first (lock %s)", label, lock_holder(path), path)
    while fd is None and time.monotonic() - begun < timeout:
        time.sleep(poll)
        fd = try_lock(path, label)
    waited = time.monotonic() - begun
    if fd is None:
        log.warning("compile lock: %s waited %.1f s, the timeout, for %s; going on without the lock "
                    "(it compiles beside the holder)", label, waited, lock_holder(path))
        yield
        return
    if contended:
        log.info("compile lock: %s waited %.1f s; it reads the kernels compiled meanwhile from the caches",
                 label, waited)
    _held = True
    try:
        yield
    finally:
        _held = False
        release_lock(fd)
        log.info("compile lock: %s released it after %.1f s", label, time.monotonic() - begun - waited)
