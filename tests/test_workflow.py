"""The Snakemake workflow: config validated at the door, FP16 normalization runs and is cached."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import quamba
from conftest import REPO, random_model
from quamba.stats import read_stats
from test_checkpoint import write_state_spaces
from quamba.models import MambaConfig


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--cores", "2", *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture
def study(tmp_path):
    """A workdir with a config naming one random state-spaces checkpoint."""
    source = write_state_spaces(random_model(MambaConfig(d_model=32, n_layer=2, vocab_size=4096)), tmp_path / "ckpt")
    config = {"models": {"tiny": {"source": str(source),
                                  "tokenizer": str(REPO / "resources" / "tokenizer")}},
              "calibrations": {"quick": {"samples": 4, "seq_len": 32, "batch_size": 2,
                                         "alphas": [0.999, 1.0], "activation_layers": [0, 1],
                                         "activation_samples": 100}},
              "quantization": {"calibration": "quick", "schemes": ["w8a8", "w4a16"], "alphas": [0.999],
                               "seeds": [0, 1]},
              "gptq": {"nsamples": 4, "seqlen": 32},
              "tasks": ["quamba_mc", "perplexity"], "eval": {"limit": 5}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_study_normalizes_and_calibrates_then_caches(study):
    run = snakemake(study, "--configfile", "study.yaml")
    assert run.returncode == 0, run.stderr
    out = study / "results" / "tiny" / "fp16" / "model"
    assert json.loads((out / "source.json").read_text())["format"] == "state-spaces"
    assert quamba.load(out, device="cpu").config.d_model == 32
    for log in ("fp16/normalize.log", "calib/quick/calibrate.log"):
        assert (study / "logs" / "tiny" / log).is_file()
    assert (study / "benchmarks" / "tiny" / "fp16" / "normalize.tsv").is_file()
    stats = read_stats(study / "results" / "tiny" / "calib" / "quick" / "stats.json")
    assert stats["num_samples"] == 4 and stats["alphas"] == [0.999, 1.0]
    assert stats["seed"] == 0 and stats["activation_layers"] == [0, 1]  # seed: the schema's default
    with np.load(study / "results" / "tiny" / "calib" / "quick" / "activations.npz") as npz:
        assert "layer_0.x_proj:input" in npz.files
    for bits in (8, 4):
        for seed in (0, 1):
            assert (study / "results" / "tiny" / "gptq" / f"w{bits}" / f"seed{seed}" / "gptq.safetensors").is_file()
    for scheme in ("w8a8", "w4a16"):
        for seed in (0, 1):
            model_dir = study / "results" / "tiny" / scheme / "pa0.999" / f"seed{seed}" / "model"
            quant_config = json.loads((model_dir / "quant_config.json").read_text())
            assert (quant_config["scheme"], quant_config["alpha"], quant_config["seed"]) == (scheme, 0.999, seed)
            assert quamba.load(model_dir, device="cpu").config.n_layer == 2
    for task in ("quamba_mc", "perplexity"):
        result = json.loads((study / "results" / "tiny" / "fp16" / "eval" / f"{task}.json").read_text())
        assert task in result["results"]
    again = snakemake(study, "--configfile", "study.yaml", "-n")
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.parametrize("models, message", [
    ({"tiny": {"sorce": "x"}}, "'sorce' was unexpected"),
    ({"tiny": {"source": "/no/such/dir"}}, "models.tiny.source: /no/such/dir: no such model directory"),
    ({"bad name!": {"source": "x/y"}}, "does not match"),
    ({}, "should be non-empty"),
])
def test_bad_config_fails_before_any_job_naming_the_key(tmp_path, models, message):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"models": models, "calibrations": {"default": {}},
                                                       "quantization": {}, "gptq": {}}))
    run = snakemake(tmp_path, "--configfile", "bad.yaml")
    assert run.returncode != 0
    assert message in run.stdout + run.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("calibration, message", [
    ({"alphas": [0.9995, 1.5]}, "1.5 is greater than the maximum of 1"),
    ({"samples": 0}, "0 is less than the minimum of 1"),
    ({"sample": 8}, "'sample' was unexpected"),
    ({"alphas": [1.0]}, "quantization.alphas: ['0.999'] not in calibrations.quick.alphas"),
])
def test_bad_calibration_setting_fails_before_any_job(study, calibration, message):
    config = yaml.safe_load((study / "study.yaml").read_text())
    config["calibrations"] = {"quick": calibration}
    (study / "bad.yaml").write_text(yaml.safe_dump(config))
    run = snakemake(study, "--configfile", "bad.yaml")
    assert run.returncode != 0
    assert message in run.stdout + run.stderr
    assert not (study / "results").exists()


@pytest.mark.slow
def test_default_study_runs_from_a_clean_checkout(tmp_path):
    """`snakemake --cores 2` on config.yaml, in a workdir laid out like a fresh clone."""
    (tmp_path / "resources").symlink_to(REPO / "resources")
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    run = snakemake(tmp_path)
    assert run.returncode == 0, run.stderr
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for model in config["models"]:
        assert (tmp_path / "results" / model / "fp16" / "model" / "model.safetensors").is_file()
        for calib in config["calibrations"]:
            read_stats(tmp_path / "results" / model / "calib" / calib / "stats.json")
