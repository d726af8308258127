"""On CUDA: the quantized model's fast path equals the CPU reference, and GPTQ is run-to-run
bit-identical under the deterministic settings. Skipped without a GPU."""

import os

import pytest
import torch
from conftest import REPO, random_model

from quamba.models import MambaConfig
from quamba.models.quantized import QuantLinear
from quamba.numerics.quantizers import quantize, weight_scales
from quamba.recipe import Recipe

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def relative_diff(a, b):
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


def cuda_vs_cpu(model_dir) -> float:
    """Relative logit difference of a quantized dir on CUDA (kernels, fp32) against the CPU reference."""
    import quamba

    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cpu = quamba.load(model_dir, device="cpu")(ids).logits
        gpu = quamba.load(model_dir, device="cuda", dtype=torch.float32)(ids.cuda()).logits
    return relative_diff(gpu, cpu)


def test_int8_gemm_equals_the_reference_quant_linear():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(512, 256, generator=g)
    scales = weight_scales(weight, 8, "tensor")
    layer = QuantLinear(quantize(weight, scales, 8), scales, 8, None, act_scale=0.03, rotate_input="quamba")
    x = torch.randn(4, 64, 256, generator=g)
    ref = layer(x)  # CPU: torch._int_mm, then the epilogue
    fast = layer.cuda()(x.cuda())  # CUDA: the same on the GPU (the Hadamard's float matmul may differ)
    assert layer.integer_path()
    diff = relative_diff(fast, ref)
    print(f"\nQuantLinear int8 GEMM vs CPU reference: relative diff {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("epilogue", ["forward", "seqlen_last", "parallel"])
@pytest.mark.parametrize("rows", [3, 40])  # 3: torch._int_mm's padded case on CUDA
def test_int8_gemm_and_its_epilogue_are_bit_equal_on_cpu_and_cuda(epilogue, rows):
    g = torch.Generator().manual_seed(0)
    qweight = torch.randint(-128, 128, (96, 64), generator=g, dtype=torch.int8)
    out_scale = None if epilogue == "forward" else torch.rand(96, generator=g) * 0.05 + 0.01
    if epilogue == "seqlen_last":
        out_scale = out_scale[:1]
    layer = QuantLinear(qweight, torch.tensor([[0.0071]]), 8, None, 0.0213, None, epilogue=epilogue,
                        out_scale=out_scale)
    x = torch.randn(rows, 64, generator=g)
    for dtype in (torch.float32, torch.float16):
        cpu = layer(x.to(dtype))
        gpu = layer.cuda()(x.to(dtype).cuda()).cpu()
        layer = layer.cpu()
        assert torch.equal(cpu, gpu), (epilogue, rows, dtype)


# Residual rotation, Mamba2 reordering (per-cell x scales), an int8 lm_head and embedding (QuantEmbedding)
EVERY_OPTION_CONFIG = MambaConfig(d_model=256, n_layer=2, vocab_size=4096, layer="Mamba2", headdim=32, ngroups=2,
                                  chunk_size=64)
EVERY_OPTION_RECIPE = Recipe(reorder=True, quantize_lm_head=True, quantize_embedding=True)


def quantized_dir(tmp_path, scheme, config=None, recipe=None, alpha=0.9995):
    """A small quantized dir built on the CPU: calibration, scales, GPTQ, assembly."""
    from quamba.models.checkpoint import save_fp16
    from quamba.stages.assemble import quantize_model_dir
    from quamba.stages.calibrate import CalibrationSettings, calibrate_model_dir
    from quamba.stages.gptq import GPTQSettings, gptq_model_dir
    from quamba.stages.scales import scales_file

    config = config or MambaConfig(d_model=256, n_layer=2, vocab_size=4096)
    recipe = recipe or Recipe()
    fp16 = save_fp16(random_model(config), tmp_path / "fp16", REPO / "resources" / "tokenizer")
    calibrate_model_dir(fp16, tmp_path / "calib", CalibrationSettings(num_samples=8, seq_len=128, save_activations=False),
                        recipe, device="cpu", progress=False)
    scales_file(tmp_path / "calib", alpha, tmp_path / "scales.json")
    bits = 8 if scheme == "w8a8" else 4
    gptq_model_dir(fp16, tmp_path / "g", GPTQSettings(w_bits=bits, nsamples=8, seqlen=128), recipe,
                   device="cpu", progress=False, calib_dir=tmp_path / "calib" if recipe.reorder else None)
    quantize_model_dir(fp16, tmp_path / "q", tmp_path / "g", scheme, recipe, tmp_path / "calib", tmp_path / "scales.json")
    return tmp_path / "q"


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8", "w4a16"])
def test_quantized_model_on_cuda_matches_cpu(scheme, tmp_path):
    diff = cuda_vs_cpu(quantized_dir(tmp_path, scheme))
    print(f"\n{scheme}: CUDA (kernels, fp32) vs CPU reference logits, relative diff {diff:.2e}")
    assert diff <= 2e-2


def test_gptq_on_cuda_is_bit_identical_run_to_run(tmp_path):
    from quamba.models import MambaConfig
    from quamba.models.checkpoint import save_fp16
    from quamba.stages.gptq import GPTQSettings, gptq_model_dir

    fp16 = save_fp16(random_model(MambaConfig(d_model=256, n_layer=2, vocab_size=4096)), tmp_path / "fp16",
                     REPO / "resources" / "tokenizer")
    for run in ("a", "b"):
        gptq_model_dir(fp16, tmp_path / run, GPTQSettings(w_bits=4, nsamples=16, seqlen=256, seed=0),
                       device="cuda", progress=False)
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8"
    same = (tmp_path / "a" / "gptq.safetensors").read_bytes() == (tmp_path / "b" / "gptq.safetensors").read_bytes()
    print(f"\nGPTQ on CUDA, two runs, same seed: byte-identical = {same}")
    assert same


@pytest.mark.parametrize("case", [dict(bits=4, granularity="group"), dict(bits=8, granularity="tensor"),
                                  dict(bits=4, granularity="group", dtype=torch.float16, rounding="half_away"),
                                  dict(bits=4, granularity="group", blocksize=384)])
def test_gptq_column_loop_as_cuda_graphs_equals_the_eager_loop(case, monkeypatch):
    """The solve replays each block's column loop as a CUDA graph: the same bits as running it
    eagerly, including the partial last block (blocksize 384 over 640 columns) and the loss."""
    from quamba.determinism import enable_determinism
    from quamba.numerics import gptq

    enable_determinism()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 256, 640, generator=g) @ torch.randn(640, 640, generator=g) * 0.05).cuda()
    weight = torch.randn(320, 640, generator=g).cuda().to(case.get("dtype", torch.float32))
    solver = gptq.GPTQ(640)
    solver.add_batch(x)
    results = {}
    for graphs in (False, True):
        monkeypatch.setattr(gptq, "GRAPHS_ON_CUDA", graphs)
        results[graphs] = solver.quantize(weight, **case)
    eager, graphed = results[False], results[True]
    assert torch.equal(graphed.q, eager.q) and torch.equal(graphed.scales, eager.scales)
    assert graphed.error == eager.error
    cpu = gptq.GPTQ(640)
    cpu.add_batch(x.cpu())
    levels = (cpu.quantize(weight.cpu(), **case).q != graphed.q.cpu()).float().mean().item()
    print(f"\nGPTQ {case}: CUDA graphs == eager; integer levels differing from CPU: {levels:.2e}")


def test_model_with_every_option_on_cuda_matches_cpu(tmp_path):
    """Residual rotation, Mamba2 reordering (per-cell x scales), an int8 lm_head and embedding on the fast path."""
    diff = cuda_vs_cpu(quantized_dir(tmp_path, "w8a8", EVERY_OPTION_CONFIG, EVERY_OPTION_RECIPE, alpha=0.99999))
    print(f"\nw8a8, rotated + reordered + int8 lm_head: CUDA vs CPU reference logits, relative diff {diff:.2e}")
    # 1.95e-2 on an H100: besides the block taps, lm_head's int8 input sits right before the logits,
    # so each rounding flip between the kernels and the reference shows there undamped.
    assert diff <= 5e-2


def test_int4_gemm_kernel_and_its_dispatch_on_cuda():
    """The Triton kernels compiled (the tile kernel and the one-row split-K GEMV): each weight
    value exactly the reference's, products within fp16 rounding, at the test cases and at
    mamba2-2.7b's in_proj and out_proj (group 128); many rows take the
    compiled dequantization and cuBLAS, bit-equal to the reference."""
    import torch.nn.functional as F
    from test_int4_matmul import CASES, check_kernel_cases, layer

    from quamba.numerics import int4_matmul
    from quamba.numerics.quantizers import dequantize_packed_int4

    check_kernel_cases("cuda", CASES + [(1, 10576, 2560, 20), (16, 2560, 5120, 40)])
    packed, scales = (t.cuda() for t in layer(10576, 2560, 20))
    for rows in (1, 17, 512):
        x = torch.randn(rows, 2560, generator=torch.Generator().manual_seed(rows)).half().cuda()
        assert int4_matmul.fused_applies(x, packed, scales) == (rows <= int4_matmul.FUSED_MAX_ROWS)
        y = int4_matmul.int4_linear(x, packed, scales)
        want = F.linear(x, dequantize_packed_int4(packed, scales).half())
        if rows > int4_matmul.FUSED_MAX_ROWS:
            assert torch.equal(y, want), rows
        else:
            print(f"\nint4 kernel vs cuBLAS on the dequantized weight, 1 x 2560 -> 10576: "
                  f"relative diff {relative_diff(y, want):.2e}")
            assert relative_diff(y, want) <= 1e-3


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16", "every option"])
def test_decoding_as_a_cuda_graph_equals_eager_steps(scheme, tmp_path, monkeypatch):
    """quamba.models.decode replays a captured step: the same logits, bit for bit, as eager steps
    of the same fp16 model on the GPU (fused quantizers, int8 GEMMs, packed int4 weights)."""
    import quamba
    from quamba.models import decode

    model_dir = (quantized_dir(tmp_path, "w8a8", EVERY_OPTION_CONFIG, EVERY_OPTION_RECIPE, alpha=0.99999)
                 if scheme == "every option" else quantized_dir(tmp_path, scheme))
    ids = torch.randint(0, 4096, (1, 24), generator=torch.Generator().manual_seed(1)).cuda()
    model = quamba.load(model_dir, device="cuda", dtype=torch.float16)
    runs = {}
    for graphs in (False, True):
        monkeypatch.setattr(decode, "GRAPHS_ON_CUDA", graphs)
        decoder = decode.Decoder(model, batch_size=1)
        assert (decoder.graph is not None) == graphs
        with torch.inference_mode():
            model(ids[:, :8], cache=decoder.cache)
            runs[graphs] = torch.cat([decoder.step(ids[:, t:t + 1]).clone() for t in range(8, 24)], dim=1)
    assert torch.equal(runs[True], runs[False])


@pytest.mark.parametrize("n", [5120, 2560, 768, 1024])  # 40 * 128, 40 * 64, 12 * 64, 2^10
def test_fused_hadamard_transform_equals_the_eager_one_bit_for_bit(n, monkeypatch):
    from quamba.numerics import hadamard
    from quamba.numerics.hadamard import hadamard_transform

    g = torch.Generator().manual_seed(n)
    for shape in ((1, n), (4, 33, n)):
        for dtype in (torch.float16, torch.float32):
            x = (torch.randn(*shape, generator=g) * 3).to(dtype).cuda()
            monkeypatch.setattr(hadamard, "FUSE_ON_CUDA", False)
            eager = hadamard_transform(x)
            monkeypatch.setattr(hadamard, "FUSE_ON_CUDA", True)
            assert torch.equal(hadamard_transform(x), eager), (n, shape, dtype)


@pytest.mark.parametrize("n", [5120, 768])
def test_fused_quantized_hadamard_equals_the_eager_one_bit_for_bit(n, monkeypatch):
    """out_proj's QHadamard: its scale, rounding and saturation as one compiled kernel on CUDA."""
    from quamba.numerics import quantizers
    from quamba.numerics.hadamard import quantized_hadamard_factor, quantized_hadamard_transform

    x = (torch.randn(4, 33, n, generator=torch.Generator().manual_seed(n)) * 3).half().cuda()
    factor = torch.tensor(quantized_hadamard_factor(n, 0.0213), dtype=torch.float32, device="cuda")
    runs = []
    for fused in (False, True):
        monkeypatch.setattr(quantizers, "FUSE_ON_CUDA", fused)
        runs.append(quantized_hadamard_transform(x, factor))
    assert runs[0].dtype == torch.int8 and torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fused_activation_quantizers_equal_the_eager_ones_bit_for_bit(dtype):
    from quamba.numerics import quantizers

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 70, 96, generator=g) * 4).to(dtype)
    x[0, 0, :8] = torch.tensor([0.5, 1.5, -2.5, 2.5, -0.5, 300.0, -300.0, 0.0]).to(dtype) * 0.03125  # ties, clips
    per_channel = torch.rand(96, generator=g) * 0.05 + 0.01
    for scale in (0.03125, 0.0173, per_channel):
        for rounding in ("half_even", "half_away"):
            eager = [f(x, scale, 8, rounding) for f in (quantizers.quantize, quantizers.fake_quantize)]
            fused = [f(x.cuda(), scale.cuda() if torch.is_tensor(scale) else scale, 8, rounding).cpu()
                     for f in (quantizers.quantize, quantizers.fake_quantize)]
            assert all(torch.equal(a, b) for a, b in zip(eager, fused)), (scale, rounding)


@pytest.mark.parametrize("scheme", ["fp16", "w8a8", "w4a16", "every option"])
def test_compiled_blocks_on_cuda_stay_close_to_eager_and_replay_as_a_graph(scheme, tmp_path):
    """MambaLMHeadModel.compile_blocks on the fast path (kernels, fused quantizers, int8 GEMMs, the
    int4 kernel inside compiled blocks): prefill and graphed decode steps within the CUDA-vs-CPU
    bound of the eager fp16 model. The graph count is printed, not asserted: the opaque kernel
    calls split each block's graph (the CPU test asserts one per call kind)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import quamba
    from quamba.models import decode

    if scheme == "fp16":
        from quamba.models.checkpoint import save_fp16

        model_dir = save_fp16(random_model(MambaConfig(d_model=256, n_layer=2, vocab_size=4096)), tmp_path / "fp16",
                              REPO / "resources" / "tokenizer")
    elif scheme == "every option":
        model_dir = quantized_dir(tmp_path, "w8a8", EVERY_OPTION_CONFIG, EVERY_OPTION_RECIPE, alpha=0.99999)
    else:
        model_dir = quantized_dir(tmp_path, scheme)
    ids = torch.randint(0, 4096, (1, 24), generator=torch.Generator().manual_seed(1)).cuda()
    torch._dynamo.reset()
    counters.clear()
    runs = []
    for compile_blocks in (False, True):
        model = quamba.load(model_dir, device="cuda", dtype=torch.float16)
        if compile_blocks:
            model.compile_blocks()
        decoder = decode.Decoder(model, batch_size=1)  # captured after the warm-up steps compiled
        with torch.inference_mode():
            prefill = model(ids[:, :8], cache=decoder.cache).logits
            steps = [decoder.step(ids[:, t:t + 1]).clone() for t in range(8, 24)]
        runs.append(torch.cat([prefill, *steps], dim=1))
    graphs = counters["stats"]["unique_graphs"]
    diff = relative_diff(runs[1], runs[0])
    print(f"\n{scheme}: compiled blocks vs eager on CUDA, relative diff {diff:.2e}; {graphs} graphs")
    assert diff <= (2e-3 if scheme in ("fp16", "w4a16") else 5e-2)
