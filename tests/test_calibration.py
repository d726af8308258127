"""Calibration: statistics equal numpy over the same captured tensors; reruns are byte-identical;
bad input fails before any work and leaves nothing behind."""

import hashlib
import json
import math
import re
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, random_model

from quamba.errors import CheckpointError, ConfigError
from quamba.models import MambaConfig
from quamba.models.checkpoint import save_fp16
from quamba.models.taps import named_taps
from quamba.numerics import observers
from quamba.numerics.hadamard import hadamard_transform
from quamba.numerics.observers import QuambaMinMax, QuambaPercentile, StreamHistogram
from quamba.numerics.quantizers import activation_scale
from quamba.recipe import Recipe
from quamba.stages import calibration_observers
from quamba.stages.calibrate import CalibrationSettings, calibrate, calibrate_model_dir
from quamba.stages.scales import derive_scales, tap_scales

TOKENIZER = REPO / "resources" / "tokenizer"
MODELS = {
    "mamba1": MambaConfig(d_model=64, n_layer=3, vocab_size=4096),
    "mamba2": MambaConfig(d_model=64, n_layer=3, vocab_size=4096, layer="Mamba2", d_state=16,
                          headdim=16, chunk_size=16),
}
SETTINGS = CalibrationSettings(num_samples=6, seq_len=32, batch_size=1, seed=1, activation_samples=300)
ALPHAS = (0.999, 0.9995, 0.99973, 1.0)  # 0.99973: an alpha no setting lists


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text((REPO / "resources" / "corpus" / "valid.txt").read_text()[:40_000])
    return path


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_dir(request, tmp_path_factory):
    return save_fp16(random_model(MODELS[request.param]), tmp_path_factory.mktemp("m") / "model", TOKENIZER)


def captured_calibration(name, recipe=Recipe(), dtype=torch.float32):
    """Run calibrate() while a second set of hooks records every tap's tensors."""
    model = random_model(MODELS[name]).to(dtype)
    captured = {tap_name: [] for tap_name in named_taps(model)}
    hooks = [tap.register_forward_hook(
        lambda _m, _i, out, n=tap_name, t=tap: captured[n].append((hadamard_transform(out) if t.rotated else out).clone()))
        for tap_name, tap in named_taps(model).items()]
    windows = torch.randint(0, 4096, (6, 32), generator=torch.Generator().manual_seed(0))
    taps, records, samples = calibrate(model, list(windows.split(1)), SETTINGS, recipe, progress=False)
    for hook in hooks:
        hook.remove()
    return taps, records, samples, captured


@pytest.mark.parametrize("name", sorted(MODELS))
def test_statistics_equal_numpy_over_the_captured_tensors(name):
    taps, records, _, captured = captured_calibration(name)
    assert set(taps) == set(captured)
    for tap_name, tensors in captured.items():
        flat = np.concatenate([t.double().numpy().ravel() for t in tensors])
        tap = taps[tap_name]
        assert tap["numel"] == flat.size and tap["samples"] == 6, tap_name
        assert (tap["min"], tap["max"], tap["absmax"]) == (flat.min(), flat.max(), np.abs(flat).max())
        assert math.isclose(tap["mean"], flat.mean(), rel_tol=1e-7, abs_tol=1e-9)
        assert math.isclose(tap["std"], flat.std(), rel_tol=1e-7)
        for alpha in ALPHAS:
            entry = tap_scales(tap, records[tap_name], alpha, "quamba", SETTINGS.mantissa_bits)
            exact_clipped = (np.abs(flat) > entry["threshold"]).mean()
            assert abs(entry["clipped_fraction"] - exact_clipped) <= entry["clipped_fraction_error"] + 1e-12
            assert entry["stream_percentile"]["low"] <= np.quantile(np.abs(flat), alpha) <= entry["stream_percentile"]["high"]
            assert entry["clipped_min"] == max(flat.min(), -entry["threshold"])
            assert entry["clipped_max"] == min(flat.max(), entry["threshold"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_thresholds_equal_quambas_observers_run_on_the_captured_tensors(name):
    """Percentile taps: the in-pass QuambaPercentile (torch.quantile per sample, float32 EMA), bit for
    bit, at three alphas, one of them listed nowhere; min/max taps: the running floored absmax."""
    taps, records, _, captured = captured_calibration(name)
    for tap_name, tensors in captured.items():
        percentile, minmax = QuambaPercentile(list(ALPHAS)), QuambaMinMax()
        for t in tensors:
            percentile.update(t)
            minmax.update(t)
        for alpha in ALPHAS:
            entry = tap_scales(taps[tap_name], records[tap_name], alpha, "quamba", SETTINGS.mantissa_bits)
            expected = percentile.values[alpha] if taps[tap_name]["observer"] == "percentile" else minmax.value
            assert entry["threshold"] == expected, (tap_name, alpha)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_min_max_scales_are_divided_in_the_observed_dtype_as_quambas_observer_divides(name):
    """On an fp16 model Quamba's min/max observer keeps its running max in fp16 and divides it by
    127 there, so the scale is rounded to fp16 before it becomes float32; its percentile EMA is
    float32. Mamba1's state is observed as copied into the model's (fp16) cache."""
    taps, records, _, captured = captured_calibration(name, dtype=torch.float16)
    moved = 0
    for tap_name, tensors in captured.items():
        tap = taps[tap_name]
        entry = tap_scales(tap, records[tap_name], 0.9995, "quamba", SETTINGS.mantissa_bits)
        scale = activation_scale(entry["threshold"], scale_dtype=entry["scale_dtype"])
        assert tap["dtype"] == str(tensors[0].dtype).removeprefix("torch."), tap_name
        if tap["observer"] == "minmax":
            minmax = QuambaMinMax()
            for t in tensors:
                minmax.update(t)
            assert (entry["threshold"], entry["scale_dtype"], scale) == (minmax.value, tap["dtype"], minmax.scale)
            moved += scale != activation_scale(entry["threshold"])  # divided in float32
        else:
            assert entry["scale_dtype"] == "float32", tap_name
    assert moved > 0
    if name == "mamba1":
        assert {taps[f"layer_{i}.ssm_state_act:input"]["dtype"] for i in range(3)} == {"float16"}


def test_stream_max_makes_alpha_one_the_true_maximum_and_clip_nothing():
    taps, records, _, captured = captured_calibration("mamba1")
    for tap_name in (n for n, t in taps.items() if t["observer"] == "percentile"):
        true_max = max(float(t.abs().max()) for t in captured[tap_name])
        quamba = tap_scales(taps[tap_name], records[tap_name], 1.0, "quamba", SETTINGS.mantissa_bits)
        stream = tap_scales(taps[tap_name], records[tap_name], 1.0, "stream_max", SETTINGS.mantissa_bits)
        assert stream["threshold"] == true_max and stream["clipped_fraction"] == 0.0
        assert quamba["threshold"] < true_max and quamba["clipped_fraction"] > 0  # Quamba's "1.0" clips


def test_percentile_observer_sits_where_quamba1_puts_it():
    taps, _, _, _ = captured_calibration("mamba1")
    percentile_taps = sorted(n for n, t in taps.items() if t["observer"] == "percentile")
    assert percentile_taps == [f"layer_{i}.{p}" for i in range(3) for p in ("ssm_state_act:input", "x_proj:input")]
    assert taps["layer_0.out_proj:input"]["rotated"] is True
    taps, _, _, _ = captured_calibration("mamba2")
    percentile_taps = sorted(n for n, t in taps.items() if t["observer"] == "percentile")
    assert percentile_taps == [f"layer_{i}.{p}" for i in range(3) for p in ("ssm_state_act:input", "x_conv_out:input")]


def test_quamba2_path_is_min_max_everywhere():
    taps, records, _, _ = captured_calibration("mamba2", Recipe(reorder=True))
    assert {t["observer"] for t in taps.values()} == {"minmax"}
    assert all(record.tails is None for record in records.values())


def test_alpha_one_at_min_max_taps_is_the_absmax():
    taps, records, _, _ = captured_calibration("mamba2")
    for name, tap in taps.items():
        if tap["observer"] == "minmax":
            entry = tap_scales(tap, records[name], 1.0, "quamba", SETTINGS.mantissa_bits)
            assert entry["threshold"] == max(tap["absmax"], 1e-5) or math.isclose(entry["threshold"], 1e-5)
            assert entry["clipped_fraction"] == 0.0 and entry["range_reduction"] == 0.0


def test_activation_samples_cover_the_first_layers_and_come_from_the_stream():
    stats, _, samples, captured = captured_calibration("mamba1")
    assert set(samples) == {n for n in stats if n.startswith(("layer_0.", "layer_1.", "layer_2."))}
    for tap_name, values in samples.items():
        assert values.dtype == np.float32
        assert values.size == min(300, stats[tap_name]["numel"])
        stream = np.concatenate([t.float().numpy().ravel() for t in captured[tap_name]])
        assert np.isin(values, stream).all(), tap_name


def test_calibrate_writes_schema_valid_stats_store_and_npz(model_dir, corpus, tmp_path):
    doc = calibrate_model_dir(model_dir, tmp_path / "out", SETTINGS, data=corpus, progress=False)
    written = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert written == json.loads(json.dumps(doc))
    schema = yaml.safe_load((REPO / "schemas" / "stats.schema.yaml").read_text())
    jsonschema.validate(written, schema)
    assert written["schema_version"] == 4 and written["default_alpha"] == 0.9995 and written["min_alpha"] == 0.999
    assert written["recipe"]["name"] == "quamba" and written["recipe"]["departures"] == []
    assert written["recipe"]["options"]["rotate_residual"] is True
    assert len(written["model"]["sha256"]) == 64 and len(written["data"]["tokens_sha256"]) == 64
    assert (tmp_path / "out" / "calibration.safetensors").stat().st_size > 0
    with np.load(tmp_path / "out" / "activations.npz") as npz:
        assert sorted(npz.files) == sorted(n for n in written["taps"] if n.startswith(("layer_0.", "layer_1.", "layer_2.")))
    broken = dict(written, taps={"layer_0.x_proj:input": {"observer": "median"}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_activation_samples_are_read_whole_or_refused_naming_the_tap(model_dir, corpus, tmp_path):
    """The report plots activations.npz: a damaged or non-finite one is refused, never drawn."""
    from quamba.formats.calibration import npz_bytes, read_activation_samples

    stats = calibrate_model_dir(model_dir, tmp_path / "out", SETTINGS, data=corpus, progress=False)
    path = tmp_path / "out" / "activations.npz"
    samples = read_activation_samples(path, stats)
    with np.load(path) as npz:
        assert sorted(samples) == sorted(npz.files) and all(np.array_equal(samples[t], npz[t].ravel()) for t in npz.files)
    tap = sorted(samples)[1]
    samples[tap][3] = np.nan
    path.write_bytes(npz_bytes(samples))
    with pytest.raises(ConfigError, match="activations.npz: not the file its stats.json was written with"):
        read_activation_samples(path, stats)
    edited = {**stats, "files": {**stats["files"], "activations.npz": hashlib.sha256(path.read_bytes()).hexdigest()}}
    with pytest.raises(ConfigError, match=rf"activations.npz: tap {re.escape(tap)} holds NaN or infinite samples"):
        read_activation_samples(path, edited)  # a consistent but non-finite file
    path.write_bytes(b"not a zip")
    edited["files"]["activations.npz"] = hashlib.sha256(b"not a zip").hexdigest()
    with pytest.raises(ConfigError, match="activations.npz: unreadable activation samples"):
        read_activation_samples(path, edited)


def test_files_of_two_calibrations_in_one_dir_are_refused_and_no_stale_file_is_left(model_dir, corpus, tmp_path):
    """stats.json names the sha256 of the files written with it: a store of another calibration (a
    run killed between its files, a copy) is refused; recalibrating without activation samples
    removes the earlier run's activations.npz."""
    for name, samples in (("a", 4), ("b", 3)):
        calibrate_model_dir(model_dir, tmp_path / name, CalibrationSettings(num_samples=samples, seq_len=48),
                            data=corpus, progress=False)
    derive_scales(tmp_path / "b", 0.9995)
    (tmp_path / "b" / "calibration.safetensors").write_bytes((tmp_path / "a" / "calibration.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="b/calibration.safetensors: not the file its stats.json was written with"):
        derive_scales(tmp_path / "b", 0.9995)
    calibrate_model_dir(model_dir, tmp_path / "a", CalibrationSettings(num_samples=2, seq_len=48, save_activations=False),
                        data=corpus, progress=False)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["calibration.safetensors", "stats.json"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="file: exists and is not a directory"):
        calibrate_model_dir(model_dir, tmp_path / "file", SETTINGS, data=corpus, progress=False)


def test_an_older_stats_json_is_refused_saying_how_to_rebuild(model_dir, corpus, tmp_path):
    calibrate_model_dir(model_dir, tmp_path / "out", SETTINGS, data=corpus, progress=False)
    path = tmp_path / "out" / "stats.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "schema_version": 2}))
    with pytest.raises(ConfigError, match=r"schema_version 2.*reads version 4.*rerun `quamba calibrate`"):
        derive_scales(tmp_path / "out", 0.9995)


def test_two_runs_give_byte_identical_files(model_dir, corpus, tmp_path):
    for run in ("a", "b"):
        calibrate_model_dir(model_dir, tmp_path / run, SETTINGS, data=corpus, progress=False)
    for name in ("stats.json", "calibration.safetensors", "activations.npz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_rows_in_file_order_ignore_the_seed_and_a_seeded_order_follows_it(model_dir, corpus, tmp_path):
    a = calibrate_model_dir(model_dir, tmp_path / "a", SETTINGS, data=corpus, progress=False)
    other_seed = CalibrationSettings(**{**SETTINGS.__dict__, "seed": 2})
    b = calibrate_model_dir(model_dir, tmp_path / "b", other_seed, data=corpus, progress=False)
    assert a["data"]["tokens_sha256"] == b["data"]["tokens_sha256"]  # Quamba: the first rows, whatever the seed
    seeded = Recipe(calibration_order="seeded")
    c = calibrate_model_dir(model_dir, tmp_path / "c", SETTINGS, seeded, data=corpus, progress=False)
    d = calibrate_model_dir(model_dir, tmp_path / "d", other_seed, seeded, data=corpus, progress=False)
    assert len({a["data"]["tokens_sha256"], c["data"]["tokens_sha256"], d["data"]["tokens_sha256"]}) == 3
    assert c["recipe"]["departures"] == ["calibration_order"]


@pytest.mark.parametrize("change, recipe, message", [
    ({"min_alpha": 1.5}, Recipe(), "min_alpha: 1.5 is outside (0, 1]"),
    ({"min_alpha": 0.0}, Recipe(), "min_alpha: 0.0 is outside (0, 1]"),
    ({"activation_layers": (0, 7)}, Recipe(), "activation_layers: layer 7 does not exist"),
    ({"num_samples": 100_000}, Recipe(), "fewer than the 100000 samples"),
    ({"batch_size": 2}, Recipe(), "batch_size: 2 with recipe.calibration_data rows"),
    ({"seed": -1}, Recipe(), "seed: must be an integer >= 0"),
])
def test_bad_settings_fail_clearly_and_write_nothing(model_dir, corpus, tmp_path, change, recipe, message):
    settings = CalibrationSettings(**{**SETTINGS.__dict__, **change})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        calibrate_model_dir(model_dir, tmp_path / "out", settings, recipe, data=corpus, progress=False)
    assert not (tmp_path / "out").exists()


def test_empty_corpus_fails_clearly(model_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ConfigError, match="empty.txt: holds no documents"):
        calibrate_model_dir(model_dir, tmp_path / "out", SETTINGS, data=tmp_path / "empty.txt", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_model_dir_without_its_tokenizer_or_with_a_damaged_one_is_refused(model_dir, corpus, tmp_path):
    """Never another tokenizer's tokens in its place (the shipped demo tokenizer used to stand in)."""
    import shutil

    bare, damaged = tmp_path / "bare", tmp_path / "damaged"
    for copy in (bare, damaged):
        shutil.copytree(model_dir, copy)
    for path in bare.glob("tokenizer*"):
        path.unlink()
    (damaged / "tokenizer.json").write_text("{")
    with pytest.raises(CheckpointError, match="bare: no tokenizer"):
        calibrate_model_dir(bare, tmp_path / "out", SETTINGS, data=corpus, progress=False)
    with pytest.raises(CheckpointError, match="damaged: its tokenizer does not load"):
        calibrate_model_dir(damaged, tmp_path / "out", SETTINGS, data=corpus, progress=False)
    assert not (tmp_path / "out").exists()


def test_non_finite_activations_fail_naming_the_tap_and_sample(tmp_path):
    model = random_model(MODELS["mamba1"])
    with torch.no_grad():
        model.backbone.layers[1].mixer.in_proj.weight[0, 0] = float("nan")
    windows = torch.randint(0, 4096, (3, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=r"tap layer_1\.in_proj:output saw a non-finite value.* in sample 0"):
        calibrate(model, list(windows.split(1)), SETTINGS, progress=False)


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


def test_cli_calibrate_then_scales_and_view(model_dir, corpus, tmp_path):
    quamba = [sys.executable, "-m", "quamba.cli"]
    run = subprocess.run([*quamba, "calibrate", str(model_dir), "--samples", "4", "--seq-len", "16",
                          "--save-activations", "--activation-layers", "0", "--activation-samples", "50",
                          "--data", str(corpus), "--out", str(tmp_path / "c")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    with np.load(tmp_path / "c" / "activations.npz") as npz:
        assert all(name.startswith("layer_0.") for name in npz.files)
    scales = subprocess.run([*quamba, "scales", str(tmp_path / "c"), "--alpha", "0.99973", "--out",
                             str(tmp_path / "s.json")], capture_output=True, text=True)
    assert scales.returncode == 0, scales.stderr
    assert json.loads((tmp_path / "s.json").read_text())["alpha"] == 0.99973
    low = subprocess.run([*quamba, "scales", str(tmp_path / "c"), "--alpha", "0.99", "--out", str(tmp_path / "t.json")],
                         capture_output=True, text=True)
    assert low.returncode == 2 and "below the calibration's min_alpha 0.999" in low.stderr
    assert "calibrations.NAME.min_alpha" in low.stderr and not (tmp_path / "t.json").exists()
    view = subprocess.run([*quamba, "view", str(tmp_path / "c"), "--filter", "layer_1", "--alphas", "0.999", "1.0"],
                          capture_output=True, text=True)
    assert view.returncode == 0, view.stderr
    table = view.stdout.split("\n\n", 1)[1]
    assert "layer_1.in_proj:input" in table and "layer_0" not in table
    assert "a=0.999" in table and "a=1.0" in table and "stream q" in table and "clipped %" in table
    compare = subprocess.run([*quamba, "view", str(tmp_path / "c" / "stats.json"), "--compare",
                              str(tmp_path / "c")], capture_output=True, text=True)
    assert "B/A" in compare.stdout
    bad = subprocess.run([*quamba, "calibrate", str(model_dir), "--calibration-data", "chunks", "--out",
                          str(tmp_path / "d")], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'chunks'" in bad.stderr and "'rows', 'packed'" in bad.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_fused_observer_statistics_in_a_whole_calibration_equal_the_eager_ones(layer, monkeypatch):
    """observers.FUSE_ON_CUDA's path through calibrate (tap by tap), compiled on the CPU with the fp16 path forced
    on (as CUDA runs it): rows of their own lengths, every tap's shape through one dynamic kernel;
    histograms, tails, min and max bit for bit, std to its float64 sums' last bits."""
    monkeypatch.setattr(StreamHistogram, "takes_fp16_path", lambda self, x: x.dtype == torch.float16)
    extra = {"d_state": 32, "headdim": 32, "chunk_size": 64} if layer == "Mamba2" else {}
    model = random_model(MambaConfig(d_model=128, n_layer=2, vocab_size=4096, layer=layer, **extra)).half()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 4096, (1, n), generator=g) for n in (256, 131, 256, 77)]
    runs = {}
    for fused in (False, True):
        monkeypatch.setattr(observers, "FUSE_ON_CUDA", fused)
        runs[fused] = calibrate(model, rows, CalibrationSettings(num_samples=4, seq_len=256), Recipe(), progress=False,
                                stacked=False)
    (taps, records, _), (fused_taps, fused_records, _) = runs[False], runs[True]
    for name in taps:
        assert torch.equal(fused_records[name].histogram, records[name].histogram), name
        assert fused_records[name].histogram_offset == records[name].histogram_offset, name
        for a, b in zip(fused_records[name].tails or [], records[name].tails or [], strict=True):
            assert torch.equal(a, b), name
        assert (fused_taps[name]["min"], fused_taps[name]["max"]) == (taps[name]["min"], taps[name]["max"]), name
        assert math.isclose(fused_taps[name]["std"], taps[name]["std"], rel_tol=1e-9), name


def assert_same_calibration(a, b):
    """Two calibrate() results equal bit for bit: stats, histograms, tails, activation samples."""
    (taps, records, samples), (other_taps, other_records, other_samples) = a, b
    assert taps == other_taps  # min, max, mean, std (float64 sums), counts, shapes
    assert records.keys() == other_records.keys() and samples.keys() == other_samples.keys()
    for name, record in records.items():
        other = other_records[name]
        assert record.histogram_offset == other.histogram_offset and torch.equal(record.histogram, other.histogram), name
        assert (record.tails is None) == (other.tails is None) and record.numels == other.numels, name
        for x, y in zip(record.tails or [], other.tails or [], strict=True):
            assert x.dtype == y.dtype and torch.equal(x, y), name
    for name, sample in samples.items():
        assert np.array_equal(sample, other_samples[name]), name


@pytest.mark.parametrize("layer, width, recipe, batch, fp16_path", [
    ("Mamba1", 64, Recipe(), 1, False),
    ("Mamba2", 64, Recipe(), 1, False),
    ("Mamba1", 96, Recipe(), 1, False),  # out_proj's input rotated through the 12 x 12 base matrix
    ("Mamba2", 80, Recipe(calibration_data="packed"), 2, False),  # ... the 40 x 40 one, as mamba2-2.7b's 5120
    ("Mamba2", 64, Recipe(reorder=True, calibration_data="packed"), 2, False),  # Quamba2: min/max everywhere
    ("Mamba1", 64, Recipe(calibration_data="packed"), 3, True),  # the histogram CUDA counts fp16 by
    ("Mamba2", 80, Recipe(), 1, True),
])
def test_stacked_observers_give_the_reference_calibration_bit_for_bit(layer, width, recipe, batch, fp16_path,
                                                                      monkeypatch):
    """Every tap point of every block observed at once after each forward equals every tap observed
    alone in its hook: rows of their own lengths (a new stack shape per window) and stacked
    batches, chunks of rows (a small STACK_ELEMENTS), the fp16 histogram path forced on (its rows
    counted whole and, with a small HISTC_CHUNK, in chunks)."""
    if fp16_path:
        monkeypatch.setattr(StreamHistogram, "takes_fp16_path", lambda self, x: x.dtype == torch.float16)
    extra = {"d_state": 16, "headdim": 16, "chunk_size": 16} if layer == "Mamba2" else {}
    model = random_model(MambaConfig(d_model=width, n_layer=3, vocab_size=4096, layer=layer, **extra))
    if fp16_path:
        model = model.half()
    g = torch.Generator().manual_seed(0)
    if batch == 1:
        batches = [torch.randint(0, 4096, (1, n), generator=g) for n in (32, 17, 32, 5)]
    else:
        batches = list(torch.randint(0, 4096, (4 * batch, 32), generator=g).split(batch))
    settings = CalibrationSettings(num_samples=4 * batch, seq_len=32, batch_size=batch, activation_samples=300,
                                   activation_layers=(0, 2))
    if recipe.reorder:
        from quamba.transforms.reorder import reorder_model, reorder_record, reorder_statistics
        reorder_model(model, reorder_record(model, reorder_statistics(model, batches), 2, 2, "quamba"))
    reference = calibrate(model, batches, settings, recipe, progress=False, stacked=False)
    assert_same_calibration(calibrate(model, batches, settings, recipe, progress=False), reference)
    monkeypatch.setattr(calibration_observers, "STACK_ELEMENTS", 64 * 32 * 2)  # a few rows per stack
    monkeypatch.setattr(StreamHistogram, "HISTC_CHUNK", 1000)  # rows counted by several histc calls each
    assert_same_calibration(calibrate(model, batches, settings, recipe, progress=False), reference)


@pytest.mark.parametrize("stacked", [True, False])
def test_a_non_finite_activation_is_named_by_tap_and_sample_on_both_paths(stacked):
    """A NaN embedding row that only the third window looks up: sample 2, at the first tap after it."""
    model = random_model(MODELS["mamba2"])
    with torch.no_grad():
        model.backbone.embedding.weight[7] = float("nan")
    windows = torch.randint(10, 4096, (4, 16), generator=torch.Generator().manual_seed(0))
    windows[2, 5] = 7
    with pytest.raises(ConfigError, match=r"tap layer_0\.in_proj:input saw a non-finite value.* in sample 2;"):
        calibrate(model, list(windows.split(1)), SETTINGS, progress=False, stacked=stacked)


def test_the_graph_plan_takes_recurring_window_shapes_within_the_token_budget(monkeypatch):
    """calibration_graphs.graphed_shapes: from the windows alone, most frequent first; a shape seen
    fewer than MIN_REPEATS times or past the budget (TOKEN_BUDGET longest windows) runs eagerly."""
    from quamba.stages import calibration_graphs

    def windows(*lengths):
        return [torch.zeros(1, n, dtype=torch.long) for n in lengths]

    monkeypatch.setattr(calibration_graphs, "MIN_REPEATS", 2)
    monkeypatch.setattr(calibration_graphs, "TOKEN_BUDGET", 2)  # 2 x 512 tokens
    plan = calibration_graphs.graphed_shapes(windows(512, 30, 512, 512, 30, 7, 500, 500, 30))
    assert plan == {(1, 512), (1, 30)}  # 512 (3 times) and 30 (3) fit; then 500 (2) would pass 1024
    assert calibration_graphs.graphed_shapes(windows(64, 32, 16)) == set()  # nothing recurs
    packed = [torch.zeros(4, 256, dtype=torch.long)] * 5
    assert calibration_graphs.graphed_shapes(packed) == {(4, 256)}


def test_graphs_asked_for_on_the_cpu_run_the_eager_pass():
    model = random_model(MODELS["mamba2"])
    windows = list(torch.randint(0, 4096, (6, 16), generator=torch.Generator().manual_seed(0)).split(1))
    assert_same_calibration(calibrate(model, windows, SETTINGS, progress=False, graphs=True),
                            calibrate(model, windows, SETTINGS, progress=False, graphs=False))
