"""The first-compile lock (quamba.compile_lock), on the CPU with a device named "cuda": processes take
turns, a waiter that times out goes on and warns, a bad QUAMBA_COMPILE_LOCK fails naming it, the CPU
takes no lock, and the lm-eval adapter holds it around the process's first batch and first decoding
only."""

import contextlib
import fcntl
import itertools
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

import quamba.lm_eval_model as adapter
from quamba.compile_lock import ENV, LOCK_FILE, first_compile_lock, lock_dir
from quamba.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "resources" / "models" / "mamba2-demo"

# One process: ready once imported, enters the lock on "cuda" when the go file appears, holds it `hold` s.
JOB = textwrap.dedent("""
    import json, os, sys, time
    from quamba.compile_lock import first_compile_lock, lock_dir
    out, go, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
    lock_dir()  # torch's import, before the start
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.005)
    with first_compile_lock("cuda", os.path.basename(out), poll=0.01):
        start = time.monotonic()
        time.sleep(hold)
        end = time.monotonic()
    with open(out, "w") as f:
        json.dump({"start": start, "end": end}, f)
""")


@pytest.fixture(autouse=True)
def cache_dir(monkeypatch, tmp_path):
    """Each test its own inductor cache dir (where the lock file lives), the switch on."""
    directory = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(directory))
    monkeypatch.setenv(ENV, "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return directory


def run_together(tmp_path, jobs, hold):
    """Start `jobs` processes, let them all at the lock at once; their (start, end) inside it."""
    script, go = tmp_path / "job.py", tmp_path / "go"
    script.write_text(JOB)
    outs = [tmp_path / f"job{i}.json" for i in range(jobs)]
    procs = [subprocess.Popen([sys.executable, str(script), str(out), str(go), str(hold)], stdout=subprocess.PIPE,
                              text=True) for out in outs]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    go.touch()
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    return sorted((json.loads(out.read_text())["start"], json.loads(out.read_text())["end"]) for out in outs)


def test_processes_on_cuda_take_turns(tmp_path, cache_dir):
    spans = run_together(tmp_path, jobs=3, hold=0.4)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end  # the next one enters only after the one before left
    assert (cache_dir / LOCK_FILE).is_file()


def test_with_the_switch_off_processes_overlap(tmp_path, monkeypatch):
    """The control of the test above: without the lock its check fails."""
    monkeypatch.setenv(ENV, "0")
    spans = run_together(tmp_path, jobs=2, hold=1.0)
    assert spans[1][0] < spans[0][1]


@contextlib.contextmanager
def held_elsewhere(cache_dir, release_after=None):
    """The lock file flocked by another open descriptor (as another process would), optionally
    released by a thread after `release_after` s."""
    assert lock_dir() == cache_dir  # and torch's import done before the clock starts
    fd = os.open(cache_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    timer = threading.Timer(release_after, os.close, (fd,)) if release_after is not None else None
    if timer:
        timer.start()
    try:
        yield
    finally:
        if timer:
            timer.join()
        else:
            os.close(fd)


def test_a_waiter_logs_how_long_it_waited(cache_dir, caplog):
    caplog.set_level(logging.INFO, logger="quamba.compile_lock")
    with held_elsewhere(cache_dir, release_after=0.3):
        begun = time.monotonic()
        with first_compile_lock("cuda:0", "test", poll=0.02):
            waited = time.monotonic() - begun
    assert waited >= 0.25
    assert "test waits for" in caplog.text and "test waited" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_waiter_past_the_timeout_goes_on_without_the_lock_and_warns(cache_dir, caplog):
    ran = False
    with held_elsewhere(cache_dir):
        begun = time.monotonic()
        with first_compile_lock("cuda", "test", timeout=0.3, poll=0.02):
            ran = True
        assert time.monotonic() - begun >= 0.3
    assert ran
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "without the lock" in warnings[0].getMessage()


@pytest.mark.parametrize("value", ["yes", "true", "2", ""])
def test_a_bad_switch_value_fails_naming_the_variable_and_the_allowed_values(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ConfigError, match=rf"{ENV}=.*allowed: 1 .* or 0"), first_compile_lock("cpu", "test"):
        pass


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "meta"])
def test_off_cuda_it_takes_no_lock(cache_dir, device):
    with first_compile_lock(device, "test", enabled=True):
        assert not (cache_dir / LOCK_FILE).exists()


@pytest.mark.parametrize("value", ["0", None])  # None: unset, the default
def test_switched_off_it_takes_no_lock_on_cuda(cache_dir, monkeypatch, value):
    if value is None:
        monkeypatch.delenv(ENV)
    else:
        monkeypatch.setenv(ENV, value)
    with first_compile_lock("cuda", "test"):
        assert not (cache_dir / LOCK_FILE).exists()


def test_a_nested_use_does_not_wait_on_its_own_lock(cache_dir):
    begun = time.monotonic()
    with first_compile_lock("cuda", "outer"), first_compile_lock(torch.device("cuda", 0), "inner", timeout=5):
        pass
    assert time.monotonic() - begun < 1


@pytest.fixture
def recorded(monkeypatch):
    """The adapter's lock uses (label), and for each model call whether it ran inside one."""
    uses, calls, inside = [], [], [False]

    @contextlib.contextmanager
    def lock(device, label):
        uses.append(label)
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    monkeypatch.setattr(adapter, "first_compile_lock", lock)
    lm = adapter.QuambaLM(DEMO, batch_size=2, device="cpu", progress=False)
    forward = lm.model.forward
    monkeypatch.setattr(lm.model, "forward", lambda *a, **k: (calls.append(inside[0]), forward(*a, **k))[1])
    return lm, uses, calls


def test_the_adapter_locks_only_the_process_first_batch(recorded):
    lm, uses, calls = recorded
    requests = [Instance("loglikelihood", {}, (f"Context number {i} says", " more."), i) for i in range(5)]
    first = lm.loglikelihood(requests)
    assert lm.loglikelihood(requests) == first
    lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("A document to score.",), 0)])
    assert uses == ["first scored batch"]
    assert calls == [True] + [False] * (len(calls) - 1) and len(calls) == 3 + 3 + 1


def test_the_adapter_locks_only_the_first_decoding(recorded):
    lm, uses, calls = recorded
    prompt = lm.tok_encode("The module provides")
    assert lm.greedy(prompt, 3) == lm.greedy(prompt, 3)
    assert uses == ["first decoding"]
    assert calls[0] and not any(calls[1:]) and len(calls) > 2  # the first prefill inside; its steps outside
