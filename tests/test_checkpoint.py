"""Checkpoint formats in and out, `quamba.load`, and the errors a user meets with a bad model dir."""

import json

import pytest
import torch
from conftest import REPO, random_model
from safetensors.torch import load_file, save_file
from test_models import CONFIGS, to_transformers

import quamba
from quamba.errors import CheckpointError, ConfigError
from quamba.models import MambaConfig
from quamba.models.checkpoint import normalize, read_config, resolve_model_dir

IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def write_state_spaces(model, out, weights="pytorch_model.bin"):
    """A dir as mamba_ssm's save_pretrained writes it (the .bin holds the tied lm_head too)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.config.to_state_spaces()))
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    if weights == "pytorch_model.bin":
        torch.save(state, out / weights)
    else:
        state.pop("lm_head.weight", None) if model.config.tie_embeddings else None
        save_file(state, out / weights)
    return out


@pytest.fixture
def tokenizer_dir(repo):
    return repo / "resources" / "tokenizer"


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.safetensors"])
@pytest.mark.parametrize("name", ["mamba1", "mamba2-ngroups2-padded"])
def test_state_spaces_dir_loads_with_same_logits(tmp_path, name, weights):
    model = random_model(CONFIGS[name])
    write_state_spaces(model, tmp_path / "m", weights)
    loaded = quamba.load(tmp_path / "m", device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("name", ["mamba1", "mamba2-ngroups2-padded"])
def test_transformers_dir_loads_with_same_logits(tmp_path, name):
    model = random_model(CONFIGS[name])
    hf = to_transformers(model)
    hf.save_pretrained(tmp_path / "hf")
    loaded = quamba.load(tmp_path / "hf", device="cpu")
    assert read_config(tmp_path / "hf")[1] == "transformers"
    with torch.no_grad():
        assert (loaded(IDS).logits - hf(IDS).logits).abs().max().item() <= 1e-4


def test_normalize_writes_fp16_dir_with_tokenizer_and_source_hash(tmp_path, tokenizer_dir):
    model = random_model(CONFIGS["mamba2"])
    src = write_state_spaces(model, tmp_path / "src")
    out = normalize(src, tokenizer_dir, tmp_path / "out")
    assert {"config.json", "model.safetensors", "source.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    source = json.loads((out / "source.json").read_text())
    assert source["format"] == "state-spaces" and len(source["sha256"]) == 64
    reloaded = quamba.load(out, device="cpu")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.backbone.embedding.weight.data_ptr()
    with torch.no_grad():
        rounded = model.to_dtype("cpu", torch.float16).float()  # fp16 but the float32 parameters
        diff = (reloaded(IDS).logits - rounded(IDS).logits).abs().max().item()
    assert diff <= 1e-4
    assert not list(tmp_path.glob(".out.*")), "temp dir left behind"


@pytest.mark.parametrize("name, float32", [("mamba1", {"A_log", "D"}), ("mamba2", {"D"})])
def test_the_fp16_dir_and_an_fp16_model_keep_quambas_float32_parameters_in_float32(tmp_path, tokenizer_dir,
                                                                                  name, float32):
    """Quamba's modules hold Mamba1's A_log and D and Mamba2's D in float32 in its fp16 model: the
    normalized dir stores them so (the source's values, not rounded to fp16), and so does an fp16
    model loaded from it; every other tensor is fp16."""
    model = random_model(CONFIGS[name])
    out = normalize(write_state_spaces(model, tmp_path / "src"), tokenizer_dir, tmp_path / "out")
    stored = load_file(out / "model.safetensors")
    for key, value in stored.items():
        kept = key.startswith("backbone.layers.") and key.rsplit(".", 1)[1] in float32
        assert value.dtype == (torch.float32 if kept else torch.float16), key
        if kept:
            assert torch.equal(value, model.state_dict()[key]), key
    mixer = quamba.load(out, device="cpu", dtype="float16").backbone.layers[0].mixer
    for param in ("A_log", "D"):
        expected = stored[f"backbone.layers.0.mixer.{param}"]
        assert getattr(mixer, param).dtype == expected.dtype and torch.equal(getattr(mixer, param), expected)


def test_normalize_is_byte_identical_on_rerun(tmp_path, tokenizer_dir):
    src = write_state_spaces(random_model(CONFIGS["mamba1"]), tmp_path / "src")
    a = normalize(src, tokenizer_dir, tmp_path / "a")
    b = normalize(src, tokenizer_dir, tmp_path / "b")
    for path in a.iterdir():  # hash.json included: it records the files' hash and sizes only
        assert path.read_bytes() == (b / path.name).read_bytes(), path.name


def test_load_defaults_to_fp32_on_cpu_and_accepts_dtype_names(tmp_path):
    write_state_spaces(random_model(CONFIGS["mamba1"]), tmp_path / "m")
    assert quamba.load(tmp_path / "m", device="cpu").lm_head.weight.dtype == torch.float32
    assert quamba.load(tmp_path / "m", device="cpu", dtype="bf16").lm_head.weight.dtype == torch.bfloat16


def test_missing_dir_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such model directory"):
        resolve_model_dir(tmp_path / "nope")


def test_missing_config_names_the_file(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        quamba.load(tmp_path / "m", device="cpu")


def test_unknown_architecture_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8,
                                                            "num_hidden_layers": 1, "vocab_size": 8,
                                                            "state_size": 4}))
    with pytest.raises(CheckpointError, match="model_type='llama' is not supported"):
        quamba.load(tmp_path / "m", device="cpu")


def test_config_without_known_keys_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="unknown architecture"):
        quamba.load(tmp_path / "m", device="cpu")


def test_a_non_finite_number_in_config_json_is_refused_naming_the_key(tmp_path):
    """norm_epsilon NaN made every logit NaN, and an evaluation of chance accuracy."""
    src = write_state_spaces(random_model(CONFIGS["mamba2"]), tmp_path / "m")
    raw = json.loads((src / "config.json").read_text())
    raw["norm_epsilon"] = float("nan")
    (src / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"m/config.json: norm_epsilon is nan; NaN and infinity are not allowed"):
        quamba.load(src, device="cpu")


def test_unsupported_ssm_option_names_the_key(tmp_path):
    model = random_model(CONFIGS["mamba2"])
    src = write_state_spaces(model, tmp_path / "m")
    raw = json.loads((src / "config.json").read_text())
    raw["ssm_cfg"]["norm_before_gate"] = True
    (src / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="ssm_cfg.norm_before_gate"):
        quamba.load(src, device="cpu")


def test_corrupt_weights_name_the_file(tmp_path):
    src = write_state_spaces(random_model(CONFIGS["mamba1"]), tmp_path / "m", "model.safetensors")
    (src / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        quamba.load(src, device="cpu")


def test_missing_weights_are_reported(tmp_path):
    src = write_state_spaces(random_model(CONFIGS["mamba1"]), tmp_path / "m")
    (src / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        quamba.load(src, device="cpu")


def test_shape_mismatch_names_the_key(tmp_path):
    model = random_model(CONFIGS["mamba1"])
    src = write_state_spaces(model, tmp_path / "m")
    raw = json.loads((src / "config.json").read_text())
    raw["ssm_cfg"]["d_state"] = 8
    (src / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"A_log'? has shape \(128, 16\)"):
        quamba.load(src, device="cpu")


def test_missing_key_is_reported(tmp_path):
    model = random_model(CONFIGS["mamba1"])
    src = tmp_path / "m"
    write_state_spaces(model, src)
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    del state["backbone.layers.1.mixer.D"]
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"missing keys \['backbone.layers.1.mixer.D'\]"):
        quamba.load(src, device="cpu")


def test_config_rejects_inconsistent_heads():
    with pytest.raises(Exception, match="headdim"):
        MambaConfig(d_model=64, n_layer=1, vocab_size=10, layer="Mamba2", headdim=48)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("command", [["calibrate", "--samples", "2", "--seq-len", "8"], ["gptq", "--w-bits", "8"],
                                     ["eval", "--tasks", "perplexity"]])
def test_cuda_asked_for_on_a_machine_without_it_fails_before_any_work(tmp_path, capsys, command):
    from quamba.cli import main

    model = REPO / "resources" / "models" / "mamba1-demo"
    args = [command[0], str(model), *command[1:], "--device", "cuda", "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "device: 'cuda' was asked for, but torch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="device: 'cuda' was asked for"):
        quamba.load(model, device="cuda")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_fail_at_load_and_normalize_naming_the_tensor(tmp_path, tokenizer_dir, value):
    model = random_model(CONFIGS["mamba1"])
    with torch.no_grad():
        model.backbone.layers[1].mixer.in_proj.weight[3, 5] = value
    src = write_state_spaces(model, tmp_path / "m", "model.safetensors")
    message = r"weight 'backbone.layers.1.mixer.in_proj.weight' holds 1 non-finite values \(NaN or inf\)"
    with pytest.raises(CheckpointError, match=message):
        quamba.load(src, device="cpu")
    with pytest.raises(CheckpointError, match=message):
        normalize(src, tokenizer_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_finiteness_check_finds_any_nan_or_inf_wherever_it_is(dtype):
    """check_finite reads min and max (one fast pass): every NaN, +inf and -inf at the first, a
    middle and the last element of vector-unrolled lengths is found, and finite extremes pass."""
    import quamba.models.checkpoint as checkpoint

    for n in (1, 7, 64, 1000, 100_003):
        for position in {0, n // 2, n - 1}:
            for value in (float("nan"), float("inf"), -float("inf")):
                tensor = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
                tensor[position] = value
                assert not checkpoint._all_finite(tensor), (n, position, value)
    extremes = torch.tensor([torch.finfo(dtype).max, torch.finfo(dtype).min, 0.0], dtype=dtype)
    assert checkpoint._all_finite(extremes) and checkpoint._all_finite(torch.empty(0, dtype=dtype))
    with pytest.raises(CheckpointError, match=r"'w' holds 2 non-finite values"):
        checkpoint.check_finite({"w": torch.tensor([1.0, -float("inf"), float("nan")], dtype=dtype)}, "src")


def test_a_weight_that_overflows_float16_fails_normalize(tmp_path, tokenizer_dir):
    model = random_model(CONFIGS["mamba1"])
    with torch.no_grad():
        model.backbone.layers[0].mixer.x_proj.weight[0, 0] = 1e6  # finite in fp32, inf in fp16
    src = write_state_spaces(model, tmp_path / "m", "model.safetensors")
    with pytest.raises(CheckpointError, match=r"out: weight 'backbone.layers.0.mixer.x_proj.weight' holds 1 non-finite values "
                                              r"\(NaN or inf\) in float16 \(a weight beyond 65504 overflows\)"):
        normalize(src, tokenizer_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gptq_and_quantize_refuse_a_dir_that_is_not_normalized(tmp_path, tokenizer_dir):
    from quamba.stages.assemble import quantize_model_dir
    from quamba.stages.gptq import GPTQSettings, gptq_model_dir

    model = random_model(CONFIGS["mamba1"])
    to_transformers(model).save_pretrained(tmp_path / "hf")
    mamba_ssm = write_state_spaces(model, tmp_path / "bin")  # pytorch_model.bin, as mamba_ssm saves
    for src, kind in ((tmp_path / "hf", "a transformers checkpoint"), (mamba_ssm, "a checkpoint without model")):
        hint = rf"{kind}.*; `quamba gptq` takes an FP16 dir written by `quamba normalize` \(run `quamba normalize"
        with pytest.raises(CheckpointError, match=hint):
            gptq_model_dir(src, tmp_path / "g", GPTQSettings(w_bits=8))
        with pytest.raises(CheckpointError, match=r"`quamba quantize` takes an FP16 dir written by `quamba normalize`"):
            quantize_model_dir(src, tmp_path / "q", tmp_path / "g", "w4a16")
    assert not (tmp_path / "g").exists() and not (tmp_path / "q").exists()


def test_the_fp16_dir_is_hashed_once_and_rehashed_when_a_file_changes(tmp_path, tokenizer_dir, monkeypatch):
    import os

    import quamba.models.checkpoint as checkpoint
    from quamba.io import sha256_files

    src = write_state_spaces(random_model(CONFIGS["mamba1"]), tmp_path / "m", "model.safetensors")
    out = normalize(src, tokenizer_dir, tmp_path / "out")
    recorded = json.loads((out / "hash.json").read_text())["sha256"]
    assert recorded == sha256_files([out / "config.json", out / "model.safetensors"])
    calls = []
    monkeypatch.setattr(checkpoint, "sha256_files", lambda files: calls.append(files) or "rehashed")
    assert checkpoint.model_sha256(out) == recorded and calls == []  # sizes and mtimes match: the record
    record = (out / "hash.json").stat()
    os.utime(out / "model.safetensors", ns=(record.st_atime_ns, record.st_mtime_ns + 1))  # newer: hash again
    assert checkpoint.model_sha256(out) == "rehashed" and len(calls) == 1
