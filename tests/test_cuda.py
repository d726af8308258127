"""On CUDA, the mamba_ssm / causal_conv1d kernels agree with the pure-PyTorch reference.

Skipped without a GPU or without the `cuda` extra. Run on a GPU box with
`pytest tests/test_cuda.py -s` to print the measured differences.
"""

import pytest
import torch
from conftest import random_model

from quamba.models import MambaConfig, kernels, ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not kernels.available(), reason="needs mamba_ssm and causal_conv1d (pip install .[cuda])"),
]

MODELS = {
    "mamba1": MambaConfig(d_model=256, n_layer=4, vocab_size=1000),
    "mamba2": MambaConfig(d_model=256, n_layer=4, vocab_size=1000, layer="Mamba2", d_state=64,
                          headdim=32, ngroups=2, chunk_size=64),
}
FP16_TOLERANCE = 2e-2  # relative to the largest logit


def relative_diff(fast: torch.Tensor, ref: torch.Tensor) -> float:
    return ((fast.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_kernel_forward_matches_reference(name):
    model = random_model(MODELS[name]).cuda()
    ids = torch.randint(0, 1000, (2, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        ref = model.float().use_kernels(False)(ids).logits
        fast = model.half().use_kernels(True)(ids).logits
    diff = relative_diff(fast, ref)
    print(f"\n{name}: fp16 kernels vs fp32 reference, max |diff| / max |logit| = {diff:.2e}")
    assert diff <= FP16_TOLERANCE


@pytest.mark.parametrize("name", sorted(MODELS))
def test_kernel_decoding_matches_kernel_forward(name):
    model = random_model(MODELS[name]).cuda().half().use_kernels(True)
    ids = torch.randint(0, 1000, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(2)
        stepped = torch.cat([model(ids[:, :30], cache=cache).logits, model(ids[:, 30:], cache=cache).logits], 1)
    diff = relative_diff(stepped, full)
    print(f"\n{name}: fp16 kernel decoding vs kernel forward = {diff:.2e}")
    assert diff <= FP16_TOLERANCE


@pytest.mark.parametrize("name", sorted(MODELS))
def test_decoding_as_a_cuda_graph_equals_eager_kernel_steps(name, monkeypatch):
    from quamba.models import decode

    model = random_model(MODELS[name]).cuda().half().use_kernels(True)
    ids = torch.randint(0, 1000, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    runs = {}
    for graphs in (False, True):
        monkeypatch.setattr(decode, "GRAPHS_ON_CUDA", graphs)
        decoder = decode.Decoder(model, batch_size=2)
        with torch.inference_mode():
            model(ids[:, :30], cache=decoder.cache)
            runs[graphs] = torch.cat([decoder.step(ids[:, t:t + 1]).clone() for t in range(30, 40)], dim=1)
    assert torch.equal(runs[True], runs[False])


def test_selective_scan_kernel_matches_reference():
    g = torch.Generator("cuda").manual_seed(2)
    b, d, n, l = 2, 64, 16, 100
    u, delta, z = (torch.randn(b, d, l, device="cuda", generator=g) for _ in range(3))
    A = -torch.rand(d, n, device="cuda", generator=g) * 4
    B, C = (torch.randn(b, n, l, device="cuda", generator=g) for _ in range(2))
    D, bias = torch.randn(d, device="cuda", generator=g), torch.randn(d, device="cuda", generator=g)
    args = (u, delta, A, B, C, D, z, bias, True, True)
    y_ref, h_ref = ops.selective_scan(*args)
    y, h = kernels.selective_scan(*args)
    print(f"\nselective_scan fp32: y {relative_diff(y, y_ref):.2e}, state {relative_diff(h, h_ref):.2e}")
    assert relative_diff(y, y_ref) <= 1e-4 and relative_diff(h, h_ref) <= 1e-4


def test_ssd_chunk_scan_kernel_matches_reference():
    g = torch.Generator("cuda").manual_seed(3)
    b, l, h, p, gr, n = 2, 150, 8, 32, 2, 32
    x = torch.randn(b, l, h, p, device="cuda", generator=g)
    dt = torch.randn(b, l, h, device="cuda", generator=g) - 2
    A = -torch.rand(h, device="cuda", generator=g) * 8
    B, C = (torch.randn(b, l, gr, n, device="cuda", generator=g) for _ in range(2))
    D, bias = torch.randn(h, device="cuda", generator=g), torch.randn(h, device="cuda", generator=g)
    init = torch.randn(b, h, p, n, device="cuda", generator=g)
    kw = dict(D=D, dt_bias=bias, initial_states=init, dt_softplus=True, return_final_states=True)
    y_ref, s_ref = ops.ssd_chunk_scan(x, dt, A, B, C, 64, **kw)
    y, s = kernels.ssd_chunk_scan(x, dt, A, B, C, 64, **kw)
    print(f"\nssd_chunk_scan fp32: y {relative_diff(y, y_ref):.2e}, state {relative_diff(s, s_ref):.2e}")
    # mamba_ssm's Triton SSD kernels run their fp32 dot products in TF32 (10-bit mantissa).
    assert relative_diff(y, y_ref) <= 5e-3 and relative_diff(s, s_ref) <= 5e-3


def test_conv_kernels_match_reference():
    g = torch.Generator("cuda").manual_seed(4)
    x = torch.randn(2, 64, 50, device="cuda", generator=g)
    w, bias = torch.randn(64, 4, device="cuda", generator=g), torch.randn(64, device="cuda", generator=g)
    assert relative_diff(kernels.causal_conv1d(x, w, bias), ops.causal_conv1d(x, w, bias)) <= 1e-5
    state_ref = torch.randn(2, 64, 4, device="cuda", generator=g)
    state = state_ref.clone()
    step = x[:, :, 0].contiguous()
    out_ref = ops.causal_conv1d_update(step, state_ref, w, bias)
    out = kernels.causal_conv1d_update(step, state, w, bias)
    assert relative_diff(out, out_ref) <= 1e-5 and torch.allclose(state, state_ref)


def test_state_update_kernels_match_reference():
    g = torch.Generator("cuda").manual_seed(5)
    b, d, n = 2, 64, 16  # Mamba1
    state_ref = torch.randn(b, d, n, device="cuda", generator=g)
    state = state_ref.clone()
    x, dt, z = (torch.randn(b, d, device="cuda", generator=g) for _ in range(3))
    A = -torch.rand(d, n, device="cuda", generator=g)
    B, C = (torch.randn(b, n, device="cuda", generator=g) for _ in range(2))
    D, bias = torch.randn(d, device="cuda", generator=g), torch.randn(d, device="cuda", generator=g)
    y_ref = ops.selective_state_update(state_ref, x, dt, A, B, C, D, z, bias, True)
    y = kernels.selective_state_update(state, x, dt, A, B, C, D, z, bias, True)
    assert relative_diff(y, y_ref) <= 1e-4 and relative_diff(state, state_ref) <= 1e-4
    b, h, p, gr, n = 2, 8, 16, 2, 32  # Mamba2
    state_ref = torch.randn(b, h, p, n, device="cuda", generator=g)
    state = state_ref.clone()
    x = torch.randn(b, h, p, device="cuda", generator=g)
    dt = torch.randn(b, h, device="cuda", generator=g)
    A, D, bias = (torch.randn(h, device="cuda", generator=g) for _ in range(3))
    A = -A.abs()
    B, C = (torch.randn(b, gr, n, device="cuda", generator=g) for _ in range(2))
    y_ref = ops.ssd_state_update(state_ref, x, dt, A, B, C, D, bias, True)
    y = kernels.ssd_state_update(state, x, dt, A, B, C, D, bias, True)
    assert relative_diff(y, y_ref) <= 1e-4 and relative_diff(state, state_ref) <= 1e-4
