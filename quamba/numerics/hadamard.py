"""Orthonormal Hadamard rotations, built and dispatched as Quamba's kernels do (or extended).

Quamba rotates activations by T = H / sqrt(n) before a linear layer and fuses T^T into its
weight: W x = (W T^T)(T x), and T x has its outliers spread over all channels, so it quantizes
with a smaller scale. Every matrix here is H_n = M kron H_p with p = 2^k and H_p Sylvester's
(natural order, H_p[r][r'] = (-1)^popcount(r & r')): index j = c * p + r, H_p mixes each
contiguous block of p values and the small base matrix M mixes the blocks. The transform runs
as a fast Walsh-Hadamard butterfly plus one m x m matmul, in float32, scale applied last.

Two kinds, recorded in every artifact (recipe option `hadamard`):
- "quamba" (the default): the official kernels' dispatch and matrices. n % 12 == 0 -> M = the
  12 x 12 Paley construction II matrix for q = 5 (n / 12 must be a power of two); else
  n % 40 == 0 -> M = [[A, A], [A, -A]] with A the 20 x 20 Paley construction I matrix for q = 19;
  else n must be a power of two (M = [1]). So 20 * 2^k runs as 40 * 2^(k-1), and 20, 28 * 2^k
  and multiples of 120 are refused. Real widths: 768, 1536 -> 12N; 2560, 5120 -> 40N; 1024,
  2048, 4096 -> Sylvester.
- "extended": Quamba's 12 and Sylvester, plus A itself for every 20 * 2^k (40 * 2^k included:
  A kron H_2p instead of Quamba's H_2 kron A kron H_p, the same matrix up to a permutation of
  its index) and the 28 x 28 Paley construction II matrix for q = 13 for 28 * 2^k. It differs
  from "quamba" only at widths divisible by 20 or 28.
"""

from __future__ import annotations

import functools
import math

import torch

from quamba.numerics import quantizers
from quamba.numerics.quantizers import HALF_AWAY, compiled, round_to_integer

# On CUDA, the cast and butterfly stages, and the scale and cast, as compiled kernels (see
# hadamard_transform). Bit-equal to the eager stages on an H200 at widths 5120 and 2560
# (tests/test_cuda_quant.py) and 1.2x (one row) to 2.5x (8192 rows) faster there (bench/README.md),
# but off: the eager path serves pipeline jobs, where compiling costs seconds per process, and
# compiled blocks (MambaLMHeadModel.compile_blocks) fuse the rotation with the rest anyway.
FUSE_ON_CUDA = False

KINDS = ("quamba", "extended")
ALLOWED = {
    "quamba": "n = 2^k, 12 * 2^k or 40 * 2^k (20 * 2^k for k >= 1 is 40 * 2^(k-1))",
    "extended": "n = 2^k, 12 * 2^k, 20 * 2^k or 28 * 2^k",
}
_BASES = {"quamba": (12, 40), "extended": (12, 20, 28)}  # tried in this order, then 2^k


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"hadamard: {kind!r} is not a Hadamard kind; allowed: {list(KINDS)}")


def _split(n: int, kind: str) -> tuple[int, int] | None:
    """(m, p) with n = m * p as the kind dispatches it, p a power of two; None if refused.

    Quamba's dispatch tests divisibility first and only then asserts the power of two, so a
    multiple of 12 that is not 12 * 2^k is refused even where another base would fit."""
    _check_kind(kind)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return None
    for m in _BASES[kind]:
        if n % m == 0:
            return (m, n // m) if _is_power_of_two(n // m) else None
    return (1, n) if _is_power_of_two(n) else None


def supported(n: int, kind: str = "quamba") -> bool:
    """Whether a Hadamard rotation of width n exists under `kind`."""
    return _split(n, kind) is not None


def _legendre(q: int) -> list[int]:
    """chi(a) for a in 0..q-1: 0 at 0, +1 on nonzero squares mod the prime q, -1 elsewhere."""
    squares = {(i * i) % q for i in range(1, q)}
    return [0] + [1 if a in squares else -1 for a in range(1, q)]


def _paley_one(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q = 3 mod 4, in Quamba's orientation: row 0 is + then q times -,
    column 0 is all +, the core is 1 on the diagonal and chi(i - j) elsewhere."""
    assert q % 4 == 3
    chi = _legendre(q)
    h = torch.empty(q + 1, q + 1, dtype=torch.float64)
    h[0, 0], h[0, 1:], h[1:, 0] = 1.0, -1.0, 1.0
    h[1:, 1:] = torch.tensor([[1 if i == j else chi[(i - j) % q] for j in range(q)] for i in range(q)],
                             dtype=torch.float64)
    return h


def _paley_two(q: int) -> torch.Tensor:
    """Order 2(q + 1) for a prime q = 1 mod 4: the symmetric conference matrix C = [[0, 1^T],
    [1, Q]] (Q_ij = chi(j - i)) with 0 -> [[1, -1], [-1, -1]] and +-1 -> +-[[1, 1], [1, -1]]."""
    assert q % 4 == 1
    chi = _legendre(q)
    conference = torch.zeros(q + 1, q + 1, dtype=torch.float64)  # (q + 1, q + 1), C C^T = q I
    conference[0, 1:] = conference[1:, 0] = 1.0
    conference[1:, 1:] = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(conference, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


def _doubled(a: torch.Tensor) -> torch.Tensor:
    """[[A, A], [A, -A]]: rows 0..m-1 are [A | A], rows m..2m-1 are [A | -A]."""
    return torch.cat([torch.cat([a, a], 1), torch.cat([a, -a], 1)], 0)


_BASE_BUILDERS = {
    1: lambda: torch.ones(1, 1, dtype=torch.float64),
    12: lambda: _paley_two(5),
    20: lambda: _paley_one(19),
    28: lambda: _paley_two(13),
    40: lambda: _doubled(_paley_one(19)),
}


@functools.cache
def base_matrix(m: int) -> torch.Tensor:
    """The cached +-1 base matrix M (m, m) for m in {1, 12, 20, 28, 40}; callers must not modify it."""
    return _BASE_BUILDERS[m]()


_BASES_ON: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _base_on(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """base_matrix(m) in `dtype` on `device`, copied there once (no host copy per transform, which a
    CUDA graph could not record)."""
    key = (m, dtype, torch.device(device))
    if key not in _BASES_ON:
        _BASES_ON[key] = base_matrix(m).to(dtype=dtype, device=device)
    return _BASES_ON[key]


def prepare_for_compile() -> None:
    """Mark `_base_on` a constant for torch.compile: compiled blocks take the base matrix as a
    constant instead of tracing its construction into every call. Done when compiling, not at
    import: torch.compiler imports dynamo, about a second of every job's start-up."""
    global _base_on
    _base_on = torch.compiler.assume_constant_result(_base_on)


def _sylvester(p: int) -> torch.Tensor:
    """H_p for p = 2^k by doubling H -> [[H, H], [H, -H]]."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = _doubled(h)  # (2s, 2s)
    return h


def _checked_split(n: int, kind: str) -> tuple[int, int]:
    split = _split(n, kind)
    if split is None:
        raise ValueError(f"no Hadamard matrix of size n={n!r} with hadamard={kind!r}: supported sizes are "
                         f"{ALLOWED[kind]}")
    return split


def hadamard_matrix(n: int, kind: str = "quamba", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The +-1 matrix H_n = M kron H_p (n, n) with H H^T = n I, as a fresh tensor."""
    m, p = _checked_split(n, kind)
    return torch.kron(base_matrix(m), _sylvester(p)).to(dtype=dtype)


def rotation(n: int, kind: str = "quamba", dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> torch.Tensor:
    """The orthonormal T = H_n / sqrt(n), (n, n): rotates activations, T^T fuses into weights."""
    return (hadamard_matrix(n, kind) / math.sqrt(n)).to(dtype=dtype, device=device)


def _walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """y = x H_p^T along the last dim (p = 2^k), by log2(p) add/sub butterfly stages. Each stage
    writes its sums and differences straight into the halves of the next stage's buffer (two
    buffers in turn; x itself is never written): two kernels a stage and no copy, where stacking
    the halves took three and moved 5/3 as many bytes (2-4.7x faster on the CPU, the same bits).
    Where autograd records (out= cannot be differentiated) or torch.compile traces (out= into
    views breaks its graphs; inductor fuses the stages anyway), the stages stack their halves."""
    *lead, p = x.shape
    if p == 1:
        return x
    if torch.compiler.is_compiling() or (x.requires_grad and torch.is_grad_enabled()):
        return stacked_butterflies(x)
    buffers = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(2 if p > 2 else 1)]
    half, turn = 1, 0
    while half < p:
        pairs = x.reshape(*lead, p // (2 * half), 2, half)  # (..., blocks, 2, half)
        out = buffers[turn].view(*lead, p // (2 * half), 2, half)
        top, bottom = pairs[..., 0, :], pairs[..., 1, :]
        torch.add(top, bottom, out=out[..., 0, :])
        torch.sub(top, bottom, out=out[..., 1, :])
        x, turn, half = buffers[turn], (turn + 1) % len(buffers), half * 2
    return x


def stacked_butterflies(x: torch.Tensor) -> torch.Tensor:
    """The same stages, each stacking its sums and differences into a new tensor (the textbook
    form, and `_walsh_hadamard`'s before 2026-12-04): differentiable and traceable."""
    *lead, p = x.shape
    half = 1
    while half < p:
        pairs = x.reshape(*lead, p // (2 * half), 2, half)  # (..., blocks, 2, half)
        top, bottom = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((top + bottom, top - bottom), dim=-2).reshape(*lead, p)  # (..., p)
        half *= 2
    return x


def _butterflies(x: torch.Tensor, m: int, p: int, compute: torch.dtype) -> torch.Tensor:
    """x (..., m * p) -> X H_p^T (..., m, p) in `compute`."""
    return _walsh_hadamard(x.to(compute).reshape(*x.shape[:-1], m, p))


def _scaled(y: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """y (..., m, p) -> y * (1 / sqrt(n)) as (..., n) in `dtype`: a multiply by the scale rounded
    to y's dtype, as the FHT kernel applies its `scale` argument (QUAMBA.md section 2)."""
    return (y.reshape(*y.shape[:-2], n) * (1 / math.sqrt(n))).to(dtype)


def _unscaled(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, int]:
    """(M X H_p^T (..., m, p) in the compute dtype, n): the transform before its scale."""
    n = x.shape[-1]
    m, p = _checked_split(n, kind)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    fuse = compiled if FUSE_ON_CUDA and x.is_cuda else functools.partial
    y = fuse(_butterflies, m=m, p=p, compute=compute)(x)  # (..., m, p) = X H_p^T
    if m > 1:
        y = torch.matmul(_base_on(m, compute, x.device), y)  # (..., m, p) = M X H_p^T
    return y, n


def hadamard_transform(x: torch.Tensor, kind: str = "quamba") -> torch.Tensor:
    """x @ rotation(n, kind).T along the last dim, returned in x's dtype.

    Computed in float32 (float64 if x is float64), the scale 1 / sqrt(n) multiplied in last, as
    the kernel does. With x's last dim viewed as (m, p): (M kron H_p) x = M X H_p^T.

    With FUSE_ON_CUDA, on CUDA the cast and the log2(p) butterfly stages run as one compiled
    kernel and the scale and cast as another, around the base matmul: the same float operations on
    every element as the eager stages, about 3 kernels instead of 12 for the 5120-wide rotation of
    mamba2-2.7b's out_proj input.
    """
    y, n = _unscaled(x, kind)
    fuse = compiled if FUSE_ON_CUDA and x.is_cuda else functools.partial
    return fuse(_scaled, n=n, dtype=x.dtype)(y)  # (..., n)


WEIGHT_ROWS = 256  # rows per block of a weight rotation on the CPU: a block's stages stay in the cache


def rotate_weight_rows(weight: torch.Tensor, kind: str = "quamba", out: torch.Tensor | None = None) -> torch.Tensor:
    """hadamard_transform of every row of a weight (or embedding), the same values bit for bit,
    cast into `out` (default: a new tensor of weight's dtype; `out` may be `weight` itself).

    The transform is row by row, so on the CPU it runs in blocks of WEIGHT_ROWS rows, each written
    into `out` as it is done: a block's butterfly stages stay in the cache instead of streaming a
    100 MB-sized tensor through memory a dozen times, and no whole-size temporary is made (several
    times faster at mamba2-2.7b widths, bench/weight_rotation.py; an assembly rotates every
    in_proj and out_proj of the model). On other devices it is one transform."""
    out = torch.empty_like(weight) if out is None else out
    if weight.device.type != "cpu" or weight.dim() < 2:
        return out.copy_(hadamard_transform(weight, kind))
    for start in range(0, weight.shape[0], WEIGHT_ROWS):
        rows = slice(start, start + WEIGHT_ROWS)
        out[rows] = hadamard_transform(weight[rows], kind)  # the block is read whole before it is written
    return out


def quantized_hadamard_factor(n: int, out_scale: float) -> float:
    """The one factor of Quamba's quantized Hadamard, (1 / sqrt(n)) / s_out, as a double (rounded
    to float32 where it multiplies, as the kernel's float argument is)."""
    return (1 / math.sqrt(n)) / out_scale


def _quantized_tail(y: torch.Tensor, factor: torch.Tensor, n: int, rounding: str) -> torch.Tensor:
    """y (..., m, p) times the factor, rounded, saturated to int8, as (..., n)."""
    return round_to_integer(y.reshape(*y.shape[:-2], n) * factor, rounding).clamp_(-128, 127).to(torch.int8)


def quantized_hadamard_transform(x: torch.Tensor, factor: torch.Tensor, kind: str = "quamba",
                                 rounding: str = HALF_AWAY) -> torch.Tensor:
    """Quamba's QHadamard (QUAMBA.md sections 6 and 8): the int8 codes of x @ T.T at the scale s_out,
    as its kernel makes them. The float32 transform is multiplied by one float32 factor,
    `quantized_hadamard_factor(n, s_out)`, rounded (roundf: half away from zero) and saturated to
    int8; the rotated value is never rounded to x's dtype on the way, nor divided by s_out (which
    is what hadamard_transform, then quantize, would do: another int8 code on some values).
    On CUDA the tail is one compiled kernel where the activation quantizers are fused."""
    y, n = _unscaled(x, kind)
    if quantizers.FUSE_ON_CUDA and x.is_cuda:
        return compiled(_quantized_tail, n=n, rounding=rounding)(y, factor)
    return _quantized_tail(y, factor, n, rounding)
