"""A job's log: its start-up (process start to the first line) and failures with their traceback."""

import logging
import re
import subprocess
import sys

import pytest

from quamba.logs import job_log, seconds_since_process_start


def test_start_up_is_measured_from_the_process_start(tmp_path):
    """A fresh interpreter that sleeps 1.5 s before its first log line reports at least that."""
    log = tmp_path / "job.log"
    code = f"import time; time.sleep(1.5)\nfrom quamba.logs import job_log\nwith job_log({str(log)!r}):\n    pass"
    subprocess.run([sys.executable, "-c", code], check=True)
    lines = log.read_text().splitlines()
    seconds = float(re.search(r"start-up: ([0-9.]+) s", lines[0]).group(1))
    assert 1.5 <= seconds < 60
    assert "job done" in lines[-1]


def test_this_process_age_is_positive_and_bounded():
    age = seconds_since_process_start()
    assert age is None or 0 < age < 24 * 3600


@pytest.fixture
def root_handlers():
    """job_log takes over the root logger, as a job's process does; give it back afterwards."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        handler.close()
    root.handlers[:], root.level = saved, level


def test_a_failure_is_logged_with_its_traceback_and_re_raised(tmp_path, root_handlers):
    log = tmp_path / "job.log"
    with pytest.raises(ValueError, match="bad value"):
        with job_log(str(log)):
            raise ValueError("bad value")
    text = log.read_text()
    assert "job failed" in text and "Traceback" in text and "bad value" in text


def test_job_imports_leave_the_cuda_packages_alone():
    """The stages' modules import neither mamba_ssm nor causal_conv1d (seconds of Triton set-up
    on a GPU box): the kernels load on the first CUDA call. An import hook records any attempt."""
    code = """
import sys
tried = []
class Recorder:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('mamba_ssm', 'causal_conv1d', 'triton'):
            tried.append(name)
        return None
sys.meta_path.insert(0, Recorder())
import quamba.stages.assemble, quamba.stages.calibrate, quamba.stages.evaluate, quamba.stages.gptq
import quamba.stages.scales, quamba.stages.summarize, quamba.models.checkpoint, quamba.lm_eval_model
print(tried)
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
