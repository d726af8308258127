"""Our pure-PyTorch Mamba1/Mamba2 equal transformers' implementations and decode step by step."""

import pytest
import torch
import transformers
from conftest import random_model

from quamba.models import MambaConfig
from quamba.models.checkpoint import _to_state_spaces_keys

CONFIGS = {
    "mamba1": MambaConfig(d_model=64, n_layer=2, vocab_size=100, pad_vocab_size_multiple=16),
    "mamba1-dt_rank-untied": MambaConfig(d_model=48, n_layer=3, vocab_size=77, d_state=8, dt_rank=5,
                                         expand=3, tie_embeddings=False),
    "mamba2": MambaConfig(d_model=64, n_layer=2, vocab_size=100, layer="Mamba2", d_state=16,
                          headdim=16, chunk_size=8),
    "mamba2-ngroups2-padded": MambaConfig(d_model=64, n_layer=2, vocab_size=101, layer="Mamba2",
                                          d_state=16, headdim=16, ngroups=2, chunk_size=8,
                                          pad_vocab_size_multiple=8, tie_embeddings=False),
    "mamba2-ngroups4-bias": MambaConfig(d_model=32, n_layer=2, vocab_size=64, layer="Mamba2", d_state=8,
                                        headdim=8, ngroups=4, chunk_size=4, bias=True),
}


def to_transformers(model):
    """transformers' MambaForCausalLM / Mamba2ForCausalLM holding the same weights."""
    kwargs = model.config.to_transformers()
    model_type = kwargs.pop("model_type")
    if model_type == "mamba":
        hf = transformers.MambaForCausalLM(transformers.MambaConfig(**kwargs))
    else:
        hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**kwargs))
    state = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    return hf.eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_equal_transformers(name):
    model = random_model(CONFIGS[name])
    hf = to_transformers(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert ours.shape == (2, 19, model.config.padded_vocab_size)
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["mamba1", "mamba2"])
def test_transformers_weights_load_back_identically(name):
    """transformers -> state-spaces key names -> our model gives the same logits."""
    model = random_model(CONFIGS[name])
    hf = to_transformers(model)
    back = random_model(CONFIGS[name], seed=7)
    state = _to_state_spaces_keys(hf.state_dict())
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    back.load_state_dict(state, strict=False)
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_step_decoding_equals_full_forward(name):
    model = random_model(CONFIGS[name])
    ids = torch.randint(0, model.config.vocab_size, (3, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(batch_size=3)
        prompt = model(ids[:, :2], cache=cache).logits  # shorter than d_conv: conv state is padded
        steps = model(ids[:, 2:], cache=cache).logits
    assert cache.seqlen_offset == 13
    assert (torch.cat([prompt, steps], dim=1) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["mamba1", "mamba2"])
def test_decoder_steps_equal_the_model_on_a_cache_and_reset_starts_over(name):
    from quamba.models.decode import Decoder

    model = random_model(CONFIGS[name])
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = model.allocate_cache(batch_size=2)
        model(ids[:, :5], cache=cache)
        want = model(ids[:, 5:], cache=cache).logits
        decoder = Decoder(model, batch_size=2)
        with pytest.raises(RuntimeError, match="prompt"):
            decoder.step(ids[:, :1])
        for _ in range(2):  # the second run after reset() gives the same logits
            model(ids[:, :5], cache=decoder.cache)
            got = torch.cat([decoder.step(ids[:, t:t + 1]) for t in range(5, 12)], dim=1)
            assert torch.equal(got, want) and decoder.cache.seqlen_offset == 12
            decoder.reset()


def test_ssm_state_is_reachable_and_matches_prefill():
    """The cache's ssm_state after a prompt equals the state reached by stepping token by token."""
    model = random_model(CONFIGS["mamba2"])
    ids = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        prefill = model.allocate_cache(1)
        model(ids, cache=prefill)
        stepped = model.allocate_cache(1)
        model(ids[:, :1], cache=stepped)
        model(ids[:, 1:], cache=stepped)
    for a, b in zip(prefill.ssm_states, stepped.ssm_states):
        assert a.abs().max() > 0
        assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_tracks_fp32(dtype):
    model = random_model(CONFIGS["mamba2-ngroups2-padded"])
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).logits
        low = model.to(dtype)(ids).logits
    assert low.dtype == dtype
    assert (low.float() - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


def test_cpu_forward_is_bit_identical_across_runs():
    model = random_model(CONFIGS["mamba1"])
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


def test_importing_the_kernels_keeps_triton_autotuning_on_disk_unless_the_user_says(monkeypatch):
    """Every job process would otherwise re-autotune mamba_ssm's kernels and might pick another
    config (other low bits) than the job before it."""
    import os

    from quamba.models import kernels

    monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
    kernels._import_kernels()  # False here (no CUDA build); the variable is set before the import is tried
    assert os.environ["TRITON_CACHE_AUTOTUNING"] == "1"
    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "0")
    kernels._import_kernels()
    assert os.environ["TRITON_CACHE_AUTOTUNING"] == "0"
