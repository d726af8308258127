"""The recipe's options through the pipeline: residual rotation (Quamba's default) or not, Quamba2
reordering (Mamba2), lm_head's GPTQ and quantization, the W8 path and the grids; each stage
records them and assembly refuses inputs built otherwise."""

import hashlib
import json

import pytest
import torch
from conftest import REPO, random_model
from safetensors.torch import load_file, save_file

import quamba
from quamba.errors import ConfigError
from quamba.formats.calibration import read_stats
from quamba.models import MambaConfig
from quamba.models.checkpoint import save_fp16
from quamba.models.taps import named_taps
from quamba.numerics.gptq import rtn
from quamba.recipe import Recipe
from quamba.stages.assemble import quantize_model_dir
from quamba.stages.calibrate import CalibrationSettings, calibrate_model_dir
from quamba.stages.gptq import GPTQSettings, gptq_model_dir, gptq_quantize_model
from quamba.stages.scales import scales_file

TOKENIZER = REPO / "resources" / "tokenizer"
MAMBA2 = MambaConfig(d_model=64, n_layer=2, vocab_size=4096, layer="Mamba2", d_state=16, headdim=16, ngroups=2,
                     chunk_size=16)
CALIB = CalibrationSettings(num_samples=4, seq_len=48, save_activations=False)
REORDER, PLAIN = Recipe(reorder=True), Recipe(rotate_residual=False)
GPTQ_SMALL = dict(w_bits=8, nsamples=4, seqlen=48, batch_size=2)
IDS = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A Mamba2 FP16 dir, stats.json and GPTQ dirs with every option on, and with none."""
    root = tmp_path_factory.mktemp("options")
    corpus = root / "corpus.txt"
    corpus.write_text((REPO / "resources" / "corpus" / "valid.txt").read_text()[:20_000])
    fp16 = save_fp16(random_model(MAMBA2), root / "fp16", TOKENIZER)
    calibrate_model_dir(fp16, root / "calib", CALIB, REORDER, data=corpus, progress=False)
    calibrate_model_dir(fp16, root / "plain", CALIB, PLAIN, data=corpus, progress=False)
    scales_file(root / "calib", 0.99999, root / "scales.json")
    scales_file(root / "plain", 0.99999, root / "plain_scales.json")
    gptq_model_dir(fp16, root / "gptq", GPTQSettings(**GPTQ_SMALL), REORDER, data=corpus,
                   progress=False, calib_dir=root / "calib")
    return {"root": root, "corpus": corpus, "fp16": fp16, "calib": root / "calib", "stats": root / "calib" / "stats.json",
            "plain": root / "plain", "scales": root / "scales.json", "plain_scales": root / "plain_scales.json",
            "gptq": root / "gptq"}


def test_stats_record_the_reorder_plan_and_x_ranges_before_and_after(pipeline):
    stats = read_stats(pipeline["stats"])  # schema-valid
    assert stats["recipe"]["options"]["rotate_residual"] is True and stats["recipe"]["departures"] == ["reorder"]
    layer = stats["reorder"]["layers"]["layer_1"]
    assert sorted(layer["channel_order"]) == list(range(MAMBA2.d_inner))
    assert max(layer["group_absmax_after"]) == max(layer["group_absmax_before"])
    assert sum(layer["group_absmax_after"]) <= sum(layer["group_absmax_before"])
    plain = read_stats(pipeline["plain"])
    assert "reorder" not in plain and plain["recipe"]["departures"] == ["rotate_residual"]
    # x's per-tensor range is a permutation invariant: the reordered and rotated model sees the same values
    for tap in ("layer_1.x_conv_out:input", "layer_1.z_act:input"):
        assert stats["taps"][tap]["absmax"] == pytest.approx(plain["taps"][tap]["absmax"], rel=1e-4)


def test_gptq_dir_records_its_options_and_the_plan_it_used(pipeline):
    info = json.loads((pipeline["gptq"] / "gptq.json").read_text())
    assert info["recipe"]["departures"] == ["reorder"] and info["method"] == "gptq"
    assert info["grids"]["lm_head"] == {"bits": 4, "granularity": "group", "grid": "quamba", "rounding": "half_even",
                                        "dtype": "float16", "group_width": 64}  # Quamba: 4 bits at w8 too
    assert info["grids"]["backbone.layers.0.mixer.in_proj"]["bits"] == 8
    assert {k: info["recipe"]["options"][k] for k in ("rotate_residual", "hadamard", "reorder", "head_clusters")} == \
        dict(rotate_residual=True, hadamard="quamba", reorder=True, head_clusters=4)
    assert info["reorder"]["stats"] == str(pipeline["stats"])
    assert "lm_head" in info["layers"]


def test_every_option_assembles_into_a_model_close_to_fp16(pipeline, tmp_path):
    recipe = Recipe(reorder=True, quantize_lm_head=True)
    qc = quantize_model_dir(pipeline["fp16"], tmp_path / "q", pipeline["gptq"], "w8a8", recipe, pipeline["calib"],
                            pipeline["scales"])
    assert qc["recipe"]["departures"] == ["reorder", "quantize_lm_head"] and qc["weights"]["lm_head"] == "integer"
    assert qc["recipe"]["options"]["rotate_residual"] is True and qc["reorder"]["head_clusters"] == 4
    assert "lm_head" in qc["quantized_linears"] and "lm_head:input" in qc["activation_thresholds"]
    grouped = {f"layer_{i}.{p}" for i in (0, 1) for p in ("x_conv_out:input", "B_conv_out:input", "C_conv_out:input",
                                                           "ssm_state_act:input")}
    assert set(qc["group_activation_thresholds"]) == grouped and not grouped & set(qc["activation_thresholds"])
    assert qc["group_activation_thresholds"]["layer_0.B_conv_out:input"] == {"granularity": "SSD group", "groups": 2,
                                                                          "shape": [2 * MAMBA2.d_state],
                                                                          "scale_dtype": "float32"}
    assert qc["group_activation_thresholds"]["layer_0.ssm_state_act:input"]["shape"] == [MAMBA2.nheads, 16, 16]
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    assert tensors["lm_head.qweight"].dtype == torch.int8 and "lm_head.weight" not in tensors
    assert tensors["backbone.layers.0.mixer.group_thresholds.x_conv_out__input"].shape == (MAMBA2.d_inner,)
    state_taps = [tap for name, tap in named_taps(quamba.load(tmp_path / "q", device="cpu")).items()
                  if name.endswith("ssm_state_act:input")]
    assert all(tap.scale.shape == (MAMBA2.nheads, 16, 16) for tap in state_taps)  # per (cell, state index)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["tie_embeddings"] is False
    model, fp = quamba.load(tmp_path / "q", device="cpu"), quamba.load(pipeline["fp16"], device="cpu")
    with torch.no_grad():
        q_logits, fp_logits = model(IDS).logits, fp(IDS).logits
        cache = model.allocate_cache(2)
        stepped = torch.cat([model(IDS[:, :30], cache=cache).logits, model(IDS[:, 30:], cache=cache).logits], 1)
    # lm_head: Quamba's 4-bit GPTQ values, re-rounded to int8, on an int8 input
    assert ((q_logits - fp_logits).norm() / fp_logits.norm()).item() < 0.2
    assert ((stepped - q_logits).norm() / q_logits.norm()).item() < 0.05  # int8 rounding differs per path


def test_grouped_scales_of_b_and_c_divide_in_the_observed_dtype_x_and_the_state_in_float32(pipeline, tmp_path):
    """Quamba2's per-SSD-group observer (B, C) keeps the observed dtype (fp16 on its model) for
    absmax / 127; its x and state observers cast to float32 first. A calibration whose B and C taps
    saw fp16 gives fp16-divided B and C scales, and float32 x and state scales."""
    import shutil

    calib = tmp_path / "calib16"
    shutil.copytree(pipeline["calib"], calib)
    stats = json.loads((calib / "stats.json").read_text())
    for tap, entry in stats["taps"].items():
        if tap.endswith(("B_conv_out:input", "C_conv_out:input")):
            entry["dtype"] = "float16"
    (calib / "stats.json").write_text(json.dumps(stats))
    scales_file(calib, 0.99999, tmp_path / "scales.json")
    qc = quantize_model_dir(pipeline["fp16"], tmp_path / "q", pipeline["gptq"], "w8a8", REORDER, calib,
                            tmp_path / "scales.json")
    dtypes = {tap: entry["scale_dtype"] for tap, entry in qc["group_activation_thresholds"].items()}
    assert dtypes == {tap: "float16" if tap.endswith(("B_conv_out:input", "C_conv_out:input")) else "float32"
                      for tap in dtypes}
    taps = named_taps(quamba.load(tmp_path / "q", device="cpu"))
    for layer, record in stats["reorder"]["layers"].items():
        for point, key in (("B_conv_out:input", "B_group_absmax"), ("C_conv_out:input", "C_group_absmax")):
            absmax = torch.tensor(record[key], dtype=torch.float16).clamp(min=1e-5)
            expected = (absmax / 127).float().clamp(min=1e-6).repeat_interleave(MAMBA2.d_state)
            assert torch.equal(taps[f"{layer}.{point}"].scale, expected), (layer, point)
            assert not torch.equal(expected, (absmax.float() / 127).repeat_interleave(MAMBA2.d_state))
        x = torch.tensor(record["group_absmax_after"]).clamp(min=1e-5) / 127
        assert torch.equal(taps[f"{layer}.x_conv_out:input"].scale.unique(), x.unique())


def test_reordered_assembly_without_rotating_the_replaced_weights_is_the_same_dir(pipeline, tmp_path, monkeypatch):
    """With reorder (the heads permuted after the rotation), skipping the rotation of the weights
    the GPTQ dir replaces gives the same files byte for byte (tests/test_quantize.py: the rest)."""
    import quamba.stages.assemble as assemble

    recipe = Recipe(reorder=True, quantize_lm_head=True)
    for name, replaced in (("skipped", assemble.gptq_replaced), ("everything", lambda *_: frozenset())):
        monkeypatch.setattr(assemble, "gptq_replaced", replaced)
        quantize_model_dir(pipeline["fp16"], tmp_path / name, pipeline["gptq"], "w8a8", recipe, pipeline["calib"],
                           pipeline["scales"])
    for file in ("model.safetensors", "quant_config.json"):
        assert (tmp_path / "skipped" / file).read_bytes() == (tmp_path / "everything" / file).read_bytes(), file


def test_assembly_refuses_inputs_built_with_other_options(pipeline, tmp_path):
    calib, gptq, fp16 = pipeline["calib"], pipeline["gptq"], pipeline["fp16"]
    with pytest.raises(ConfigError, match=r"recipe.rotate_residual: the GPTQ dir .* was built with "
                                          r"rotate_residual=True, but this run asks for False"):
        quantize_model_dir(fp16, tmp_path / "a", gptq, "w8a8", Recipe(rotate_residual=False, reorder=True), calib,
                           pipeline["scales"])
    with pytest.raises(ConfigError, match="recipe.reorder: the GPTQ dir .* was built with reorder=True"):
        quantize_model_dir(fp16, tmp_path / "b", gptq, "w8a8", Recipe(), calib, pipeline["scales"])
    with pytest.raises(ConfigError, match=r"recipe.rotate_residual: .*plain.*stats.json was built with "
                                          r"rotate_residual=False"):
        quantize_model_dir(fp16, tmp_path / "c", gptq, "w8a8", REORDER, pipeline["plain"], pipeline["plain_scales"])
    other = tmp_path / "other"
    other.mkdir()
    doc = json.loads(pipeline["stats"].read_text())
    doc["reorder"]["layers"]["layer_0"]["head_order"].reverse()
    (other / "stats.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="calib: the reorder plan of .* is not the one .* was built with"):
        quantize_model_dir(fp16, tmp_path / "d", gptq, "w8a8", REORDER, other, pipeline["scales"])
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_reorder_fails_clearly_before_any_work(pipeline, tmp_path):
    with pytest.raises(ConfigError, match="calib: .* has no reorder plan; calibrate with reorder on"):
        gptq_model_dir(pipeline["fp16"], tmp_path / "g", GPTQSettings(**GPTQ_SMALL), REORDER,
                       data=pipeline["corpus"], calib_dir=pipeline["plain"])
    with pytest.raises(ConfigError, match="reorder: GPTQ of a reordered model needs the calibration dir"):
        gptq_model_dir(pipeline["fp16"], tmp_path / "g", GPTQSettings(**GPTQ_SMALL), REORDER, data=pipeline["corpus"])
    assert not (tmp_path / "g").exists()


def test_a_study_recipe_with_reorder_leaves_mamba1_models_unreordered(pipeline, tmp_path):
    mamba1 = save_fp16(random_model(MambaConfig(d_model=64, n_layer=1, vocab_size=4096)), tmp_path / "m1", TOKENIZER)
    doc = calibrate_model_dir(mamba1, tmp_path / "c", CALIB, REORDER, data=pipeline["corpus"], progress=False)
    assert "reorder" not in doc and doc["recipe"]["options"]["reorder"] is False
    assert {t["observer"] for t in doc["taps"].values()} == {"percentile", "minmax"}  # Quamba1's path


@pytest.mark.parametrize("rotate", [False, True])
def test_mamba1_with_a_quantized_lm_head_assembles_tied_or_rotated(pipeline, tmp_path, rotate):
    fp16 = save_fp16(random_model(MambaConfig(d_model=64, n_layer=2, vocab_size=4096)), tmp_path / "fp16", TOKENIZER)
    recipe = Recipe(rotate_residual=rotate, quantize_lm_head=True)
    gptq_model_dir(fp16, tmp_path / "gptq", GPTQSettings(**{**GPTQ_SMALL, "w_bits": 4}), recipe,
                   data=pipeline["corpus"], progress=False)
    qc = quantize_model_dir(fp16, tmp_path / "q", tmp_path / "gptq", "w4a16", recipe)
    assert "lm_head" in qc["quantized_linears"] and qc["recipe"]["options"]["rotate_residual"] is rotate
    model, fp = quamba.load(tmp_path / "q", device="cpu"), quamba.load(fp16, device="cpu")
    assert model.config.tie_embeddings is False  # a quantized lm_head has a weight of its own
    with torch.no_grad():
        q_logits, fp_logits = model(IDS).logits, fp(IDS).logits
    assert ((q_logits - fp_logits).norm() / fp_logits.norm()).item() < 0.5


@pytest.mark.parametrize("bits", [8, 4])
def test_lm_head_gptq_reconstructs_its_output_better_than_rtn(bits):
    """Quamba's last GPTQ step: lm_head, on the final norm's outputs of the quantized blocks."""
    config = MambaConfig(d_model=128, n_layer=1, vocab_size=512)
    model = random_model(config)
    windows = torch.randint(0, 512, (8, 48), generator=torch.Generator().manual_seed(1))
    settings = GPTQSettings(w_bits=bits, nsamples=8, seqlen=48)
    results, logs = gptq_quantize_model(model, windows, settings, Recipe(lm_head_gptq="w_bits"), progress=False)
    assert "lm_head" in results and logs["lm_head"]["error"] > 0
    held_out = torch.randint(0, 512, (8, 48), generator=torch.Generator().manual_seed(2))
    inputs = []
    hook = model.lm_head_input.register_forward_hook(lambda _m, _i, out: inputs.append(out))
    with torch.no_grad():
        model(held_out)
    hook.remove()
    x = torch.cat(inputs).reshape(-1, config.d_model).double()  # FP inputs: close to the quantized blocks'
    weight = model.lm_head.weight.detach()

    def output_error(result):
        return (x @ (weight.double() - result.dequantize().double()).T).square().sum().item()

    assert results["lm_head"].bits == bits
    assert output_error(results["lm_head"]) < output_error(rtn(weight, bits, "group"))


def test_cli_passes_the_options_through(pipeline, tmp_path, capsys):
    from quamba.cli import main

    assert main(["gptq", str(pipeline["fp16"]), "--w-bits", "8", "--reorder", "--out", str(tmp_path / "g")]) == 2
    assert "GPTQ of a reordered model needs the calibration dir" in capsys.readouterr().err
    code = main(["quantize", str(pipeline["fp16"]), "--gptq", str(pipeline["gptq"]), "--calib", str(pipeline["calib"]),
                 "--scheme", "w8a8", "--alpha", "1.0", "--alpha-one", "stream_max", "--reorder", "--out",
                 str(tmp_path / "q")])
    assert code == 0, capsys.readouterr().err
    recipe = json.loads((tmp_path / "q" / "quant_config.json").read_text())["recipe"]
    assert recipe["options"]["rotate_residual"] is True and recipe["departures"] == ["alpha_one", "reorder"]
    assert main(["quantize", str(pipeline["fp16"]), "--gptq", str(pipeline["gptq"]), "--calib", str(pipeline["calib"]),
                 "--scheme", "w8a8", "--alpha", "1.0", "--reorder", "--no-rotate-residual", "--out",
                 str(tmp_path / "r")]) == 2
    assert "recipe.rotate_residual: the GPTQ dir" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert main(["quantize", str(pipeline["fp16"]), "--gptq", str(pipeline["gptq"]), "--calib", str(pipeline["calib"]),
                 "--scales", str(pipeline["scales"]), "--alpha", "1.0", "--scheme", "w8a8", "--reorder", "--out",
                 str(tmp_path / "s")]) == 2  # the file's alpha (0.99999) would have won over --alpha, silently
    assert "give --scales FILE (its alpha is the file's) or --alpha A" in capsys.readouterr().err


def test_quant_config_records_the_group_width_each_weight_really_uses(pipeline, tmp_path):
    recipe = Recipe(reorder=True, gptq=False)
    gptq_model_dir(pipeline["fp16"], tmp_path / "g4", GPTQSettings(**{**GPTQ_SMALL, "w_bits": 4}), recipe,
                   data=pipeline["corpus"], progress=False, calib_dir=pipeline["calib"])
    qc = quantize_model_dir(pipeline["fp16"], tmp_path / "q", tmp_path / "g4", "w4a16", recipe, pipeline["calib"])
    # Quamba: per channel where in_features <= 128 (in_proj reads d_model 64), groups of 128 elsewhere
    assert qc["group_size"] == "per layer"
    assert qc["group_widths"]["backbone.layers.0.mixer.in_proj"] == 64
    assert qc["group_widths"]["backbone.layers.0.mixer.out_proj"] == 128


def test_a_gptq_dir_whose_files_disagree_is_refused_naming_them(pipeline, tmp_path):
    """gptq.json names its weights' sha256, lists its layers and bits: weights of another run, a
    dropped layer (it stayed FP16 in a "w8a8" model) or zero scales never become a model."""
    import shutil

    from quamba.formats.gptq_dir import load_gptq
    from quamba.io import write_json

    def damaged(name, edit_tensors=None, edit_info=None):
        copy = tmp_path / name
        shutil.copytree(pipeline["gptq"], copy)
        if edit_tensors:
            tensors = load_file(copy / "gptq.safetensors")
            edit_tensors(tensors)
            save_file(tensors, copy / "gptq.safetensors")
        info = json.loads((copy / "gptq.json").read_text())
        if edit_info:
            edit_info(info)
        if edit_tensors and name != "stale":  # consistent edits: the record names the edited file
            info["weights_sha256"] = hashlib.sha256((copy / "gptq.safetensors").read_bytes()).hexdigest()
        write_json(copy / "gptq.json", info)
        return copy

    layer = "backbone.layers.1.mixer.out_proj"
    cases = {
        "stale": (damaged("stale", lambda t: t[f"{layer}.scales"].mul_(2)), "not the file its gptq.json was written with"),
        "dropped": (damaged("dropped", lambda t: [t.pop(k) for k in [k for k in t if k.startswith(layer)]]),
                    "holds layers .* that gptq.json does not list"),
        "zero": (damaged("zero", lambda t: t[f"{layer}.scales"].zero_()), "out_proj's scales are not all finite and > 0"),
        "bits": (damaged("bits", edit_info=lambda i: i["settings"].update(w_bits=4)), "holds 8-bit codes, but gptq.json "
                                                                                       "says w_bits 4"),
    }
    for name, (path, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_gptq(path)
    both = damaged("both", lambda t: [t.pop(k) for k in [k for k in t if k.startswith(layer)]],
                   lambda i: i["layers"].pop(layer))
    with pytest.raises(ConfigError, match=rf"lacks \['{layer}'\]: a GPTQ dir holds every block's in_proj and out_proj"):
        quantize_model_dir(pipeline["fp16"], tmp_path / "q", both, "w8a8", REORDER, pipeline["calib"], pipeline["scales"])
