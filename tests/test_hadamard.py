"""Hadamard rotations: exact +-1 matrices, orthonormal rotations, fast transform = dense."""

import pytest
import torch

from quamba.numerics.hadamard import hadamard_matrix, hadamard_transform, rotation, supported

SIZES = [1, 2, 4, 8, 12, 20, 24, 28, 40, 64, 96, 160, 224, 256, 320, 1536, 2560, 5120]
# Each base order m in {12, 20, 28, 40} with several powers of two, plus plain powers of two.
TRANSFORM_SIZES = [1, 2, 16, 256, 12, 48, 1536, 20, 80, 2560, 28, 112, 3584, 40, 160, 5120]
UNSUPPORTED = [0, -4, 3, 36, 44, 1000]


def random_input(n, dtype=torch.float32, shape=(3, 5)):
    generator = torch.Generator().manual_seed(n)
    return torch.randn(*shape, n, generator=generator, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("n", SIZES)
def test_matrix_has_plus_minus_one_entries(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))


@pytest.mark.parametrize("n", SIZES)
def test_matrix_rows_are_exactly_orthogonal(n):
    h = hadamard_matrix(n)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", SIZES)
def test_sizes_are_supported(n):
    assert supported(n)


def test_forty_is_twenty_kron_two():
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    assert torch.equal(hadamard_matrix(40), torch.kron(hadamard_matrix(20), h2))


def test_returned_matrix_is_a_copy_the_cache_survives():
    hadamard_matrix(12).zero_()
    assert torch.equal(hadamard_matrix(12).abs(), torch.ones(12, 12, dtype=torch.float64))


def test_matrix_is_cast_to_requested_dtype():
    assert hadamard_matrix(24, dtype=torch.float16).dtype == torch.float16


@pytest.mark.parametrize("n", SIZES)
def test_rotation_is_orthonormal_in_float32(n):
    r = rotation(n)
    assert r.dtype == torch.float32 and r.shape == (n, n)
    # The product of the stored fp32 entries is formed in float64: an fp32 matmul adds ~2e-6 of
    # its own accumulation error at n = 5120, which would hide what the rotation itself is.
    r64 = r.double()
    assert (r64 @ r64.T - torch.eye(n, dtype=torch.float64)).abs().max().item() < 1e-6


@pytest.mark.parametrize("n", [1536, 2560])
def test_rotation_is_orthonormal_under_float32_matmul(n):
    r = rotation(n)
    assert (r @ r.T - torch.eye(n)).abs().max().item() < 1e-5


@pytest.mark.parametrize("n", TRANSFORM_SIZES)
def test_fast_transform_equals_dense_rotation(n):
    x = random_input(n)  # (3, 5, n)
    fast = hadamard_transform(x)
    dense = x @ rotation(n).T
    assert fast.shape == x.shape and fast.dtype == torch.float32
    assert (fast - dense).abs().max().item() < 1e-5


@pytest.mark.parametrize("n", [12, 160, 5120])
def test_fast_transform_equals_dense_rotation_in_float64(n):
    x = random_input(n, dtype=torch.float64)
    fast = hadamard_transform(x)
    assert fast.dtype == torch.float64
    assert (fast - x @ rotation(n, dtype=torch.float64).T).abs().max().item() < 1e-12


@pytest.mark.parametrize("n", TRANSFORM_SIZES)
def test_transform_preserves_l2_norm(n):
    x = random_input(n)
    norms_in = x.norm(dim=-1)
    norms_out = hadamard_transform(x).norm(dim=-1)
    assert torch.allclose(norms_out, norms_in, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [64, 1536, 2560, 5120])
def test_inverse_fused_into_linear_leaves_output_unchanged(n):
    generator = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(n, 7, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(7, n, generator=generator) / n**0.5)
    fused = torch.nn.Linear(n, 7, bias=True)
    with torch.no_grad():
        fused.weight.copy_(linear.weight @ rotation(n).T)  # W R^T, (7, n)
        fused.bias.copy_(linear.bias)
    x = random_input(n)  # (3, 5, n)
    with torch.no_grad():
        expected = linear(x)
        rotated = fused(hadamard_transform(x))  # (W R^T)(R x)
    assert (rotated - expected).abs().max().item() < 1e-5


def test_transform_twice_is_identity_for_powers_of_two():
    # The Sylvester matrix is symmetric, so R R = I; a cheap check of the butterfly alone.
    x = random_input(1024)
    assert (hadamard_transform(hadamard_transform(x)) - x).abs().max().item() < 1e-5


@pytest.mark.parametrize("n", UNSUPPORTED)
def test_unsupported_size_raises_naming_n(n):
    assert not supported(n)
    for build in (hadamard_matrix, rotation):
        with pytest.raises(ValueError, match=rf"n={n}\b"):
            build(n)


@pytest.mark.parametrize("n", [3, 36, 44, 1000])
def test_transform_of_unsupported_width_raises_naming_n(n):
    with pytest.raises(ValueError, match=rf"n={n}\b"):
        hadamard_transform(torch.zeros(2, n))


def test_half_precision_input_comes_back_half_precision():
    x = random_input(1536, dtype=torch.float16)
    y = hadamard_transform(x)
    assert y.dtype == torch.float16 and y.shape == x.shape
    dense = x.float() @ rotation(1536).T
    assert (y.float() - dense).abs().max().item() < 1e-2


def test_bfloat16_input_comes_back_bfloat16():
    assert hadamard_transform(random_input(40, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_transform_accepts_a_single_vector():
    x = random_input(28, shape=())  # (28,)
    assert (hadamard_transform(x) - rotation(28) @ x).abs().max().item() < 1e-5
