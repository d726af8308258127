"""Residual-stream rotation: the FP model computes the same logits in the rotated basis."""

import pytest
import torch
from conftest import random_model

from quamba.errors import ConfigError
from quamba.models import MambaConfig
from quamba.transforms.rotation import rotate_out_projs, rotate_residual

CONFIGS = {  # d_model 48 = 12 * 4, 40 = 40 * 1, 56 = 28 * 2 (hadamard extended only), 64 = 2^6
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


FP16_FOLD = 2e-3  # relative logit change from lm_head's float16 fold (the rotations alone: < 1e-4)


def kind(name: str) -> str:
    return "extended" if name.endswith("-56") else "quamba"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rotated_residual_leaves_the_logits_unchanged(name):
    model = random_model(CONFIGS[name])
    with torch.no_grad():
        before = model(IDS).logits
        after = rotate_residual(rotate_out_projs(model, kind(name)), kind(name))(IDS).logits
    assert after.shape == before.shape
    # norm_f folds into lm_head in float16, as in Quamba: a rounding of the head's weights, no more
    assert (after - before).abs().max().item() <= FP16_FOLD * before.abs().max().item()


@pytest.mark.parametrize("name", ["mamba1-tied-padded", "mamba2-tied"])
def test_rotated_model_decodes_step_by_step_like_its_full_forward(name):
    model = rotate_residual(random_model(CONFIGS[name]), "quamba")
    with torch.no_grad():
        full = model(IDS).logits
        cache = model.allocate_cache(2)
        stepped = torch.cat([model(IDS[:, :10], cache=cache).logits, model(IDS[:, 10:], cache=cache).logits], 1)
    assert (full - stepped).abs().max().item() <= 1e-4


def test_rotation_unties_lm_head_and_moves_the_norm_weights_into_the_linears():
    model = random_model(CONFIGS["mamba2-tied"])
    embedding = model.backbone.embedding.weight.detach().clone()
    rotate_residual(model, "quamba")
    assert not model.config.tie_embeddings
    assert model.lm_head.weight is not model.backbone.embedding.weight
    assert not torch.equal(model.backbone.embedding.weight, embedding)
    for norm in [model.backbone.norm_f, *(block.norm for block in model.backbone.layers)]:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    # The embedding's rows keep their norms: a rotation, not a rescaling.
    assert torch.allclose(model.backbone.embedding.weight.norm(dim=1), embedding.norm(dim=1), rtol=1e-5)


def test_d_model_without_a_hadamard_matrix_is_refused_naming_it():
    model = random_model(MambaConfig(d_model=36, n_layer=1, vocab_size=50, expand=4))  # d_inner 144 = 12 * 12
    with pytest.raises(ConfigError, match=r"recipe.hadamard: d_inner \(out_proj's input\) = 144"):
        rotate_residual(model, "quamba")
    model = random_model(MambaConfig(d_model=56, n_layer=1, vocab_size=50, expand=4))  # 28 * 2, d_inner 224
    with pytest.raises(ConfigError, match=r"d_inner \(out_proj's input\) = 224 has no Hadamard matrix with "
                                          r"hadamard='quamba'.*extended adds"):
        rotate_residual(model, "quamba")


REAL_D_MODELS = (768, 1024, 1536, 2048, 2560, 4096)  # mamba/mamba2 130m ... 2.8b, mamba2-8b


def test_every_real_d_model_has_a_rotation():
    from quamba.numerics.hadamard import supported

    assert all(supported(d, "quamba") and supported(2 * d, "quamba") for d in REAL_D_MODELS)  # d_model, d_inner


def test_rotation_at_mamba_130m_width_leaves_the_logits_unchanged():
    model = random_model(MambaConfig(d_model=768, n_layer=1, vocab_size=64, d_state=4))  # 768 = 12 * 64
    ids = IDS[:1, :8]
    with torch.no_grad():
        before = model(ids).logits
        after = rotate_residual(model, "quamba")(ids).logits
    assert (after - before).abs().max().item() <= FP16_FOLD * before.abs().max().item()


def test_norms_fold_in_float64_into_in_proj_and_in_float16_into_lm_head():
    """As Quamba: W_in diag(g) in float64; W_lm diag(g_f) computed in fp16 before the rotation."""
    model = random_model(CONFIGS["mamba2-tied"])
    in_proj, gain = model.backbone.layers[0].mixer.in_proj.weight.detach().clone(), model.backbone.layers[0].norm.weight.detach().clone()
    lm, gain_f = model.backbone.embedding.weight.detach().clone(), model.backbone.norm_f.weight.detach().clone()
    rotate_residual(model, "quamba")
    from quamba.numerics.hadamard import hadamard_transform

    expected_in = hadamard_transform(in_proj.double() * gain.double()).float()
    expected_lm = hadamard_transform((lm.half() * gain_f.half()).float())
    assert torch.equal(model.backbone.layers[0].mixer.in_proj.weight, expected_in)
    assert torch.equal(model.lm_head.weight, expected_lm)
