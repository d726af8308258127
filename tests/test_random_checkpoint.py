"""Random checkpoints of the published architectures: their configs, that they load and run,
determinism, the outlier channels, and atomic, checked writing."""

import math

import pytest
import torch
from safetensors.torch import load_file

import quamba
from quamba.errors import ConfigError
from quamba.models import random_checkpoint
from quamba.models.checkpoint import normalize, read_config
from quamba.models.random_checkpoint import ARCHITECTURES, write_random_checkpoint
from quamba.models.taps import named_taps

# name: (layer, d_model, n_layer), as in the config.json of state-spaces/<name>
PUBLISHED = {
    "mamba-130m": ("Mamba1", 768, 24), "mamba-370m": ("Mamba1", 1024, 48),
    "mamba-790m": ("Mamba1", 1536, 48), "mamba-1.4b": ("Mamba1", 2048, 48),
    "mamba-2.8b": ("Mamba1", 2560, 64),
    "mamba2-130m": ("Mamba2", 768, 24), "mamba2-370m": ("Mamba2", 1024, 48),
    "mamba2-780m": ("Mamba2", 1536, 48), "mamba2-1.3b": ("Mamba2", 2048, 48),
    "mamba2-2.7b": ("Mamba2", 2560, 64),
}
PADDED_VOCAB = {"Mamba1": 50280, "Mamba2": 50288}  # 50277 up to a multiple of 8 / of 16
SSM_INPUT = {"Mamba1": "layer_0.x_proj:input", "Mamba2": "layer_0.x_conv_out:input"}
# max|x| / quantile(|x|, 0.9995) of layer 0's SSM input over the 256 random tokens below, as
# measured: 4.45 (mamba-130m) and 4.63 (mamba2-130m) at seed 0, 4.2-4.8 over seeds 0-3; the plain
# mamba_ssm init (no outliers, no heavy tails) gives 1.5-1.8.
OUTLIER_RATIO_BOUND = 3.0


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """2-layer dirs of the two 130m architectures (seed 0), shared by the tests that only read."""
    root = tmp_path_factory.mktemp("random")
    return {arch: write_random_checkpoint(arch, root / arch, n_layer=2) for arch in ("mamba-130m", "mamba2-130m")}


def test_architectures_have_the_published_configs():
    assert set(ARCHITECTURES) == set(PUBLISHED)
    for name, (layer, d_model, n_layer) in PUBLISHED.items():
        config = ARCHITECTURES[name]
        assert (config.layer, config.d_model, config.n_layer, config.d_inner) == (layer, d_model, n_layer, 2 * d_model)
        assert (config.vocab_size, config.padded_vocab_size) == (50277, PADDED_VOCAB[layer])
        assert (config.d_conv, config.expand, config.tie_embeddings, config.residual_in_fp32) == (4, 2, True, True)
        raw = config.to_state_spaces()
        assert raw["rms_norm"] and raw["d_intermediate"] == 0 and raw["ssm_cfg"]["layer"] == layer
        if layer == "Mamba1":
            assert (config.d_state, config.dt_rank, raw["ssm_cfg"]["dt_rank"]) == (16, None, "auto")
            assert config.resolved_dt_rank == math.ceil(d_model / 16)
        else:
            assert (config.headdim, config.d_state, config.ngroups, config.chunk_size) == (64, 128, 1, 256)
            assert config.nheads == 2 * d_model // 64
    big = ARCHITECTURES["mamba2-2.7b"]
    assert (big.d_inner, big.nheads, big.headdim, big.d_state) == (5120, 80, 64, 128)


@pytest.mark.parametrize("arch", ["mamba-130m", "mamba2-130m"])
def test_written_dir_loads_and_runs_with_the_depth_it_says(written, arch):
    config, fmt = read_config(written[arch])
    assert (config, fmt) == (ARCHITECTURES[arch].replace(n_layer=2), "state-spaces")
    model = quamba.load(written[arch], device="cpu")
    ids = torch.tensor([[1, 17, 300, 4095, 50276]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 5, PADDED_VOCAB[config.layer])
    assert torch.isfinite(logits).all()


def test_same_seed_same_bytes_other_seed_other_bytes_and_layers_independent_of_depth(written, tmp_path):
    again = write_random_checkpoint("mamba-130m", tmp_path / "again", n_layer=2)
    other_seed = write_random_checkpoint("mamba-130m", tmp_path / "seed1", seed=1, n_layer=2)
    one_layer = write_random_checkpoint("mamba-130m", tmp_path / "one", n_layer=1)
    reference = (written["mamba-130m"] / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == reference
    assert (other_seed / "model.safetensors").read_bytes() != reference
    two, one = load_file(written["mamba-130m"] / "model.safetensors"), load_file(one_layer / "model.safetensors")
    assert set(one) == {k for k in two if not k.startswith("backbone.layers.1.")}
    for key in one:  # out_proj too: scaled by the published depth, not the written one
        assert torch.equal(one[key], two[key]), key


def test_the_weights_do_not_depend_on_how_many_threads_draw_them():
    _, serial = random_checkpoint.random_state_dict("mamba2-130m", n_layer=2, workers=1)
    _, threaded = random_checkpoint.random_state_dict("mamba2-130m", n_layer=2, workers=3)
    assert list(threaded) == list(serial)  # the state dict's order, not the drawing order
    for key in serial:
        assert torch.equal(threaded[key], serial[key]), key


@pytest.mark.parametrize("arch", ["mamba-130m", "mamba2-130m"])
def test_ssm_input_has_outliers_far_above_its_99_95th_percentile(written, arch):
    model = quamba.load(written[arch], device="cpu")
    seen = {}

    def keep(module, args, out):  # returns None: the output passes on unchanged
        seen["x"] = out.detach().abs().flatten()

    named_taps(model)[SSM_INPUT[model.config.layer]].register_forward_hook(keep)
    ids = torch.randint(0, 50277, (1, 256), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
    ratio = (seen["x"].max() / torch.quantile(seen["x"], 0.9995)).item()
    print(f"{arch}: max / 99.95th percentile of layer 0's SSM input = {ratio:.2f}")
    assert ratio > OUTLIER_RATIO_BOUND, ratio


def test_unknown_arch_is_a_config_error_listing_the_names_and_writes_nothing(tmp_path):
    with pytest.raises(ConfigError, match="'mamba-7b'") as err:
        write_random_checkpoint("mamba-7b", tmp_path / "m")
    assert all(name in str(err.value) for name in ARCHITECTURES)
    with pytest.raises(ConfigError, match="n_layer"):
        write_random_checkpoint("mamba-130m", tmp_path / "m", n_layer=0)
    assert list(tmp_path.iterdir()) == []


def test_a_crash_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash(state, path, metadata=None):
        path.write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(random_checkpoint, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        write_random_checkpoint("mamba2-130m", tmp_path / "m", n_layer=1)
    assert list(tmp_path.iterdir()) == []


def test_written_dir_passes_normalize_unchanged(written, tmp_path):
    src = written["mamba2-130m"]
    out = normalize(src, tokenizer=src, out_dir=tmp_path / "normalized")
    assert {"config.json", "model.safetensors", "source.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert read_config(out) == read_config(src)
    normalized, ours = load_file(out / "model.safetensors"), load_file(src / "model.safetensors")
    assert normalized.keys() == ours.keys()
    for key, tensor in ours.items():
        assert normalized[key].dtype == tensor.dtype and torch.equal(normalized[key], tensor), key
    assert {k for k, t in ours.items() if t.dtype == torch.float32} == {  # Mamba2's D, as Quamba keeps it
        k for k in ours if k.endswith(".mixer.D")}
