"""lm-eval's own command line runs our model through `python -m quamba.lm_eval_cli`."""

import subprocess
import sys

from conftest import REPO


def test_lm_eval_cli_runs_the_quamba_model_on_an_offline_task(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "quamba.lm_eval_cli", "run", "--model", "quamba",
         "--model_args", f"path={REPO / 'resources' / 'models' / 'mamba2-demo'}", "--batch_size", "4",
         "--tasks", "quamba_cloze", "--include_path", str(REPO / "resources" / "tasks"), "--limit", "4"],
        cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    table = [line for line in run.stdout.splitlines() if line.startswith("|quamba_cloze")]
    assert table and "acc" in table[0]
