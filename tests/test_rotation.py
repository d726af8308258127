"""Residual-stream rotation: the FP model computes the same logits in the rotated basis."""

import pytest
import torch
from conftest import random_model

from quamba.errors import ConfigError
from quamba.models import MambaConfig
from quamba.transforms.rotation import rotate_out_projs, rotate_residual

CONFIGS = {  # d_model 48 = 12 * 4, 40 = 20 * 2, 56 = 28 * 2, 64 = 2^6
    "mamba1-tied-padded": MambaConfig(d_model=48, n_layer=2, vocab_size=100, pad_vocab_size_multiple=16),
    "mamba1-untied-40": MambaConfig(d_model=40, n_layer=2, vocab_size=77, d_state=8, tie_embeddings=False),
    "mamba2-tied": MambaConfig(d_model=64, n_layer=2, vocab_size=100, layer="Mamba2", d_state=16,
                               headdim=16, chunk_size=8),
    "mamba2-untied-padded-ngroups2": MambaConfig(d_model=64, n_layer=2, vocab_size=101, layer="Mamba2",
                                                 d_state=16, headdim=16, ngroups=2, chunk_size=8,
                                                 tie_embeddings=False),
    "mamba2-bias-56": MambaConfig(d_model=56, n_layer=2, vocab_size=64, layer="Mamba2", d_state=8,
                                  headdim=16, chunk_size=4, bias=True),
}
IDS = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rotated_residual_leaves_the_logits_unchanged(name):
    model = random_model(CONFIGS[name])
    with torch.no_grad():
        before = model(IDS).logits
        after = rotate_residual(rotate_out_projs(model))(IDS).logits
    assert after.shape == before.shape
    assert (after - before).abs().max().item() <= 1e-4 * before.abs().max().item()


@pytest.mark.parametrize("name", ["mamba1-tied-padded", "mamba2-tied"])
def test_rotated_model_decodes_step_by_step_like_its_full_forward(name):
    model = rotate_residual(random_model(CONFIGS[name]))
    with torch.no_grad():
        full = model(IDS).logits
        cache = model.allocate_cache(2)
        stepped = torch.cat([model(IDS[:, :10], cache=cache).logits, model(IDS[:, 10:], cache=cache).logits], 1)
    assert (full - stepped).abs().max().item() <= 1e-4


def test_rotation_unties_lm_head_and_moves_the_norm_weights_into_the_linears():
    model = random_model(CONFIGS["mamba2-tied"])
    embedding = model.backbone.embedding.weight.detach().clone()
    rotate_residual(model)
    assert not model.config.tie_embeddings
    assert model.lm_head.weight is not model.backbone.embedding.weight
    assert not torch.equal(model.backbone.embedding.weight, embedding)
    for norm in [model.backbone.norm_f, *(block.norm for block in model.backbone.layers)]:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    # The embedding's rows keep their norms: a rotation, not a rescaling.
    assert torch.allclose(model.backbone.embedding.weight.norm(dim=1), embedding.norm(dim=1), rtol=1e-5)


def test_d_model_without_a_hadamard_matrix_is_refused_naming_it():
    model = random_model(MambaConfig(d_model=36, n_layer=1, vocab_size=50))
    with pytest.raises(ConfigError, match="rotate_residual: d_model=36"):
        rotate_residual(model)


REAL_D_MODELS = (768, 1024, 1536, 2048, 2560, 4096)  # mamba/mamba2 130m ... 2.8b, mamba2-8b


def test_every_real_d_model_has_a_rotation():
    from quamba.numerics.hadamard import supported

    assert all(supported(d) for d in REAL_D_MODELS)


def test_rotation_at_mamba_130m_width_leaves_the_logits_unchanged():
    model = random_model(MambaConfig(d_model=768, n_layer=1, vocab_size=64, d_state=4))  # 768 = 12 * 64
    ids = IDS[:1, :8]
    with torch.no_grad():
        before = model(ids).logits
        after = rotate_residual(model)(ids).logits
    assert (after - before).abs().max().item() <= 1e-4 * before.abs().max().item()
