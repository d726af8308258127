"""Logging for one workflow job: everything, tracebacks included, goes to the rule's log file."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def job_log(path: str) -> Iterator[logging.Logger]:
    """Log to `path`; an exception is written there with its traceback, then re-raised."""
    logging.basicConfig(filename=path, level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(message)s")
    logger = logging.getLogger("quamba.job")
    try:
        yield logger
    except BaseException:
        logger.exception("job failed")
        raise
