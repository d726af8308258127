"""The per-GPU lease (quamba.gpu_lease), on the CPU with fake device lists: concurrent jobs never share
a device, a killed holder frees its device, a full machine times out naming the holders, SLURM is left
alone, the environment comes back as it was, and devices are found without CUDA."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from quamba.gpu_lease import GPULeaseTimeout, NoGPUError, gpu_lease, visible_devices

REPO = Path(__file__).resolve().parents[1]

# One job in its own process: takes a lease, notes device, CUDA_VISIBLE_DEVICES and when it held it.
JOB = textwrap.dedent("""
    import json, os, sys, time
    from quamba.gpu_lease import gpu_lease
    lock_dir, devices, out = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
    hold, slots = float(sys.argv[4]), int(sys.argv[5])
    with gpu_lease(label=os.path.basename(out), devices=devices, lock_dir=lock_dir, timeout=30, poll=0.02,
                   jobs_per_device=slots) as dev:
        start = time.monotonic()
        seen = os.environ["CUDA_VISIBLE_DEVICES"]
        print("held", dev, flush=True)
        time.sleep(hold)
        end = time.monotonic()
    with open(out, "w") as f:
        json.dump({"device": dev, "seen": seen, "start": start, "end": end}, f)
""")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Whatever machine runs the tests (a SLURM job, a GPU box), the lease starts from a bare environment."""
    for name in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES", "QUAMBA_GPU_LEASE", "QUAMBA_GPU_LOCK_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def start_job(tmp_path, lock_dir, devices, name, hold, jobs_per_device=1):
    script = tmp_path / "job.py"
    if not script.exists():
        script.write_text(JOB)
    out = tmp_path / f"{name}.json"
    proc = subprocess.Popen([sys.executable, str(script), str(lock_dir), ",".join(devices), str(out), str(hold),
                             str(jobs_per_device)],
                            stdout=subprocess.PIPE, text=True)
    return proc, out


def test_concurrent_jobs_never_share_a_device_and_all_finish(tmp_path):
    devices, jobs = ["0", "1"], 5
    started = [start_job(tmp_path, tmp_path / "locks", devices, f"job{i}", hold=0.4) for i in range(jobs)]
    for proc, _ in started:
        assert proc.wait(timeout=60) == 0
    runs = [json.loads(out.read_text()) for _, out in started]
    for run in runs:
        assert run["device"] in devices and run["seen"] == run["device"], run
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            if a["device"] == b["device"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)


def test_a_shared_device_grants_as_many_leases_as_its_slots_spreading_over_devices_first(tmp_path, caplog):
    locks = tmp_path / "locks"
    started = []
    for i in range(4):  # four jobs on two devices of two slots each: all hold at once
        started.append(start_job(tmp_path, locks, ["0", "1"], f"job{i}", hold=30, jobs_per_device=2))
        assert started[-1][0].stdout.readline().split() == ["held", ["0", "1"][i % 2]]  # slot 1 of each, then 2
    try:
        assert {p.name for p in locks.iterdir()} == {"gpu-0.lock", "gpu-1.lock", "gpu-0.slot2.lock", "gpu-1.slot2.lock"}
        with pytest.raises(GPULeaseTimeout, match=r"device 1 slot 2: pid \d+ .*'job3.json'"):  # every slot held
            with gpu_lease(label="job4", devices=["0", "1"], lock_dir=locks, timeout=0, jobs_per_device=2):
                pass
    finally:
        for proc, _ in started:
            proc.kill()
            proc.wait(timeout=10)
    caplog.set_level(logging.INFO, logger="quamba.gpu_lease")
    with gpu_lease(devices=["0"], lock_dir=locks, timeout=0, jobs_per_device=3) as device:
        assert device == "0"
    assert f"GPU lease: device 0 of [0], job slot 1 of 3 (lock {locks / 'gpu-0.lock'})" in caplog.messages
    with pytest.raises(ValueError, match="jobs_per_device must be an integer >= 1, got 0"):
        with gpu_lease(devices=["0"], lock_dir=locks, jobs_per_device=0):
            pass


def test_sigkilled_holder_frees_its_device(tmp_path):
    proc, _ = start_job(tmp_path, tmp_path / "locks", ["7"], "victim", hold=60)
    try:
        assert proc.stdout.readline().split() == ["held", "7"]
        with pytest.raises(GPULeaseTimeout):  # really held
            with gpu_lease(devices=["7"], lock_dir=tmp_path / "locks", timeout=0):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    start = time.monotonic()
    with gpu_lease(devices=["7"], lock_dir=tmp_path / "locks", timeout=5, poll=0.05) as device:
        assert device == "7"
    assert time.monotonic() - start < 1


def test_all_devices_busy_waits_then_times_out_naming_holders(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="quamba.gpu_lease")
    locks = tmp_path / "locks"
    holders = [start_job(tmp_path, locks, [device], f"holder-{device}", hold=60)[0] for device in ("0", "1")]
    try:
        for proc, device in zip(holders, ("0", "1")):
            assert proc.stdout.readline().split() == ["held", device]
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "9")
        start = time.monotonic()
        with pytest.raises(GPULeaseTimeout) as error:
            with gpu_lease(label="waiter", devices=["0", "1"], lock_dir=locks, timeout=0.3, poll=0.05):
                pytest.fail("got a device that is held")
        assert time.monotonic() - start >= 0.3
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "9"  # a failed lease changes nothing
    finally:
        for proc in holders:
            proc.kill()
            proc.wait(timeout=10)
    message = str(error.value)
    for part in ("holder-0", "holder-1", f"pid {holders[0].pid}", f"pid {holders[1].pid}", "0.3 s", "[0, 1]",
                 "timeout="):
        assert part in message, message
    waits = [m for m in caplog.messages if "waiting" in m]
    assert len(waits) == 1 and "holder-0" in waits[0] and "holder-1" in waits[0], waits


def test_slurm_job_takes_no_lease_and_leaves_env_alone(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="quamba.gpu_lease")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    before = dict(os.environ)
    with gpu_lease(label="x", devices=["0", "1"], lock_dir=tmp_path / "locks") as device:
        assert device is None
        assert dict(os.environ) == before
    assert dict(os.environ) == before
    assert not (tmp_path / "locks").exists()
    assert any("scheduler assigned" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("previous", ["0,1", None], ids=["set", "unset"])
def test_release_restores_previous_cuda_visible_devices(tmp_path, monkeypatch, previous):
    if previous is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", previous)
    with pytest.raises(RuntimeError):  # restored also when the job fails
        with gpu_lease(devices=["1"], lock_dir=tmp_path) as device:
            assert device == "1" and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
            raise RuntimeError("job failed")
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == previous
    assert "QUAMBA_GPU_LEASE" not in os.environ
    with gpu_lease(devices=["1"], lock_dir=tmp_path, timeout=0) as device:  # and the device is free again
        assert device == "1"
    assert (tmp_path / "gpu-1.lock").read_text() == ""  # a free device names no holder


def test_lease_logs_device_candidates_and_lock_and_writes_holder(tmp_path, caplog):
    logger = logging.getLogger("test.job")
    caplog.set_level(logging.INFO, logger="test.job")
    with gpu_lease(label="gptq mamba-130m w4 seed0", devices=[0, 1, 2, 3], lock_dir=tmp_path, logger=logger) as dev:
        assert dev == "0"
        holder = json.loads((tmp_path / "gpu-0.lock").read_text())
    assert f"GPU lease: device 0 of [0, 1, 2, 3] (lock {tmp_path / 'gpu-0.lock'})" in caplog.messages
    assert holder["pid"] == os.getpid() and holder["label"] == "gptq mamba-130m w4 seed0"
    assert {"host", "since"} <= holder.keys()


def test_default_lock_dir_is_env_var_else_snakemake_dir_under_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with gpu_lease(devices=["0"]):
        assert (tmp_path / ".snakemake" / "gpu-locks" / "gpu-0.lock").exists()
    monkeypatch.setenv("QUAMBA_GPU_LOCK_DIR", str(tmp_path / "shared"))
    with gpu_lease(devices=["0"]):
        assert (tmp_path / "shared" / "gpu-0.lock").exists()


def test_nested_lease_reuses_the_held_device(tmp_path):
    with gpu_lease(devices=["0", "1"], lock_dir=tmp_path) as outer:
        with gpu_lease(devices=["0", "1"], lock_dir=tmp_path, timeout=0) as inner:
            assert inner == outer == os.environ["CUDA_VISIBLE_DEVICES"]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == outer


def test_visible_devices_from_cuda_visible_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_devices() == ["2", "5"]
    with gpu_lease(lock_dir=tmp_path) as device:
        assert device == "2" and os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,5"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa-1, GPU-bbbb-2")
    assert visible_devices() == ["GPU-aaaa-1", "GPU-bbbb-2"]


def test_visible_devices_from_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\n[ "$1 $2" = "--query-gpu=index --format=csv,noheader" ] && printf "0\\n1\\n"\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert visible_devices() == ["0", "1"]


def test_no_nvidia_smi_and_no_cuda_visible_devices_is_a_clear_no_gpu_error(tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert visible_devices() == []
    with pytest.raises(NoGPUError, match="no GPU found"):
        with gpu_lease(lock_dir=tmp_path / "locks"):
            pass
    assert not (tmp_path / "locks").exists()


def test_a_job_script_leases_from_its_rules_device_and_the_studys_keys(monkeypatch):
    """lease_for_job (what scripts/*.py call): no lease off CUDA; on CUDA the study's `gpus` and
    `jobs_per_gpu` (defaults: the visible devices, one job each)."""
    import contextlib
    from types import SimpleNamespace

    from quamba import gpu_lease as lease_module

    asked = []
    monkeypatch.setattr(lease_module, "gpu_lease", lambda **kwargs: asked.append(kwargs) or contextlib.nullcontext("3"))

    def job(device, **config):
        return SimpleNamespace(params=SimpleNamespace(device=device), config=config)

    with lease_module.lease_for_job(job("cpu", gpus=["3"]), "cpu job") as held:
        assert held is None and asked == []
    with lease_module.lease_for_job(job("cuda", gpus=["3"], jobs_per_gpu=2), "gptq x") as held:
        assert held == "3"
    with lease_module.lease_for_job(job("cuda:0"), "evaluate y"):
        pass
    assert [(a["label"], a["devices"], a["jobs_per_device"]) for a in asked] == [("gptq x", ["3"], 2),
                                                                                ("evaluate y", None, 1)]
