"""A non-editable install works: the wheel carries the schemas and the shipped resources, and the
library finds them as package data from any working directory."""

import subprocess
import sys

import pytest
from conftest import REPO

CHECK = """
import json, pathlib, sys
import quamba
from quamba.shipped import DEFAULT_CORPUS, HELD_OUT_TEXT, SCHEMAS, TASKS_DIR, RESOURCES
from quamba.stages.calibrate import CalibrationSettings, calibrate_model_dir
from quamba.stages.scales import derive_scales
site = pathlib.Path(sys.argv[1]).resolve()
assert pathlib.Path(quamba.__file__).resolve().is_relative_to(site), quamba.__file__
for path in (SCHEMAS / "stats.schema.yaml", SCHEMAS / "scales.schema.yaml", SCHEMAS / "config.schema.yaml",
             DEFAULT_CORPUS, HELD_OUT_TEXT, TASKS_DIR / "quamba_mc.yaml", RESOURCES / "models" / "mamba1-demo"):
    assert path.resolve().is_relative_to(site) and path.exists(), path
doc = calibrate_model_dir(RESOURCES / "models" / "mamba1-demo", pathlib.Path("calib"),
                          CalibrationSettings(num_samples=2, seq_len=16, save_activations=False), progress=False)
assert doc["data"]["source"] == "resources/corpus/train.txt", doc["data"]["source"]
print(json.dumps(derive_scales("calib", 0.9995)["taps"]["layer_0.x_proj:input"]["threshold"]))
"""


@pytest.mark.slow
def test_a_wheel_install_finds_its_schemas_and_resources(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("quamba_flow-*.whl"))
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                                str(tmp_path / "site"), str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the wheel's quamba comes first on the path; the checkout's editable install is found only after it
    run = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path / "site")], cwd=elsewhere, capture_output=True,
                         text=True, env={"PYTHONPATH": str(tmp_path / "site"), "HF_HUB_OFFLINE": "1",
                                         "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert float(run.stdout.strip().splitlines()[-1]) > 0
