"""Logging for one workflow job: everything, tracebacks included, goes to the rule's log file,
and the first line says how long the process took to get there (its start-up: interpreter,
imports)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process started (Linux: /proc), or None where that is unknown."""
    try:
        fields = open(f"/proc/{os.getpid()}/stat").read().rpartition(")")[2].split()
        uptime = float(open("/proc/uptime").read().split()[0])
    except OSError:
        return None
    return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in ticks since boot


@contextlib.contextmanager
def job_log(path: str) -> Iterator[logging.Logger]:
    """Log to `path`; an exception is written there with its traceback, then re-raised."""
    logging.basicConfig(filename=path, level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(message)s")
    logger = logging.getLogger("quamba.job")
    started = seconds_since_process_start()
    if started is not None:
        logger.info("start-up: %.2f s from process start to this line (interpreter and imports)", started)
    begun = time.perf_counter()
    try:
        yield logger
    except BaseException:
        logger.exception("job failed")
        raise
    logger.info("job done in %.2f s after start-up", time.perf_counter() - begun)
