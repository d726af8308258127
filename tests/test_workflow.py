"""The Snakemake workflow: config validated at the door, FP16 normalization runs and is cached."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import quamba
from conftest import REPO, random_model
from test_checkpoint import write_state_spaces
from test_models import CONFIGS


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--cores", "2", *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture
def study(tmp_path):
    """A workdir with a config naming one random state-spaces checkpoint."""
    source = write_state_spaces(random_model(CONFIGS["mamba1"]), tmp_path / "ckpt")
    config = {"models": {"tiny": {"source": str(source),
                                  "tokenizer": str(REPO / "resources" / "tokenizer")}}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_normalize_rule_writes_a_loadable_fp16_dir_and_caches(study):
    run = snakemake(study, "--configfile", "study.yaml")
    assert run.returncode == 0, run.stderr
    out = study / "results" / "tiny" / "fp16" / "model"
    assert json.loads((out / "source.json").read_text())["format"] == "state-spaces"
    assert quamba.load(out, device="cpu").config.d_model == 64
    assert (study / "logs" / "tiny" / "fp16" / "normalize.log").is_file()
    assert (study / "benchmarks" / "tiny" / "fp16" / "normalize.tsv").is_file()
    again = snakemake(study, "--configfile", "study.yaml", "-n")
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.parametrize("models, message", [
    ({"tiny": {"sorce": "x"}}, "'sorce' was unexpected"),
    ({"tiny": {"source": "/no/such/dir"}}, "models.tiny.source: /no/such/dir: no such model directory"),
    ({"bad name!": {"source": "x/y"}}, "does not match"),
    ({}, "should be non-empty"),
])
def test_bad_config_fails_before_any_job_naming_the_key(tmp_path, models, message):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"models": models}))
    run = snakemake(tmp_path, "--configfile", "bad.yaml")
    assert run.returncode != 0
    assert message in run.stdout + run.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_default_study_runs_from_a_clean_checkout(tmp_path):
    """`snakemake --cores 2` on config.yaml, in a workdir laid out like a fresh clone."""
    (tmp_path / "resources").symlink_to(REPO / "resources")
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    run = snakemake(tmp_path)
    assert run.returncode == 0, run.stderr
    for model in yaml.safe_load((REPO / "config.yaml").read_text())["models"]:
        assert (tmp_path / "results" / model / "fp16" / "model" / "model.safetensors").is_file()
