"""Triton kernel ``kernels/hyperspherical_energy.py`` against its torch twin in float64.

``E = sum_{i != j} f(dist2_ij)`` with ``f(x) = (x + eps)^(-s/2)`` decreasing and
``dist2_ij = max(2 - 2 cos_ij, 0)``. The kernel's energy must lie inside
:func:`sphere_fast.accuracy.energy_interval`, the range any evaluation with the
Gram kernel's cosine rounding can reach (derived there): tight where the
energy is well conditioned (it narrows to a few ulps) and honestly wide where
it is not (duplicate rows with eps far below fp32's resolution of cos near 1).
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from sphere_fast.accuracy import UNIT, energy_interval  # noqa: E402
from sphere_fast.gram import NORM_EPS, hyperspherical_energy_reference  # noqa: E402
from sphere_fast.kernels import hyperspherical_energy as he  # noqa: E402
from tests.helpers import CUDA_DEVICES, DEVICES, make_matrix  # noqa: E402


def torch_hyperspherical_energy(W: torch.Tensor, s: float, eps: float, compute_dtype: torch.dtype | None = None):
    """The energy restated inline: ``A_hat = W / (||w_i|| + 1e-8)``, cosines by one matmul, then the kernel sum.

    Holds the n x n matrix. Returns a 0-d float64 tensor.
    """
    dtype = compute_dtype or (torch.float64 if W.dtype == torch.float64 else torch.float32)
    A = W.to(dtype)
    A_hat = A / (torch.linalg.vector_norm(A, dim=1) + NORM_EPS).unsqueeze(1)
    cos = A_hat @ A_hat.T
    terms = ((2.0 - 2.0 * cos).clamp_min(0.0) + eps).pow(-s / 2.0)
    terms.fill_diagonal_(0.0)
    return terms.sum(dtype=torch.float64)


def check_energy(W: torch.Tensor, s: float, eps: float) -> torch.Tensor:
    E = he.hyperspherical_energy(W, s=s, eps=eps)
    assert E.dtype == torch.float64 and E.dim() == 0 and E.device == W.device
    lo, hi = energy_interval(W, s, eps)
    # the inline restatement and the package's twin agree (in float64)
    twin64 = float(torch_hyperspherical_energy(W.cpu(), s, eps, torch.float64))
    ref64 = float(hyperspherical_energy_reference(W.cpu(), s=s, eps=eps, dtype=torch.float64))
    assert twin64 == pytest.approx(ref64, rel=1e-12)
    assert lo <= twin64 <= hi
    assert lo <= float(E) <= hi, f"energy {float(E)!r} outside [{lo!r}, {hi!r}] (fp64 twin {twin64!r})"
    return E


SHAPES = [(37, 123), (75, 37), (64, 64), (2, 3)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
S_EPS = [(2.0, 1e-6), (1.0, 1e-3), (3.5, 0.1), (0.5, 1e-2)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_energy_matches_fp64_twin(device, dtype, shape):
    W = make_matrix(*shape, dtype, device, seed=11)
    for s, eps in S_EPS:
        check_energy(W, s, eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(37, 123), (75, 37)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_energy_duplicate_rows(device, dtype, shape):
    """Duplicate rows (distance 0) give the largest terms, eps^(-s/2) each."""
    W = make_matrix(*shape, dtype, device, seed=12)
    W[7] = W[3]
    W[20] = 2.5 * W[3]  # same direction: also a duplicate after normalisation
    W[30] = W[3]
    for s, eps in S_EPS:
        check_energy(W, s, eps)


def make_exact_matrix(n: int, d: int, dtype: torch.dtype, device: str, *, seed: int) -> torch.Tensor:
    """Integers in [-4, 4], each row times its own power of two in [2^-6, 2^6].

    Every product of two rows' entries is an integer of at most 16 times one
    power of two common to the whole dot, so each partial sum is exact in fp32
    (and fp16/bf16 hold the entries exactly): any correct kernel, whatever its
    summation order, tiling or tensor-core path, gets the same dot products and
    sums of squares, hence (correctly rounded sqrt and division) the same scales
    and the same fp32 cosines ``acc * (s_a * s_b)``.
    """
    g = torch.Generator().manual_seed(seed)
    entries = torch.randint(-4, 5, (n, d), generator=g, dtype=torch.float64)
    row_scale = 2.0 ** torch.randint(-6, 7, (n, 1), generator=g, dtype=torch.float64)
    return (entries * row_scale).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(32, 123), (32, 37), (64, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_energy_epilogue_from_the_kernels_cosines(device, dtype, shape):
    """The epilogue, tightly: E from the Gram kernel's cosines, on rows whose cosines are exact.

    On ``make_exact_matrix`` rows the two kernels' cosines agree bit for bit
    (whatever tiles either one is autotuned to), and with n a power of two
    ``n * G`` recovers them exactly, so the float64 sum of ``f(max(2 - 2 cos, 0))``
    over them differs from the kernel's E only by the fp32 exp/log and the sums.
    That holds near duplicate rows too, where one ulp of cos near 1 moves a term
    by ~10 % (eps = 1e-6): on rows of rounded dot products no such bound could
    be tight there (``check_energy`` bounds those honestly wide).
    """
    from sphere_fast.kernels.normalized_gram import normalized_gram

    n, d = shape
    W = make_exact_matrix(n, d, dtype, device, seed=16)
    W[9] = W[2]
    W[20] = W[2]  # another tile of the interpreter's 16-row tiles
    W[11] = -3 * W[2]  # antipodal: cos = -1, distance 2
    W[5] = 0  # cos = 0 with every row, distance sqrt(2)
    cos = normalized_gram(W).gram.cpu().double() * n
    # identical rows are normalised identically: one cosine for each of their pairs
    assert float(cos[2, 9]) == float(cos[2, 2]) == float(cos[9, 9]) == float(cos[9, 20]) == float(cos[20, 20])
    assert float(cos[2, 11]) == float(cos[9, 11]) == float(cos[20, 11])
    off = ~torch.eye(n, dtype=torch.bool)
    u = UNIT[dtype]
    for s, eps in S_EPS:
        want = float((((2.0 - 2.0 * cos).clamp_min(0.0) + eps) ** (-s / 2))[off].sum())
        rel = 4 * (abs(s / 2) * abs(math.log(eps)) + 3 + 2 * math.log2(128 * 128)) * u
        got = float(he.hyperspherical_energy(W, s=s, eps=eps))
        assert abs(got - want) <= rel * want, (s, eps, got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "col_strided", "row_strided"])
@pytest.mark.parametrize("shape", [(37, 123), (75, 37)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_energy_strided_inputs(device, layout, shape):
    W = make_matrix(*shape, torch.float32, device, layout, seed=13)
    assert not W.is_contiguous()
    E = check_energy(W, 2.0, 1e-3)
    if device == "cpu":  # the interpreter sums in the same order whatever the strides
        assert torch.equal(E, he.hyperspherical_energy(W.contiguous(), s=2.0, eps=1e-3))


@pytest.mark.parametrize("device", DEVICES)
def test_energy_single_row_and_zero_rows(device):
    W = make_matrix(1, 50, torch.float32, device)
    assert float(he.hyperspherical_energy(W, s=2.0, eps=1e-6)) == 0.0
    W = make_matrix(37, 123, torch.float32, device, zero_rows=(0, 36))
    check_energy(W, 2.0, 1e-3)
    for s, eps in S_EPS:  # two zero rows: cos = 0 with everything, dist2 = 2
        check_energy(W, s, eps)


@pytest.mark.parametrize("device", DEVICES)
def test_energy_is_symmetric_in_the_rows(device):
    """Permuting the rows permutes the terms: the sum moves only by rounding."""
    W = make_matrix(50, 40, torch.float32, device, seed=14)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0)).to(device)
    E, Ep = (float(he.hyperspherical_energy(X, s=1.0, eps=1e-2)) for X in (W, W[perm]))
    assert Ep == pytest.approx(E, rel=1e-5)


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(257, 1031), (1031, 257)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_energy_cuda_multi_tile(device, dtype, shape):
    W = make_matrix(*shape, dtype, device, seed=15)
    W[100] = W[3]
    for s, eps in S_EPS:
        check_energy(W, s, eps)


@pytest.mark.parametrize("device", DEVICES)
def test_energy_dispatch_through_ops(device):
    from sphere_fast import ops

    W = make_matrix(37, 123, torch.bfloat16, device, "transposed")
    E = ops.hyperspherical_energy(W, 2.0, 1e-3, backend="triton")
    assert torch.equal(E, he.hyperspherical_energy(W, s=2.0, eps=1e-3))


@pytest.mark.parametrize("device", DEVICES)
def test_energy_errors_name_the_argument(device):
    W = make_matrix(8, 16, torch.float32, device)
    with pytest.raises(ValueError, match="s must be"):
        he.hyperspherical_energy(W, s=0.0, eps=1e-6)
    with pytest.raises(ValueError, match="eps must be"):
        he.hyperspherical_energy(W, s=2.0, eps=-1.0)
    with pytest.raises(TypeError, match="s must be a real number"):
        he.hyperspherical_energy(W, s="2", eps=1e-6)
    with pytest.raises(ValueError, match="W must be 2-D"):
        he.hyperspherical_energy(W[0], s=2.0, eps=1e-6)
