"""Hadamard rotations: Quamba's base matrices exactly, its width dispatch, the extended kind,
orthonormal rotations, fast transform = dense."""

import math

import pytest
import torch

from quamba.errors import ConfigError
from quamba.models import MambaConfig
from quamba.numerics.hadamard import (
    KINDS,
    base_matrix,
    hadamard_matrix,
    hadamard_transform,
    rotate_weight_rows,
    rotation,
    supported,
)
from quamba.transforms.rotation import check_widths

# The base matrices of Quamba's Hadamard kernels (public mathematical data: Paley construction II
# for q = 5, and [[A, A], [A, -A]] with A the Paley construction I matrix for q = 19), row by row.
TABLE_12 = """
+-++++++++++ --+-+-+-+-+- +++-++----++ +---+--+-++- +++++-++---- +-+---+--+-+
++--+++-++-- +--++---+--+ ++----+++-++ +--+-++---+- ++++----+++- +-+--+-++---
"""
TABLE_40 = """
+-------------------+------------------- ++-++----+-+-++++--+++-++----+-+-++++--+
+++-++----+-+-++++--+++-++----+-+-++++-- +-++-++----+-+-++++-+-++-++----+-+-++++-
+--++-++----+-+-+++++--++-++----+-+-++++ ++--++-++----+-+-+++++--++-++----+-+-+++
+++--++-++----+-+-+++++--++-++----+-+-++ ++++--++-++----+-+-+++++--++-++----+-+-+
+++++--++-++----+-+-+++++--++-++----+-+- +-++++--++-++----+-++-++++--++-++----+-+
++-++++--++-++----+-++-++++--++-++----+- +-+-++++--++-++----++-+-++++--++-++----+
++-+-++++--++-++----++-+-++++--++-++---- +-+-+-++++--++-++---+-+-+-++++--++-++---
+--+-+-++++--++-++--+--+-+-++++--++-++-- +---+-+-++++--++-++-+---+-+-++++--++-++-
+----+-+-++++--++-+++----+-+-++++--++-++ ++----+-+-++++--++-+++----+-+-++++--++-+
+++----+-+-++++--++-+++----+-+-++++--++- +-++----+-+-++++--+++-++----+-+-++++--++
+--------------------+++++++++++++++++++ ++-++----+-+-++++--+--+--++++-+-+----++-
+++-++----+-+-++++-----+--++++-+-+----++ +-++-++----+-+-++++--+--+--++++-+-+----+
+--++-++----+-+-++++-++--+--++++-+-+---- ++--++-++----+-+-+++--++--+--++++-+-+---
+++--++-++----+-+-++---++--+--++++-+-+-- ++++--++-++----+-+-+----++--+--++++-+-+-
+++++--++-++----+-+------++--+--++++-+-+ +-++++--++-++----+-+-+----++--+--++++-+-
++-++++--++-++----+---+----++--+--++++-+ +-+-++++--++-++----+-+-+----++--+--++++-
++-+-++++--++-++------+-+----++--+--++++ +-+-+-++++--++-++----+-+-+----++--+--+++
+--+-+-++++--++-++---++-+-+----++--+--++ +---+-+-++++--++-++--+++-+-+----++--+--+
+----+-+-++++--++-++-++++-+-+----++--+-- ++----+-+-++++--++-+--++++-+-+----++--+-
+++----+-+-++++--++----++++-+-+----++--+ +-++----+-+-++++--++-+--++++-+-+----++--
"""
REAL_WIDTHS = [768, 1536, 2560, 5120, 1024]  # mamba-130m d_model / d_inner, mamba-2.8b, and a power of two


def table(text: str) -> torch.Tensor:
    rows = text.split()
    return torch.tensor([[1.0 if c == "+" else -1.0 for c in row] for row in rows], dtype=torch.float64)


def random_input(n, dtype=torch.float32, shape=(3, 5)):
    generator = torch.Generator().manual_seed(n)
    return torch.randn(*shape, n, generator=generator, dtype=torch.float64).to(dtype)


def test_base_matrices_equal_quambas_tables():
    assert torch.equal(base_matrix(12), table(TABLE_12))
    assert torch.equal(base_matrix(40), table(TABLE_40))


def test_forty_is_the_paley_one_twenty_doubled():
    a = base_matrix(20)
    assert torch.equal(base_matrix(40), torch.cat([torch.cat([a, a], 1), torch.cat([a, -a], 1)], 0))
    assert torch.equal(a[0], torch.tensor([1.0] + [-1.0] * 19, dtype=torch.float64))  # + then 19 -
    assert torch.equal(a[:, 0], torch.ones(20, dtype=torch.float64))


@pytest.mark.parametrize("m", [12, 20, 28, 40])
def test_base_matrices_are_hadamard(m):
    h = base_matrix(m)
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize("n, m", [(768, 12), (1536, 12), (2560, 40), (5120, 40), (1024, 1), (40, 40), (12, 12)])
def test_quamba_layout_is_base_kron_sylvester(n, m):
    """H_n = M kron H_p with H_p Sylvester in natural order: H_p[r][r'] = (-1)^popcount(r & r')."""
    p = n // m
    r = torch.arange(p)
    bits = torch.bitwise_and(r[:, None], r[None, :])
    popcount = sum((bits >> k) & 1 for k in range(max(p.bit_length(), 1)))
    sylvester = (1 - 2 * (popcount % 2)).to(torch.float64)
    assert torch.equal(hadamard_matrix(n), torch.kron(base_matrix(m), sylvester))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", REAL_WIDTHS)
def test_real_widths_are_exactly_hadamard_and_orthonormal(kind, n):
    h = hadamard_matrix(n, kind)
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    r64 = rotation(n, kind).double()  # fp32 entries; the product in float64 shows the rotation's own error
    assert (r64 @ r64.T - torch.eye(n, dtype=torch.float64)).abs().max().item() < 1e-6


@pytest.mark.parametrize("n, quamba, extended", [
    (20, False, True), (28, False, True), (56, False, True), (3584, False, True),  # 20, 28 * 2^k: extended only
    (40, True, True), (80, True, True), (96, True, True), (320, True, True),
    (120, False, False), (36, False, False), (60, False, False), (3, False, False), (0, False, False),
])
def test_width_dispatch(n, quamba, extended):
    assert supported(n, "quamba") is quamba and supported(n, "extended") is extended


def test_extended_equals_quamba_where_neither_divides_by_20():
    for n in (768, 1536, 1024, 96):
        assert torch.equal(hadamard_matrix(n, "extended"), hadamard_matrix(n, "quamba"))


def test_extended_uses_its_own_twenty_for_40_times_2k():
    """Quamba runs 2560 as H_40 kron H_64 = H_2 kron A kron H_64; extended as A kron H_128: the same
    matrix up to a permutation of the index, so both rotate, differently."""
    quamba, extended = hadamard_matrix(2560, "quamba"), hadamard_matrix(2560, "extended")
    assert not torch.equal(quamba, extended)
    assert torch.equal(extended, torch.kron(base_matrix(20), hadamard_matrix(128)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 16, 256, 12, 48, 1536, 40, 160, 2560, 5120])
def test_fast_transform_equals_dense_rotation(kind, n):
    x = random_input(n)  # (3, 5, n)
    fast = hadamard_transform(x, kind)
    assert fast.shape == x.shape and fast.dtype == torch.float32
    assert (fast - x @ rotation(n, kind).T).abs().max().item() < 1e-5


@pytest.mark.parametrize("n", [20, 28, 112, 3584])
def test_extended_fast_transform_equals_dense(n):
    x = random_input(n)
    assert (hadamard_transform(x, "extended") - x @ rotation(n, "extended").T).abs().max().item() < 1e-5


@pytest.mark.parametrize("n", [12, 160, 5120])
def test_fast_transform_equals_dense_rotation_in_float64(n):
    x = random_input(n, dtype=torch.float64)
    fast = hadamard_transform(x)
    assert fast.dtype == torch.float64
    assert (fast - x @ rotation(n, dtype=torch.float64).T).abs().max().item() < 1e-12


@pytest.mark.parametrize("n", [64, 1536, 2560, 5120])
def test_inverse_fused_into_linear_leaves_output_unchanged(n):
    generator = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(n, 7, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(7, n, generator=generator) / n**0.5)
    fused = torch.nn.Linear(n, 7, bias=True)
    with torch.no_grad():
        fused.weight.copy_(linear.weight @ rotation(n).T)  # W T^T, (7, n)
        fused.bias.copy_(linear.bias)
    x = random_input(n)  # (3, 5, n)
    with torch.no_grad():
        assert (fused(hadamard_transform(x)) - linear(x)).abs().max().item() < 1e-5  # (W T^T)(T x)


@pytest.mark.parametrize("kind, n", [("quamba", 20), ("quamba", 28), ("quamba", 120), ("extended", 120),
                                     ("quamba", 1000), ("quamba", 0)])
def test_unsupported_width_raises_naming_n_and_kind(kind, n):
    for build in (hadamard_matrix, rotation):
        with pytest.raises(ValueError, match=rf"n={n}\b.*hadamard='{kind}'"):
            build(n, kind)
    with pytest.raises(ValueError, match=rf"n={n}\b"):
        hadamard_transform(torch.zeros(2, max(n, 1)) if n else torch.zeros(2, 0), kind)


def test_unknown_kind_names_the_allowed_kinds():
    with pytest.raises(ValueError, match=r"'sloane'.*\['quamba', 'extended'\]"):
        hadamard_matrix(16, "sloane")


def test_a_model_width_without_a_quamba_matrix_fails_before_work_naming_the_option():
    config = MambaConfig(d_model=112, n_layer=1, vocab_size=64)  # 28 * 4: d_inner 224 = 28 * 8
    with pytest.raises(ConfigError, match=r"recipe.hadamard: d_inner.*224.*hadamard: extended adds"):
        check_widths(config, rotate_residual=True, kind="quamba")
    check_widths(config, rotate_residual=True, kind="extended")


def test_half_precision_input_comes_back_half_precision():
    x = random_input(1536, dtype=torch.float16)
    y = hadamard_transform(x)
    assert y.dtype == torch.float16 and y.shape == x.shape
    assert (y.float() - x.float() @ rotation(1536).T).abs().max().item() < 1e-2


def test_transform_accepts_a_single_vector():
    x = random_input(40, shape=())  # (40,)
    assert (hadamard_transform(x) - rotation(40) @ x).abs().max().item() < 1e-5


@pytest.mark.parametrize("rows, n, dtype", [(1000, 2560, torch.float64), (600, 768, torch.float32),
                                            (300, 1024, torch.float16), (257, 5120, torch.float32), (40, 2560, torch.float32)])
def test_weight_rotation_in_row_blocks_equals_the_whole_transform_bit_for_bit(rows, n, dtype):
    """The assembly's fast path (blocks of rows that stay in the cache) changes no bit: widths with
    a base matrix (2560 = 40 x 64, 768 = 12 x 64, 5120) and without (1024), a last partial block,
    fewer rows than a block, and a transposed (strided) weight as out_proj's rotation passes it."""
    weight = (torch.randn(rows, n, generator=torch.Generator().manual_seed(rows)) * 2).to(dtype)
    whole = hadamard_transform(weight)
    assert torch.equal(rotate_weight_rows(weight), whole)
    strided = weight.T.contiguous().T  # the same (rows, n) values, column-major
    assert torch.equal(rotate_weight_rows(strided), whole)
    assert torch.equal(rotate_weight_rows(strided, out=strided), whole)  # in place, as the rotation writes weights
    half = torch.empty(rows, n, dtype=torch.float16)
    assert torch.equal(rotate_weight_rows(weight, out=half), whole.to(torch.float16))  # cast once, as copy_ casts


def test_compiled_butterflies_and_scale_equal_the_eager_ones_bit_for_bit():
    """What CUDA runs compiled (the cast and butterfly stages; the scale and cast), compiled here on
    the CPU: the same float operations per element, so the same bits."""
    from quamba.numerics.hadamard import _butterflies, _scaled
    from quamba.numerics.quantizers import compiled

    x = (torch.randn(3, 5, 5120, generator=torch.Generator().manual_seed(0)) * 3).half()
    eager = _butterflies(x, m=40, p=128, compute=torch.float32)
    assert torch.equal(compiled(_butterflies, m=40, p=128, compute=torch.float32)(x), eager)
    assert torch.equal(compiled(_scaled, n=5120, dtype=torch.float16)(eager), _scaled(eager, n=5120, dtype=torch.float16))


def test_the_scale_is_a_multiply_by_one_over_sqrt_n_in_float32():
    """The FHT kernel multiplies by its float `scale` (1 / sqrt(n)); a division by sqrt(n) would
    differ by an ulp on some values, and so would a compiled kernel on CUDA, where inductor turns
    a division by a constant into that multiply."""
    from quamba.numerics.hadamard import _scaled

    y = torch.randn(7, 40, 128, generator=torch.Generator().manual_seed(3)) * 5
    scale = torch.tensor(1 / math.sqrt(5120), dtype=torch.float32)
    assert torch.equal(_scaled(y, n=5120, dtype=torch.float32), y.reshape(7, 5120) * scale)
    assert not torch.equal(y.reshape(7, 5120) * scale, y.reshape(7, 5120) / math.sqrt(5120))  # the choice shows


def test_eager_numerics_names_options_this_torch_has():
    from torch._inductor import config

    from quamba.numerics.quantizers import eager_numerics

    options = eager_numerics()
    assert len(options) == 2 and all(options.values())  # precision casts and IEEE division
    flat = config.get_config_copy()
    assert all(key in flat for key in options), options


@pytest.mark.parametrize("p", [1, 2, 4, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_butterflies_in_two_buffers_equal_the_stacked_stages_and_leave_the_input_alone(p, dtype):
    from quamba.numerics.hadamard import _walsh_hadamard, stacked_butterflies

    x = torch.randn(6, 40, p, generator=torch.Generator().manual_seed(p), dtype=dtype)
    before = x.clone()
    assert torch.equal(_walsh_hadamard(x), stacked_butterflies(x)) and torch.equal(x, before)
    strided = x.transpose(0, 1)  # not contiguous
    assert torch.equal(_walsh_hadamard(strided), stacked_butterflies(strided))
    tracked = x.clone().requires_grad_()  # autograd records: the stacked stages, differentiable
    y = _walsh_hadamard(tracked)
    assert torch.equal(y.detach(), stacked_butterflies(x)) and y.requires_grad
