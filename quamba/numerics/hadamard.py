"""Orthonormal Hadamard rotations for every width real Mamba models use.

Quamba rotates activations by R = H / sqrt(n) before a linear layer and fuses R^T into its
weight: W x = (W R^T)(R x), and R x has its outliers spread over all channels, so it quantizes
with a smaller scale. Supported widths are n = 2^k and n = m * 2^k for m in {12, 20, 28, 40}
(d_inner 1536 = 12 * 128 for mamba-130m, 2560 = 20 * 128, 5120 = 40 * 128 for mamba-2.8b).

Every matrix here is H_m kron H_{2^k}, with H_{2^k} the Sylvester matrix H_2 kron ... kron H_2,
so the transform can run as a fast Walsh-Hadamard butterfly plus one small m x m matmul.
"""

from __future__ import annotations

import functools
import math

import torch

# Base orders whose matrices are built here; 40 needs no entry of its own, because
# H_40 = H_20 kron H_2 is exactly the 20 * 2^k matrix with k = 1.
BASE_ORDERS = (12, 20, 28)
ALLOWED = "n = 2^k or n = m * 2^k with m in {12, 20, 28, 40} and k >= 0"


def _split(n: int) -> tuple[int, int] | None:
    """(m, p) with n = m * p, p a power of two and m in {1, 12, 20, 28}; None if impossible."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return None
    for m in (1, *BASE_ORDERS):
        p = n // m
        if n % m == 0 and p & (p - 1) == 0:
            return m, p
    return None


def supported(n: int) -> bool:
    """Whether a Hadamard rotation of width n can be built here."""
    return _split(n) is not None


def _quadratic_character(q: int) -> list[int]:
    """chi(a) for a in 0..q-1: 0 at 0, +1 on nonzero squares mod the prime q, -1 elsewhere."""
    squares = {(i * i) % q for i in range(1, q)}
    return [0] + [1 if a in squares else -1 for a in range(1, q)]


def _jacobsthal(q: int) -> torch.Tensor:
    """Q_ij = chi(j - i) mod q, (q, q); skew-symmetric for q = 3 mod 4, symmetric for q = 1."""
    chi = _quadratic_character(q)
    rows = [[chi[(j - i) % q] for j in range(q)] for i in range(q)]
    return torch.tensor(rows, dtype=torch.float64)


def _bordered(q: int, first_column: float) -> torch.Tensor:
    """[[0, 1^T], [c * 1, Q]], (q + 1, q + 1): the conference-matrix core of both Paley builds."""
    core = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    core[0, 1:] = 1.0
    core[1:, 0] = first_column
    core[1:, 1:] = _jacobsthal(q)
    return core


def _paley_one(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q = 3 mod 4: I + S with S skew and S S^T = q I."""
    assert q % 4 == 3
    return torch.eye(q + 1, dtype=torch.float64) + _bordered(q, -1.0)


def _paley_two(q: int) -> torch.Tensor:
    """Order 2(q + 1) for a prime q = 1 mod 4: conference matrix C with 0 -> A, +-1 -> +-B."""
    assert q % 4 == 1
    conference = _bordered(q, 1.0)  # (q + 1, q + 1), symmetric, C C^T = q I
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    eye = torch.eye(q + 1, dtype=torch.float64)
    return torch.kron(conference, b) + torch.kron(eye, a)  # (2(q + 1), 2(q + 1))


def _sylvester(p: int) -> torch.Tensor:
    """H_p for p = 2^k by doubling H -> [[H, H], [H, -H]], i.e. H_2 kron H."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)  # (2s, 2s)
    return h


_BASE_BUILDERS = {
    1: lambda: torch.ones(1, 1, dtype=torch.float64),
    12: lambda: _paley_one(11),
    20: lambda: _paley_one(19),
    28: lambda: _paley_two(13),
}


@functools.lru_cache(maxsize=None)
def _hadamard_float64(n: int) -> torch.Tensor:
    """The cached +-1 matrix H_m kron H_p, (n, n); callers must not modify it."""
    m, p = _split(n)
    return torch.kron(_BASE_BUILDERS[m](), _sylvester(p))


def _checked_split(n: int) -> tuple[int, int]:
    split = _split(n)
    if split is None:
        raise ValueError(f"no Hadamard matrix of size n={n!r}: supported sizes are {ALLOWED}")
    return split


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The +-1 matrix H of order n with H H^T = n I, as a fresh tensor the caller may modify."""
    _checked_split(n)
    return _hadamard_float64(n).to(dtype=dtype, copy=True)


def rotation(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The orthonormal R = H / sqrt(n), (n, n): rotates activations, R^T fuses into weights."""
    _checked_split(n)
    return (_hadamard_float64(n) / math.sqrt(n)).to(dtype=dtype, device=device)


def _walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """y = x H_p^T along the last dim (p = 2^k), by log2(p) add/sub butterfly stages."""
    *lead, p = x.shape
    half = 1
    while half < p:
        pairs = x.reshape(*lead, p // (2 * half), 2, half)  # (..., blocks, 2, half)
        top, bottom = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((top + bottom, top - bottom), dim=-2).reshape(*lead, p)  # (..., p)
        half *= 2
    return x


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x @ rotation(n).T along the last dim in O(n log n + n m), returned in x's dtype.

    Computed in float32 (float64 if x is float64) so a half-precision input loses nothing
    to the sums. With x's last dim viewed as (m, p), (H_m kron H_p) x = H_m X H_p^T.
    """
    n = x.shape[-1]
    m, p = _checked_split(n)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    lead = x.shape[:-1]
    y = _walsh_hadamard(x.to(compute).reshape(*lead, m, p))  # (..., m, p) = X H_p^T
    if m > 1:
        base = _hadamard_float64(m).to(dtype=compute, device=x.device)  # (m, m)
        y = torch.matmul(base, y)  # (..., m, p) = H_m X H_p^T
    y = y.reshape(*lead, n) / math.sqrt(n)  # (..., n)
    return y.to(x.dtype)
