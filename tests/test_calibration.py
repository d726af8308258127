"""Calibration: statistics equal numpy over the same captured tensors; reruns are byte-identical;
bad input fails before any work and leaves nothing behind."""

import json
import math
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, random_model

from quamba.errors import CheckpointError, ConfigError
from quamba.formats.layout import alpha_key
from quamba.models import MambaConfig
from quamba.models.checkpoint import save_fp16
from quamba.models.taps import named_taps
from quamba.numerics.hadamard import hadamard_transform
from quamba.stages.calibrate import CalibrationSettings, calibrate, calibrate_model_dir

TOKENIZER = REPO / "resources" / "tokenizer"
MODELS = {
    "mamba1": MambaConfig(d_model=64, n_layer=3, vocab_size=4096),
    "mamba2": MambaConfig(d_model=64, n_layer=3, vocab_size=4096, layer="Mamba2", d_state=16,
                          headdim=16, chunk_size=16),
}
SETTINGS = CalibrationSettings(num_samples=6, seq_len=32, batch_size=2, seed=1,
                               alphas=(0.99, 0.9995, 1.0), activation_samples=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text((REPO / "resources" / "corpus" / "valid.txt").read_text()[:40_000])
    return path


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_dir(request, tmp_path_factory):
    return save_fp16(random_model(MODELS[request.param]), tmp_path_factory.mktemp("m") / "model", TOKENIZER)


def captured_calibration(name):
    """Run calibrate() while a second set of hooks records every tap's tensors."""
    model = random_model(MODELS[name])
    captured = {tap_name: [] for tap_name in named_taps(model)}
    hooks = [tap.register_forward_hook(
        lambda _m, _i, out, n=tap_name, t=tap: captured[n].append((hadamard_transform(out) if t.rotated else out).clone()))
        for tap_name, tap in named_taps(model).items()]
    windows = torch.randint(0, 4096, (6, 32), generator=torch.Generator().manual_seed(0))
    stats, samples = calibrate(model, windows, SETTINGS, progress=False)
    for hook in hooks:
        hook.remove()
    return stats, samples, captured


@pytest.mark.parametrize("name", sorted(MODELS))
def test_statistics_equal_numpy_over_the_captured_tensors(name):
    stats, _, captured = captured_calibration(name)
    assert set(stats) == set(captured)
    for tap_name, tensors in captured.items():
        flat = np.concatenate([t.double().numpy().ravel() for t in tensors])
        tap = stats[tap_name]
        assert tap["numel"] == flat.size, tap_name
        assert (tap["min"], tap["max"], tap["absmax"]) == (flat.min(), flat.max(), np.abs(flat).max())
        assert math.isclose(tap["mean"], flat.mean(), rel_tol=1e-7, abs_tol=1e-9)
        assert math.isclose(tap["std"], flat.std(), rel_tol=1e-7)
        for alpha in SETTINGS.alphas:
            entry = tap["alphas"][alpha_key(alpha)]
            if tap["observer"] == "percentile" and alpha < 1.0:
                ema = None
                for t in tensors:
                    q = np.quantile(np.abs(t.float().numpy()).ravel(), alpha)
                    ema = q if ema is None else ema + 0.01 * (q - ema)
                # torch.quantile interpolates in float32, numpy in float64
                assert math.isclose(entry["threshold"], min(ema, np.abs(flat).max()), rel_tol=1e-4)
            else:
                assert entry["threshold"] == np.abs(flat).max()
            exact_clipped = (np.abs(flat) > entry["threshold"]).mean()
            assert abs(entry["clipped_fraction"] - exact_clipped) <= entry["clipped_fraction_error"] + 1e-12
            assert entry["stream_percentile"]["low"] <= np.quantile(np.abs(flat), alpha) <= entry["stream_percentile"]["high"]
            assert entry["clipped_min"] == max(flat.min(), -entry["threshold"])
            assert entry["clipped_max"] == min(flat.max(), entry["threshold"])


def test_percentile_observer_sits_where_quamba_puts_it():
    stats, _, _ = captured_calibration("mamba1")
    percentile_taps = sorted(n for n, t in stats.items() if t["observer"] == "percentile")
    assert percentile_taps == [f"layer_{i}.{p}" for i in range(3) for p in ("ssm_state_act:input", "x_proj:input")]
    assert stats["layer_0.out_proj:input"]["rotated"] is True


def test_alpha_one_clips_nothing_and_equals_min_max():
    stats, _, _ = captured_calibration("mamba2")
    for tap in stats.values():
        entry = tap["alphas"]["1.0"]
        assert entry["threshold"] == tap["absmax"]
        assert entry["clipped_fraction"] == 0.0 and entry["range_reduction"] == 0.0
        assert (entry["clipped_min"], entry["clipped_max"]) == (tap["min"], tap["max"])


def test_activation_samples_cover_the_first_layers_and_come_from_the_stream():
    stats, samples, captured = captured_calibration("mamba1")
    assert set(samples) == {n for n in stats if n.startswith(("layer_0.", "layer_1.", "layer_2."))}
    for tap_name, values in samples.items():
        assert values.dtype == np.float32
        assert values.size == min(300, stats[tap_name]["numel"])
        stream = np.concatenate([t.float().numpy().ravel() for t in captured[tap_name]])
        assert np.isin(values, stream).all(), tap_name


def test_calibrate_writes_schema_valid_stats_and_npz(model_dir, corpus, tmp_path):
    doc = calibrate_model_dir(model_dir, tmp_path / "out", SETTINGS, data=corpus, progress=False)
    written = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert written == json.loads(json.dumps(doc))
    schema = yaml.safe_load((REPO / "schemas" / "stats.schema.yaml").read_text())
    jsonschema.validate(written, schema)
    assert written["default_alpha"] in (0.9995, 0.99999)
    assert len(written["model"]["sha256"]) == 64 and len(written["data"]["tokens_sha256"]) == 64
    with np.load(tmp_path / "out" / "activations.npz") as npz:
        assert sorted(npz.files) == sorted(n for n in written["taps"] if n.startswith(("layer_0.", "layer_1.", "layer_2.")))
    broken = dict(written, taps={"layer_0.x_proj:input": {"observer": "median"}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_two_runs_give_byte_identical_files(model_dir, corpus, tmp_path):
    for run in ("a", "b"):
        calibrate_model_dir(model_dir, tmp_path / run, SETTINGS, data=corpus, progress=False)
    for name in ("stats.json", "activations.npz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_another_seed_picks_other_windows(model_dir, corpus, tmp_path):
    a = calibrate_model_dir(model_dir, tmp_path / "a", SETTINGS, data=corpus, progress=False)
    settings = CalibrationSettings(**{**SETTINGS.__dict__, "seed": 2})
    b = calibrate_model_dir(model_dir, tmp_path / "b", settings, data=corpus, progress=False)
    assert a["data"]["tokens_sha256"] != b["data"]["tokens_sha256"]


@pytest.mark.parametrize("change, message", [
    ({"alphas": (0.9995, 1.5)}, "alphas: 1.5 is outside (0, 1]"),
    ({"alphas": (0.0,)}, "alphas: 0.0 is outside (0, 1]"),
    ({"activation_layers": (0, 7)}, "activation_layers: layer 7 does not exist"),
    ({"num_samples": 100_000}, "fewer than the 100000 samples"),
])
def test_bad_settings_fail_clearly_and_write_nothing(model_dir, corpus, tmp_path, change, message):
    settings = CalibrationSettings(**{**SETTINGS.__dict__, **change})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        calibrate_model_dir(model_dir, tmp_path / "out", settings, data=corpus, progress=False)
    assert not (tmp_path / "out").exists()


def test_empty_corpus_fails_clearly(model_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ConfigError, match="empty.txt: calibration corpus is empty"):
        calibrate_model_dir(model_dir, tmp_path / "out", SETTINGS, data=tmp_path / "empty.txt", progress=False)
    assert not (tmp_path / "out").exists()


def test_model_dir_without_config_fails_clearly(tmp_path, corpus):
    (tmp_path / "nomodel").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        calibrate_model_dir(tmp_path / "nomodel", tmp_path / "out", SETTINGS, data=corpus, progress=False)
    assert not (tmp_path / "out").exists()


def test_tokenizer_larger_than_the_vocabulary_fails_clearly(tmp_path, corpus):
    small = save_fp16(random_model(MambaConfig(d_model=32, n_layer=3, vocab_size=100)), tmp_path / "m", TOKENIZER)
    with pytest.raises(ConfigError, match="tokenizer has 4096 tokens but the model's vocabulary has 104"):
        calibrate_model_dir(small, tmp_path / "out", SETTINGS, data=corpus, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_calibrate_then_view(model_dir, corpus, tmp_path):
    quamba = [sys.executable, "-m", "quamba.cli"]
    run = subprocess.run([*quamba, "calibrate", str(model_dir), "--samples", "4", "--seq-len", "16",
                          "--batch-size", "2", "--alphas", "0.999", "1.0", "--save-activations",
                          "--activation-layers", "0", "--activation-samples", "50", "--data", str(corpus),
                          "--out", str(tmp_path / "c")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    with np.load(tmp_path / "c" / "activations.npz") as npz:
        assert all(name.startswith("layer_0.") for name in npz.files)
    view = subprocess.run([*quamba, "view", str(tmp_path / "c" / "stats.json"), "--filter", "layer_1"],
                          capture_output=True, text=True)
    assert view.returncode == 0, view.stderr
    assert "layer_1.in_proj:input" in view.stdout and "layer_0" not in view.stdout.split("\n\n", 1)[1]
    assert "a=0.999" in view.stdout and "clipped %" in view.stdout
    compare = subprocess.run([*quamba, "view", str(tmp_path / "c" / "stats.json"), "--compare",
                              str(tmp_path / "c" / "stats.json")], capture_output=True, text=True)
    assert "B/A" in compare.stdout
    bad = subprocess.run([*quamba, "calibrate", str(model_dir), "--alphas", "2", "--out", str(tmp_path / "d")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "alphas: 2.0 is outside (0, 1]" in bad.stderr
    assert not (tmp_path / "d").exists()
