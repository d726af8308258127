"""Quantization: seeded GPTQ reproduces bytes, Hadamard fusion keeps the FP model, quantized
dirs are self-describing and load, and bad inputs fail before any work."""

import hashlib
import json
import shutil

import pytest
import torch
from conftest import REPO, random_model
from safetensors.torch import load_file, save_file

import quamba
from quamba.errors import CheckpointError, ConfigError
from quamba.io import sha256_files
from quamba.models import MambaConfig
from quamba.models.apply import apply_quantization
from quamba.models.checkpoint import model_sha256, save_fp16
from quamba.models.quantized import QuantEmbedding, QuantLinear
from quamba.models.taps import named_taps
from quamba.numerics.quantizers import unpack_int4
from quamba.recipe import Recipe
from quamba.stages.assemble import quantize_model_dir
from quamba.stages.calibrate import CalibrationSettings, calibrate_model_dir
from quamba.stages.gptq import GPTQSettings, gptq_model_dir
from quamba.stages.scales import scales_file
from quamba.transforms.rotation import rotate_out_projs

TOKENIZER = REPO / "resources" / "tokenizer"
GPTQ = dict(nsamples=6, seqlen=64, batch_size=3)
CALIB = CalibrationSettings(num_samples=4, seq_len=64, save_activations=False)
IDS = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text((REPO / "resources" / "corpus" / "valid.txt").read_text()[:30_000])
    return path


@pytest.fixture(scope="module", params=["Mamba1", "Mamba2"])
def built(request, tmp_path_factory, corpus):
    """An FP16 dir, its stats.json, and GPTQ dirs for w8 and w4 (seed 0)."""
    root = tmp_path_factory.mktemp(request.param)
    extra = dict(layer="Mamba2", d_state=16, headdim=32, chunk_size=16) if request.param == "Mamba2" else {}
    fp16 = save_fp16(random_model(MambaConfig(d_model=128, n_layer=2, vocab_size=4096, **extra)), root / "fp16", TOKENIZER)
    calibrate_model_dir(fp16, root / "calib", CALIB, data=corpus, progress=False)
    for alpha in (0.9995, 1.0):
        scales_file(root / "calib", alpha, root / f"scales{alpha}.json")
    for bits in (8, 4):
        gptq_model_dir(fp16, root / f"w{bits}", GPTQSettings(w_bits=bits, seed=0, **GPTQ), data=corpus, progress=False)
    return {"root": root, "fp16": fp16, "calib": root / "calib", "scales": root / "scales0.9995.json",
            "scales1": root / "scales1.0.json", "w8": root / "w8", "w4": root / "w4"}


def test_hadamard_fusion_leaves_the_fp_model_unchanged():
    for extra in ({}, dict(layer="Mamba2", d_state=16, headdim=16, chunk_size=8)):
        model = random_model(MambaConfig(d_model=48, n_layer=2, vocab_size=100, **extra))  # d_inner 96 = 12 * 8
        with torch.no_grad():
            before = model(IDS % 100).logits
            after = rotate_out_projs(model, "quamba")(IDS % 100).logits
        assert (before - after).abs().max().item() <= 1e-4


def test_same_seed_gives_byte_identical_gptq_weights(built, corpus, tmp_path):
    again = gptq_model_dir(built["fp16"], tmp_path / "again", GPTQSettings(w_bits=4, seed=0, **GPTQ),
                           data=corpus, progress=False)
    assert (tmp_path / "again" / "gptq.safetensors").read_bytes() == (built["w4"] / "gptq.safetensors").read_bytes()
    assert (tmp_path / "again" / "gptq.json").read_bytes() == (built["w4"] / "gptq.json").read_bytes()
    assert again["info"]["settings"]["seed"] == 0


def test_gptq_runs_in_the_model_dtype_as_quamba_s_fp16_model(built, corpus, tmp_path, monkeypatch):
    """Quamba GPTQs its fp16 model: the Hessians see fp16 activations, the solve starts from the
    rotated weights rounded to fp16 (then cast to float32, lm_head kept fp16); gptq.json says so."""
    from quamba.numerics.gptq import GPTQ as Solver

    seen_inputs, seen_weights = set(), []
    add_batch, quantize = Solver.add_batch, Solver.quantize
    monkeypatch.setattr(Solver, "add_batch", lambda self, x: (seen_inputs.add(x.dtype), add_batch(self, x))[1])
    monkeypatch.setattr(Solver, "quantize", lambda self, w, *a, **k: (seen_weights.append(w), quantize(self, w, *a, **k))[1])
    info = gptq_model_dir(built["fp16"], tmp_path / "g16", GPTQSettings(w_bits=4, seed=0, **GPTQ), data=corpus,
                          progress=False, dtype="float16")["info"]
    assert info["dtype"] == "float16" and seen_inputs == {torch.float16}
    assert len(seen_weights) == 5  # in_proj and out_proj of two blocks, lm_head
    assert all(torch.equal(w, w.half().to(w.dtype)) for w in seen_weights)
    assert json.loads((built["w4"] / "gptq.json").read_text())["dtype"] == "float32"  # the CPU's default
    assert load_file(tmp_path / "g16" / "gptq.safetensors").keys() == load_file(built["w4"] / "gptq.safetensors").keys()


def test_another_seed_draws_other_windows_and_gives_other_weights(built, corpus, tmp_path):
    gptq_model_dir(built["fp16"], tmp_path / "seed1", GPTQSettings(w_bits=4, seed=1, **GPTQ), data=corpus, progress=False)
    a, b = (json.loads((d / "gptq.json").read_text()) for d in (built["w4"], tmp_path / "seed1"))
    assert a["data"]["tokens_sha256"] != b["data"]["tokens_sha256"]
    wa, wb = (load_file(d / "gptq.safetensors") for d in (built["w4"], tmp_path / "seed1"))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("scheme, bits", [("w8a8", 8), ("w4a8", 4), ("w4a16", 4)])
def test_quantized_dir_is_self_describing_and_runs(built, tmp_path, scheme, bits):
    out = tmp_path / scheme
    written = quantize_model_dir(built["fp16"], out, built[f"w{bits}"], scheme, Recipe(), built["calib"],
                                 built["scales"])
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "quant_config.json", "model.safetensors", "stats.json", "provenance.json",
            "tokenizer.json"} <= files
    qc = json.loads((out / "quant_config.json").read_text())
    assert qc == json.loads(json.dumps(written))
    alpha = None if scheme == "w4a16" else 0.9995  # w4a16 quantizes no activations: no alpha
    assert (qc["scheme"], qc["w_bits"], qc["alpha"], qc["seed"]) == (scheme, bits, alpha, 0)
    assert qc["recipe"]["name"] == "quamba" and qc["recipe"]["departures"] == []
    # no option covers these, so they are listed apart: only where int8 activations reach conv, scan and state
    assert list(qc["known_departures"]) == ([] if scheme == "w4a16" else ["conv_scan_dequantized",
                                                                          "state_requantization"])
    assert qc["hadamard"]["kind"] == "quamba"
    # what the assembled weights use: W8 re-rounded per tensor; W4 groups of 128 (in_proj's in_features is 128)
    assert qc["group_size"] == (None if bits == 8 else 128)
    assert set(qc["group_widths"].values()) == {None if bits == 8 else 128}
    assert (out / "stats.json").read_bytes() == (built["calib"] / "stats.json").read_bytes()
    assert (out / "scales.json").is_file() == (alpha is not None)
    tensors = load_file(out / "model.safetensors")
    qweight = tensors["backbone.layers.0.mixer.in_proj.qweight"]
    assert qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert "backbone.layers.0.mixer.in_proj.weight" not in tensors
    assert model_sha256(out) == json.loads((out / "hash.json").read_text())["sha256"] == \
        sha256_files([out / "config.json", out / "model.safetensors"])  # recorded: evaluations read it, not the weights
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["recipe"] == qc["recipe"] and provenance["size_bytes"]["model"] == (out / "model.safetensors").stat().st_size
    assert "lm_head.weight" in tensors  # Quamba's residual rotation unties lm_head (norm_f folded in)
    in_features = 128  # in_proj of d_model 128: one byte per int8 weight, two int4 weights per byte
    assert qweight.numel() == qweight.shape[0] * in_features * bits // 8
    model = quamba.load(out, device="cpu")
    fp = quamba.load(built["fp16"], device="cpu")
    with torch.no_grad():
        q_logits, fp_logits = model(IDS).logits, fp(IDS).logits
    assert torch.isfinite(q_logits).all()
    relative = ((q_logits - fp_logits).norm() / fp_logits.norm()).item()
    # besides the blocks, lm_head holds Quamba's 4-bit GPTQ values (lm_head_gptq: quamba) at every scheme
    assert qc["weights"]["lm_head"] == "fp16, holding its quantized values" and "lm_head" not in qc["quantized_linears"]
    assert relative < (0.2 if bits == 8 else 0.5), relative
    assert not torch.equal(q_logits, fp_logits)
    if qc["a_bits"] is None:
        assert qc["activation_thresholds"] == {}


def test_quantized_model_decodes_step_by_step_like_its_full_forward(built, tmp_path):
    out = quantize_model_dir(built["fp16"], tmp_path / "q", built["w4"], "w4a16")
    model = quamba.load(tmp_path / "q", device="cpu")
    with torch.no_grad():
        full = model(IDS).logits
        cache = model.allocate_cache(2)
        stepped = torch.cat([model(IDS[:, :30], cache=cache).logits, model(IDS[:, 30:], cache=cache).logits], 1)
    assert out["a_bits"] is None
    assert (full - stepped).abs().max().item() <= 1e-3


def test_assembling_twice_gives_identical_weights_at_any_thread_count(built, tmp_path, monkeypatch):
    import quamba.numerics.hadamard as hadamard

    monkeypatch.setattr(hadamard, "WEIGHT_ROWS", 48)  # the small model's weights span several row blocks
    threads = torch.get_num_threads()
    try:
        for name, count in (("a", 1), ("b", 3)):  # the assemble rule runs with 4 threads
            torch.set_num_threads(count)
            quantize_model_dir(built["fp16"], tmp_path / name, built["w8"], "w8a8", Recipe(), built["calib"],
                               built["scales1"])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("scheme, bits, options", [("w8a8", 8, {}), ("w4a8", 4, {}), ("w4a16", 4, {}),
                                                   ("w8a8", 8, {"quantize_lm_head": True, "quantize_embedding": True})])
def test_weights_the_gptq_dir_replaces_are_not_rotated_and_the_dir_is_the_same(built, tmp_path, monkeypatch,
                                                                                scheme, bits, options):
    """Assembly skips the residual rotation of in_proj, out_proj and lm_head when the GPTQ dir's
    values replace them (most of a deep model's rotation): the same files byte for byte as rotating
    everything first, with fewer rotations done."""
    import quamba.stages.assemble as assemble
    import quamba.transforms.rotation as rotation

    calls = []
    rotate = rotation.rotate_weight_rows
    monkeypatch.setattr(rotation, "rotate_weight_rows", lambda w, *a, **k: calls.append(w.shape) or rotate(w, *a, **k))
    dirs = {}
    for name, replaced in (("skipped", assemble.gptq_replaced), ("everything", lambda *_: frozenset())):
        monkeypatch.setattr(assemble, "gptq_replaced", replaced)
        calls.clear()
        quantize_model_dir(built["fp16"], tmp_path / name, built[f"w{bits}"], scheme, Recipe(**options),
                           built["calib"], built["scales"])
        dirs[name] = len(calls)
    assert dirs["skipped"] == 1 < dirs["everything"]  # only the embedding's rows are rotated
    for file in ("model.safetensors", "quant_config.json", "config.json"):
        assert (tmp_path / "skipped" / file).read_bytes() == (tmp_path / "everything" / file).read_bytes(), file


@pytest.mark.parametrize("scheme, bits", [("w8a8", 8), ("w4a8", 4), ("w4a16", 4)])
def test_the_loaded_model_is_the_model_assembly_applied(built, tmp_path, monkeypatch, scheme, bits):
    """One apply step: the model assembly builds and the model loading builds are the same."""
    applied = []

    def capture(model, plan):
        applied.append(apply_quantization(model, plan))
        return applied[-1]

    monkeypatch.setattr("quamba.stages.assemble.apply_quantization", capture)
    needs = dict(calib_dir=built["calib"], scales_path=built["scales"]) if scheme != "w4a16" else {}
    quantize_model_dir(built["fp16"], tmp_path / "q", built[f"w{bits}"], scheme, Recipe(), **needs)
    loaded = quamba.load(tmp_path / "q", device="cpu", dtype="float32")
    assert not [name for name, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.is_meta]
    assembled = applied[0].float()  # built from the fp16 tensors; loading gave float32
    with torch.no_grad():
        assert torch.equal(assembled(IDS).logits, loaded(IDS).logits)


def test_each_int8_gemm_ends_as_its_quamba_layer(built, tmp_path):
    quantize_model_dir(built["fp16"], tmp_path / "a8", built["w8"], "w8a8", Recipe(), built["calib"], built["scales"])
    quantize_model_dir(built["fp16"], tmp_path / "a16", built["w4"], "w4a16")
    mixer = quamba.load(tmp_path / "a8", device="cpu").backbone.layers[0].mixer
    gemms = json.loads((tmp_path / "a8" / "quant_config.json").read_text())["gemms"]
    assert gemms["backbone.layers.0.mixer.out_proj"] == {"int8_gemm": True, "epilogue": "forward", "output": "float"}
    assert gemms["backbone.layers.0.mixer.in_proj"]["output"] == "int8"
    assert mixer.out_proj.epilogue == "forward" and mixer.out_proj.out_scale is None  # fp16 out
    if mixer.in_proj.epilogue == "parallel":  # Mamba2: one output scale per split z, x, B, C, dt
        assert len(set(mixer.in_proj.out_scale.tolist())) == 5
        return
    assert mixer.in_proj.epilogue == "seqlen_last" and mixer.in_proj.out_scale.numel() == 1
    assert isinstance(mixer.x_proj, QuantLinear) and mixer.x_proj.epilogue == "forward"
    assert isinstance(mixer.dt_proj, QuantLinear) and mixer.dt_proj.epilogue == "seqlen_last"
    assert not mixer.dt_proj.add_bias and mixer.dt_proj.bias is not None  # the scan adds it as delta_bias
    dt = torch.randn(3, mixer.dt_rank)
    without = mixer.dt_proj(dt)
    mixer.dt_proj.add_bias = True
    assert torch.allclose(mixer.dt_proj(dt) - mixer.dt_proj.bias, without, atol=1e-5)
    w4a16 = quamba.load(tmp_path / "a16", device="cpu").backbone.layers[0].mixer
    assert isinstance(w4a16.x_proj, torch.nn.Linear) and isinstance(w4a16.dt_proj, torch.nn.Linear)


@pytest.mark.parametrize("observed", ["float32", "float16"])
def test_activation_scales_are_thresholds_over_127_in_their_scale_dtype_floored_at_1e6(built, tmp_path, observed):
    """float32 from a float32 calibration; min/max taps of an fp16 one divide in fp16 (Quamba's observer)."""
    scales_doc = json.loads(built["scales"].read_text())
    for entry in scales_doc["taps"].values():
        entry["scale_dtype"] = observed if entry["observer"] == "minmax" else "float32"
    scales_path = tmp_path / "scales.json"
    scales_path.write_text(json.dumps(scales_doc))
    qc = quantize_model_dir(built["fp16"], tmp_path / "q", built["w8"], "w8a8", Recipe(), built["calib"], scales_path)
    thresholds = scales_doc["taps"]
    del thresholds["lm_head:input"]  # lm_head stays an fp16 layer (quantize_lm_head: false)
    assert qc["activation_thresholds"] == {tap: entry["threshold"] for tap, entry in thresholds.items()}
    assert qc["activation_scale_dtypes"] == {tap: entry["scale_dtype"] for tap, entry in thresholds.items()}
    model = quamba.load(tmp_path / "q", device="cpu")
    scales = {name: tap.scale for name, tap in named_taps(model).items() if tap.scale is not None}
    for i, block in enumerate(model.backbone.layers):  # the Linears quantize their own inputs
        scales |= {f"layer_{i}.{kind}:input": getattr(block.mixer, kind).act_scale for kind in ("in_proj", "out_proj")}
    assert set(scales) == set(thresholds)  # every tap the scheme quantizes has its scale, derived at load
    for tap, scale in scales.items():
        divided = torch.tensor(thresholds[tap]["threshold"], dtype=getattr(torch, thresholds[tap]["scale_dtype"])) / 127
        assert scale == float(divided.float().clamp(min=1e-6)), tap


@pytest.mark.parametrize("change, message", [
    (dict(scheme="w3a8"), "scheme: 'w3a8' is not supported"),
    (dict(scheme="w4a8"), "holds w8 weights; scheme w4a8 needs w4"),
    (dict(scales=None), "scheme w8a8 quantizes activations and needs one alpha's scales.json"),
    (dict(calib=None), "scheme w8a8 needs the calibration dir"),
    (dict(recipe=Recipe(rotate_residual=False)), "recipe.rotate_residual: the GPTQ dir .* was built with "
                                                 "rotate_residual=True, but this run asks for False"),
    (dict(recipe=Recipe(hadamard="extended")), "recipe.hadamard: the GPTQ dir .* was built with hadamard='quamba'"),
])
def test_bad_assemble_inputs_fail_before_any_work(built, tmp_path, change, message):
    args = dict(scheme="w8a8", recipe=Recipe(), calib=built["calib"], scales=built["scales"]) | change
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        quantize_model_dir(built["fp16"], tmp_path / "out", built["w8"], args["scheme"], args["recipe"],
                           args["calib"], args["scales"])
    assert not (tmp_path / "out").exists()


def test_scales_that_lack_a_tap_or_come_from_another_calibration_are_refused(built, tmp_path):
    doc = json.loads(built["scales"].read_text())
    del doc["taps"]["layer_1.in_proj:input"]
    (tmp_path / "partial.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"lacks the taps \['layer_1.in_proj:input'\] that w8a8 quantizes"):
        quantize_model_dir(built["fp16"], tmp_path / "out", built["w8"], "w8a8", Recipe(), built["calib"],
                           tmp_path / "partial.json")
    doc = json.loads(built["scales"].read_text())
    doc["calibration"]["stats_sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="was not derived from"):
        quantize_model_dir(built["fp16"], tmp_path / "out", built["w8"], "w8a8", Recipe(), built["calib"],
                           tmp_path / "other.json")
    assert not (tmp_path / "out").exists()


def _damaged_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _edit_json(path, change):
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def _nan_tail(calib):
    """A consistent but non-finite calibration: a NaN tail, and stats.json naming that file."""
    tensors = load_file(calib / "calibration.safetensors")
    key = next(k for k in tensors if k.endswith("/tails"))
    tensors[key][0] = float("nan")
    save_file(tensors, calib / "calibration.safetensors")
    digest = hashlib.sha256((calib / "calibration.safetensors").read_bytes()).hexdigest()
    _edit_json(calib / "stats.json", lambda doc: doc["files"].update({"calibration.safetensors": digest}))


def test_non_finite_or_negative_numbers_in_a_stage_s_files_are_refused_naming_the_file(built, tmp_path):
    """An edited or damaged calibration, scales file or quantized dir never becomes a model or a
    score: NaN and inf are refused wherever they are read (JSON lets them through as numbers)."""
    minmax = next(t for t, e in json.loads((built["calib"] / "stats.json").read_text())["taps"].items()
                  if e["observer"] == "minmax")
    nan_stats = _damaged_copy(built["calib"], tmp_path / "c1", lambda d: _edit_json(
        d / "stats.json", lambda doc: doc["taps"][minmax].update(absmax=float("nan"))))
    with pytest.raises(ConfigError, match=rf"c1/stats.json: taps/{minmax}/absmax is nan; NaN and infinity"):
        scales_file(nan_stats, 0.9995, tmp_path / "s.json")
    inf_alpha = _damaged_copy(built["calib"], tmp_path / "c2", lambda d: _edit_json(
        d / "stats.json", lambda doc: doc.update(min_alpha=float("inf"))))
    with pytest.raises(ConfigError, match="c2/stats.json: min_alpha is inf"):
        scales_file(inf_alpha, 0.9995, tmp_path / "s.json")
    with pytest.raises(ConfigError, match="c3/calibration.safetensors: tap .* non-finite tail values"):
        scales_file(_damaged_copy(built["calib"], tmp_path / "c3", _nan_tail), 0.9995, tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()
    bad_scales = tmp_path / "scales.json"
    shutil.copy(built["scales"], bad_scales)
    _edit_json(bad_scales, lambda doc: doc["taps"][minmax].update(threshold=float("nan")))
    with pytest.raises(ConfigError, match=rf"scales.json: taps/{minmax}/threshold is nan"):
        quantize_model_dir(built["fp16"], tmp_path / "out", built["w8"], "w8a8", Recipe(), built["calib"], bad_scales)
    assert not (tmp_path / "out").exists()
    quantize_model_dir(built["fp16"], tmp_path / "q", built["w8"], "w8a8", Recipe(), built["calib"], built["scales"])
    for name, change, message in [
        ("nan", lambda doc: doc["activation_thresholds"].update({minmax: float("nan")}),
         rf"activation_thresholds/{minmax} is nan"),
        ("negative", lambda doc: doc["activation_thresholds"].update({minmax: -1.0}),
         rf"activation_thresholds of \['{minmax}'\] are not numbers >= 0"),
    ]:
        damaged = _damaged_copy(tmp_path / "q", tmp_path / name, lambda d: _edit_json(d / "quant_config.json", change))
        with pytest.raises(CheckpointError, match=message):
            quamba.load(damaged, device="cpu")

    def nan_scale(d):
        tensors = load_file(d / "model.safetensors")
        tensors["backbone.layers.0.mixer.in_proj.scales"][0] = float("inf")
        save_file(tensors, d / "model.safetensors", metadata={"format": "quamba-quantized"})
    with pytest.raises(CheckpointError, match=r"model.safetensors: backbone.layers.0.mixer.in_proj.scales holds NaN"):
        quamba.load(_damaged_copy(tmp_path / "q", tmp_path / "scale", nan_scale), device="cpu")


def test_a_threshold_deleted_from_quant_config_is_refused_not_left_float(built, tmp_path):
    """A W8A8 dir whose quant_config.json lost a tap's threshold would run that activation in float
    (a model other than the one its files describe): loading it fails, naming the tap."""
    qc = quantize_model_dir(built["fp16"], tmp_path / "q", built["w8"], "w8a8", Recipe(), built["calib"],
                            built["scales"])
    a_tap = next(tap for tap in qc["activation_thresholds"] if tap.startswith("layer_0.") and "proj:" not in tap)
    for tap in ("layer_1.in_proj:input", a_tap):  # a projection's input; a tap inside the mixer
        damaged = _damaged_copy(tmp_path / "q", tmp_path / tap.replace(":", "_"), lambda d: _edit_json(
            d / "quant_config.json", lambda doc: doc["activation_thresholds"].pop(tap)))
        with pytest.raises(CheckpointError, match=rf"quant_config.json: activation_thresholds lack 1 of the taps "
                                                  rf"this model quantizes \({tap}; an edited"):
            quamba.load(damaged, device="cpu")
    assert quamba.load(tmp_path / "q", device="cpu") is not None


def test_a_quantized_dir_missing_a_file_or_a_tensor_names_what_is_missing(built, tmp_path):
    quantize_model_dir(built["fp16"], tmp_path / "q", built["w8"], "w8a8", Recipe(), built["calib"], built["scales"])
    no_config = _damaged_copy(tmp_path / "q", tmp_path / "no_config", lambda d: (d / "quant_config.json").unlink())
    with pytest.raises(CheckpointError, match="a quantized model's, but the dir has no quant_config.json"):
        quamba.load(no_config, device="cpu")

    def drop_qweight(d):
        tensors = load_file(d / "model.safetensors")
        del tensors["backbone.layers.1.mixer.out_proj.qweight"]
        save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: no tensor 'backbone.layers.1.mixer.out_proj.qweight',"
                                              r" which quant_config.json lists"):
        quamba.load(_damaged_copy(tmp_path / "q", tmp_path / "no_qweight", drop_qweight), device="cpu")


def test_scales_out_at_a_directory_is_refused_before_any_work(built, tmp_path):
    with pytest.raises(ConfigError, match=r"out: .* is a directory; give the path of the scales.json to write"):
        scales_file(built["calib"], 0.9995, built["calib"])


def test_an_alpha_below_min_alpha_fails_naming_min_alpha(built, tmp_path):
    with pytest.raises(ConfigError, match=r"alpha: 0.99 is below the calibration's min_alpha 0.999.*lower min_alpha"):
        scales_file(built["calib"], 0.99, tmp_path / "s.json")
    with pytest.raises(ConfigError, match=r"alpha: 1.5 is outside \(0, 1\]"):
        scales_file(built["calib"], 1.5, tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()


def test_stats_or_gptq_of_another_model_are_refused(built, tmp_path):
    other = save_fp16(random_model(MambaConfig(d_model=128, n_layer=2, vocab_size=4096), seed=5), tmp_path / "other", TOKENIZER)
    with pytest.raises(ConfigError, match="was made from another model"):
        quantize_model_dir(other, tmp_path / "out", built["w8"], "w8a8", Recipe(), built["calib"], built["scales"])
    shutil.copytree(built["w8"], tmp_path / "w8")
    info = json.loads((tmp_path / "w8" / "gptq.json").read_text())
    info["model"]["sha256"] = model_sha256(other)
    (tmp_path / "w8" / "gptq.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="was calibrated on another model"):
        quantize_model_dir(other, tmp_path / "out", tmp_path / "w8", "w8a8", Recipe(), built["calib"], built["scales"])
    assert not (tmp_path / "out").exists()


def test_unsupported_gptq_bits_fail_before_any_work(built, tmp_path, corpus):
    with pytest.raises(ConfigError, match="w_bits: 3 is not supported; allowed: \\[4, 8\\]"):
        gptq_model_dir(built["fp16"], tmp_path / "g", GPTQSettings(w_bits=3, **GPTQ), data=corpus)
    for change, message in ((dict(nsamples=2.5), "nsamples: must be a positive integer, got 2.5"),
                            (dict(group_size=64.0), "group_size: must be a positive integer, got 64.0"),
                            (dict(percdamp="0.01"), "percdamp: '0.01' must be a number in \\(0, 1\\)")):
        with pytest.raises(ConfigError, match=message):
            gptq_model_dir(built["fp16"], tmp_path / "g", GPTQSettings(w_bits=8, **{**GPTQ, **change}), data=corpus)
    assert not (tmp_path / "g").exists()


def test_an_out_dir_holding_other_files_is_refused_before_any_work_and_kept(built, tmp_path, corpus):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("important")
    with pytest.raises(ConfigError, match="theirs: a non-empty directory that is no earlier output of this kind"):
        gptq_model_dir(built["fp16"], theirs, GPTQSettings(w_bits=8, **GPTQ), data=corpus, progress=False)
    with pytest.raises(ConfigError, match="theirs: a non-empty directory that is no earlier output of this kind"):
        quantize_model_dir(built["fp16"], theirs, built["w8"], "w8a8", Recipe(), built["calib"], built["scales"])
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("name", ["mamba1-demo", "mamba2-demo"])
def test_w8a8_demo_model_stays_within_five_percent_of_fp16_perplexity(name, tmp_path):
    """The acceptance bar of the quantization issue, on the shipped, trained models."""
    from quamba.data import load_tokenizer
    from quamba.stages.calibrate import QUAMBA_DEFAULT_ALPHA as alpha

    fp16 = REPO / "resources" / "models" / name
    calibrate_model_dir(fp16, tmp_path / "calib", CalibrationSettings(num_samples=16, seq_len=128,
                        save_activations=False), progress=False)
    scales_file(tmp_path / "calib", alpha, tmp_path / "scales.json")
    gptq_model_dir(fp16, tmp_path / "w8", GPTQSettings(w_bits=8, nsamples=8, seqlen=128), progress=False)
    quantize_model_dir(fp16, tmp_path / "w8a8", tmp_path / "w8", "w8a8", Recipe(), tmp_path / "calib",
                       tmp_path / "scales.json")
    tokenizer = load_tokenizer(fp16)
    ids = torch.tensor(tokenizer((REPO / "resources" / "corpus" / "test.txt").read_text())["input_ids"][: 16 * 128])
    ids = ids.view(16, 128)  # held-out text

    def perplexity(model):
        with torch.no_grad():
            logits = model(ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).exp().item()

    fp = perplexity(quamba.load(fp16, device="cpu"))
    quantized = perplexity(quamba.load(tmp_path / "w8a8", device="cpu"))
    print(f"\n{name}: fp16 perplexity {fp:.3f}, w8a8 at alpha {alpha}: {quantized:.3f}")
    assert quantized <= 1.05 * fp
    assert quantized != fp


INTEGER_ON_DISK = {  # QUAMBA.md section 6: the integer tensors of one mixer beyond in_proj/out_proj
    ("Mamba1", "w8a8"): {"x_proj.weight", "dt_proj.weight", "conv1d.weight", "conv1d.bias", "A_log", "D",
                         "dt_proj.bias"},
    ("Mamba1", "w4a8"): {"x_proj.weight", "dt_proj.weight", "conv1d.weight", "conv1d.bias", "A_log", "D",
                         "dt_proj.bias"},
    ("Mamba1", "w4a16"): {"x_proj.weight"},
    ("Mamba2", "w8a8"): {"conv1d.weight", "conv1d.bias", "A_log", "D"},
    ("Mamba2", "w4a8"): {"conv1d.weight", "conv1d.bias", "A_log", "D"},
    ("Mamba2", "w4a16"): set(),
}


def integer_tensors(tensors: dict, prefix: str = "backbone.layers.0.mixer.") -> set[str]:
    return {k.removeprefix(prefix).removesuffix(".q") for k, v in tensors.items()
            if k.startswith(prefix) and not v.is_floating_point() and not k.endswith(".qweight")}


@pytest.mark.parametrize("scheme, bits", [("w8a8", 8), ("w4a8", 4), ("w4a16", 4)])
def test_which_tensors_are_integer_on_disk_per_scheme_and_family(built, tmp_path, scheme, bits):
    layer = json.loads((built["fp16"] / "config.json").read_text())["ssm_cfg"].get("layer", "Mamba1")
    qc = quantize_model_dir(built["fp16"], tmp_path / "q", built[f"w{bits}"], scheme, Recipe(), built["calib"],
                            built["scales"])
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    assert integer_tensors(tensors) == INTEGER_ON_DISK[(layer, scheme)]
    for kind in ("in_proj", "out_proj"):  # always integer: int8, or int4 packed two per byte
        assert tensors[f"backbone.layers.0.mixer.{kind}.qweight"].dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert tensors["backbone.embedding.weight"].dtype == torch.float16  # quantize_embedding is off by default
    recorded = {k.removeprefix("backbone.layers.0.mixer.") for k in qc["integer_tensors"]
                if k.startswith("backbone.layers.0.mixer.")}
    assert recorded == INTEGER_ON_DISK[(layer, scheme)] | {"in_proj", "out_proj"}
    fp16 = load_file(built["fp16"] / "model.safetensors")
    if layer == "Mamba2" and scheme != "w4a16":  # A_log (fp16 in Quamba's model) and D (fp32): its per-tensor W8
        for name, dtype in (("A_log", torch.float16), ("D", torch.float32)):
            value = fp16[f"backbone.layers.0.mixer.{name}"].to(dtype)
            s = value.abs().amax().clamp(min=1e-5) / 127  # in the parameter's dtype
            assert torch.equal(tensors[f"backbone.layers.0.mixer.{name}.q"], torch.round(value / s).to(torch.int8))
            assert tensors[f"backbone.layers.0.mixer.{name}.scale"].flatten().item() == s.item(), name
    if layer == "Mamba2" and bits == 8:  # one weight scale per split z, x, B, C, dt
        scales = tensors["backbone.layers.0.mixer.in_proj.scales"]
        assert scales.shape == (tensors["backbone.layers.0.mixer.in_proj.qweight"].shape[0], 1)
        assert len(scales.unique()) == 5
    with torch.no_grad():  # the model runs and stays about as close to FP16 as in/out_proj alone leave it
        logits = quamba.load(tmp_path / "q", device="cpu")(IDS).logits
        fp = quamba.load(built["fp16"], device="cpu")(IDS).logits
    assert ((logits - fp).norm() / fp.norm()).item() < (0.15 if bits == 8 else 0.4)  # random weights: W4 ~0.3


def test_each_assembly_option_flips_exactly_its_part(built, tmp_path):
    def build(name, scheme, bits, **options):
        quantize_model_dir(built["fp16"], tmp_path / name, built[f"w{bits}"], scheme, Recipe(**options),
                           built["calib"], built["scales"])
        return load_file(tmp_path / name / "model.safetensors")

    quamba_w8, quamba_w4 = build("q8", "w8a8", 8), build("q4", "w4a8", 4)
    lighter = build("projections", "w8a8", 8, module_coverage="projections")
    assert integer_tensors(lighter) == set() and set(lighter) - set(quamba_w8) >= {"backbone.layers.0.mixer.A_log"}
    embedded = build("embedding", "w8a8", 8, quantize_embedding=True)
    assert embedded["backbone.embedding.weight.q"].dtype == torch.int8 and "backbone.embedding.weight" not in embedded
    assert set(embedded) - {"backbone.embedding.weight.q", "backbone.embedding.weight.scale"} == \
        set(quamba_w8) - {"backbone.embedding.weight"}
    both = build("both", "w8a8", 8, quantize_embedding=True, quantize_lm_head=True)  # eval.sh's W8A8 flags
    assert "lm_head.weight" not in both and both["lm_head.qweight"].dtype == torch.int8  # no fp16 copy of lm_head
    assert quamba.load(tmp_path / "both", device="cpu")(IDS).logits.isfinite().all()  # what is written loads
    codes = build("codes", "w4a8", 4, w4_layout="gptq_codes")
    gptq = load_file(built["w4"] / "gptq.safetensors")
    in_proj = "backbone.layers.0.mixer.in_proj"
    assert set(codes) == set(quamba_w4)
    assert torch.equal(codes[f"{in_proj}.scales"], gptq[f"{in_proj}.scales"].float())
    changed = [k for k in codes if not torch.equal(codes[k], quamba_w4[k])]
    assert changed and all(k.endswith((".qweight", ".scales")) for k in changed)  # only the W4 layers


@pytest.mark.parametrize("scheme, bits", [("w8a8", 8), ("w4a16", 4)])
def test_a_quantized_embedding_stays_integer_in_memory_and_looks_up_its_dequantized_rows(built, tmp_path,
                                                                                        scheme, bits):
    quantize_model_dir(built["fp16"], tmp_path / "q", built[f"w{bits}"], scheme, Recipe(quantize_embedding=True),
                       built["calib"], built["scales"])
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    q = tensors["backbone.embedding.weight.q"]
    values = (unpack_int4(q) if bits == 4 else q).float() * tensors["backbone.embedding.weight.scale"]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = quamba.load(tmp_path / "q", device="cpu", dtype=dtype)
        embedding = model.backbone.embedding
        assert isinstance(embedding, QuantEmbedding) and model.dtype == dtype
        assert embedding.qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)  # int4: two codes a byte
        assert embedding.scale.dtype == torch.float32  # kept whatever the model's dtype, as QuantLinear's
        assert not any(t.is_floating_point() and t.numel() >= values.numel() // 2 for t in embedding.buffers())
        assert torch.equal(embedding(IDS), values.to(dtype)[IDS])  # what the dequantized matrix gave
        assert model(IDS).logits.isfinite().all()


@pytest.mark.parametrize("scheme, bits", [("fp16", None), ("w8a8", 8), ("w4a16", 4)])
def test_compiled_blocks_share_one_graph_per_call_kind_and_stay_close_to_the_eager_ones(built, tmp_path,
                                                                                       scheme, bits):
    """compile_blocks: a prefill graph and a step graph for all blocks (their scales are inputs, not
    constants), logits within the CUDA-vs-CPU bound of tests/test_cuda_quant.py (a fused float op
    can flip a tap's rounding), FP ones to float32 noise."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model_dir = built["fp16"]
    if bits is not None:
        model_dir = tmp_path / "q"
        quantize_model_dir(built["fp16"], model_dir, built[f"w{bits}"], scheme, Recipe(), built["calib"],
                           built["scales"])
    torch._dynamo.reset()
    counters.clear()
    runs = []
    for compile_blocks in (False, True):
        model = quamba.load(model_dir, device="cpu")
        if compile_blocks:
            model.compile_blocks()
        with torch.inference_mode():
            cache = model.allocate_cache(IDS.shape[0])
            logits = [model(IDS, cache=cache).logits] + [model(IDS[:, t:t + 1], cache=cache).logits for t in range(2)]
        runs.append(torch.cat(logits, dim=1))
    assert counters["stats"]["unique_graphs"] == 2  # prefill, step: one each for both blocks
    eager, compiled = runs
    relative = ((compiled - eager).norm() / eager.norm()).item()
    print(f"\n{scheme}: compiled vs eager blocks, relative logit difference {relative:.2e}")
    assert relative <= (1e-5 if bits is None or scheme == "w4a16" else 2e-2), relative


def test_compiled_blocks_never_fall_back_to_eager_at_dynamo_s_recompile_limit(built):
    """Every call kind of every model compiles the one Block.forward, and past dynamo's per-function
    limit (8 by default) a call runs eagerly with only a warning: a benchmark of a few models timed
    eager blocks as compiled ones. compile_blocks raises the limit; here it starts at 2 and three
    kinds (prefill, prefill filling a cache, step) must each get a graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    limit = torch._dynamo.config.recompile_limit
    try:
        torch._dynamo.config.recompile_limit = 2
        model = quamba.load(built["fp16"], device="cpu").compile_blocks()
        with torch.inference_mode():
            model(IDS)
            cache = model.allocate_cache(IDS.shape[0])
            model(IDS, cache=cache)
            model(IDS[:, :1], cache=cache)
    finally:
        torch._dynamo.config.recompile_limit = limit
    assert counters["stats"]["unique_graphs"] == 3


def test_decoding_steps_round_the_state_and_mamba2s_one_row_in_proj_as_quamba(built, tmp_path):
    """QUAMBA.md section 8: the state is requantized with rint after every step (both families) and
    in Mamba2's prefill, with roundf in Mamba1's; Mamba2's in_proj at one row (the Parallel GEMV)
    rounds its int8 outputs with roundf. Recorded in quant_config.json and set on the modules; the
    half_away option rounds everything away from zero."""
    from quamba.models.checkpoint import read_config
    from quamba.numerics.quantizers import gemv_rounding, point_rounding, step_rounding

    mamba2 = read_config(built["fp16"])[0].layer == "Mamba2"
    record = quantize_model_dir(built["fp16"], tmp_path / "q", built["w8"], "w8a8", Recipe(), built["calib"],
                                built["scales"])
    prefill_state = "half_even" if mamba2 else "half_away"
    assert record["rounding"]["ssm_state_act:input"] == prefill_state
    assert record["step_rounding"] == {"ssm_state_act:input": "half_even"}
    assert record["gemv_rounding"] == "half_away"
    model = quamba.load(tmp_path / "q", device="cpu")
    states = [t for name, t in named_taps(model).items() if name.endswith("ssm_state_act:input")]
    assert states and all(t.step_rounding == "half_even" and t.rounding == prefill_state for t in states)
    assert model.backbone.layers[0].mixer.in_proj.gemv_rounding == ("half_away" if mamba2 else None)
    config_path = tmp_path / "q" / "quant_config.json"  # a dir written before these were recorded
    older = json.loads(config_path.read_text())
    del older["step_rounding"], older["gemv_rounding"]
    config_path.write_text(json.dumps(older))
    reloaded = quamba.load(tmp_path / "q", device="cpu")
    for new, old in zip(named_taps(model).values(), named_taps(reloaded).values()):
        assert new.step_rounding == old.step_rounding
    in_proj, reloaded_in_proj = model.backbone.layers[0].mixer.in_proj, reloaded.backbone.layers[0].mixer.in_proj
    assert reloaded_in_proj.gemv_rounding == in_proj.gemv_rounding
    layer = "Mamba2" if mamba2 else "Mamba1"
    assert point_rounding("ssm_state_act:input", "half_away", layer) == "half_away"
    assert step_rounding("half_away") == {"ssm_state_act:input": "half_away"}
    assert gemv_rounding("half_away") == "half_away"


def test_a_tap_rounds_with_its_step_rounding_only_in_a_step():
    from quamba.models.taps import Taps

    taps = Taps({"ssm_state_act:input": ""})
    tap = next(iter(taps))
    tap.scale, tap.rounding, tap.step_rounding = 1.0, "half_away", "half_even"
    x = torch.tensor([0.5, 1.5, 2.5, -2.5])
    assert torch.equal(taps("ssm_state_act:input", x), torch.tensor([1.0, 2.0, 3.0, -3.0]))
    assert torch.equal(taps.step("ssm_state_act:input", x), torch.tensor([0.0, 2.0, 2.0, -2.0]))


def test_a8_models_quantize_the_norms_before_int8_linears_from_float32(built, tmp_path):
    """Every block norm of a W8A8 model, and norm_f with quantize_lm_head, writes the int8 grid of the
    in_proj / lm_head after it (QRMSNorm); W4A16 keeps plain fp16 norms."""
    quantize_model_dir(built["fp16"], tmp_path / "w8a8", built["w8"], "w8a8", Recipe(quantize_lm_head=True),
                       built["calib"], built["scales"])
    model = quamba.load(tmp_path / "w8a8", device="cpu")
    for block in model.backbone.layers:
        grid, in_proj = block.norm.int8_output, block.mixer.in_proj
        assert grid is not None and grid.scale == in_proj.act_scale and grid.rounding == in_proj.rounding == "half_even"
    assert model.backbone.norm_f.int8_output.scale == model.lm_head.act_scale
    quantize_model_dir(built["fp16"], tmp_path / "w4a16", built["w4"], "w4a16")
    plain = quamba.load(tmp_path / "w4a16", device="cpu")
    assert all(block.norm.int8_output is None for block in plain.backbone.layers)
