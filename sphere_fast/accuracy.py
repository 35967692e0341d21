"""The accuracy contract as numbers: the bounds that tests and the GPU check hold results to.

Every result is judged against a float64 computation (:mod:`sphere_fast.reference`,
or the float64 torch twins in :mod:`sphere_fast.gram`); docs/design.md,
"Accuracy contract", says what is promised and why. The bounds are error
bounds derived from the arithmetic, not constants fitted to observed errors.
"""
from __future__ import annotations

import math

import torch

from .gram import NORM_EPS

# Unit roundoff of a 16-bit output: rounding B_proj to it adds at most this to the relative error
# (||B_proj|| <= ||B||); the work before it runs in fp32.
OUTPUT_ROUNDING = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# ||B_proj - B_proj_fp64|| / ||B|| by input dtype, for a well-separated cut (relative gap >= 1e-4);
# 16-bit input: the fp32 bound plus the output's rounding.
TOL_GAPPED = {torch.float64: 1e-10, torch.float32: 1e-5}
TOL_GAPPED.update({dtype: TOL_GAPPED[torch.float32] + u for dtype, u in OUTPUT_ROUNDING.items()})
# For any cut: this over the relative gap g (rounding cannot place the cut better).
TOL_OVER_GAP = {torch.float64: 1e-12, torch.float32: 1e-6}
# max |U^T U - I| by U's dtype.
ORTHO_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}

# Unit roundoff of the accumulation for W's dtype (16-bit W accumulates in fp32).
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-24}
# Operand rounding of the Gram's tensor-core precisions (tf32: hardware may truncate, hence 2^-10;
# tf32x3 keeps a high and a low TF32 part and drops the low x low product: about 2^-20).
OPERAND_ROUNDING = {"fp32": 0.0, "tf32": 2.0**-10, "tf32x3": 2.0**-20, "bf16": 2.0**-8}


def operand_rounding(dtype: torch.dtype, precision: str, side: str) -> float:
    """Rounding of the Gram dot's operands: none for fp64, none for unscaled 16-bit tiles (rows side)."""
    if dtype == torch.float64:
        return 0.0
    if dtype in (torch.float16, torch.bfloat16) and side == "rows":
        return 0.0
    return OPERAND_ROUNDING[precision]


def gram_tolerance(G64: torch.Tensor, K: int, dtype: torch.dtype, precision: str, side: str) -> torch.Tensor:
    """Entrywise bound on a computed normalised Gram against the float64 one, ``G64``.

    For an entry with reduction length K (d on the rows side, n on the cols
    side), operands rounded to unit ``u_op`` (0 when they enter the dot
    exactly) and accumulation unit ``u``, the dot-product error bound with
    ``sum_k |a_k b_k| <= n sqrt(G_aa G_bb)`` (Cauchy-Schwarz on the normalised
    rows) gives

        |G_ab - G64_ab| <= (2 u_op + u_op^2 + (2 K + 10) u) sqrt(G64_aa G64_bb)

    (2K u for the dot and both row norms' sums of squares, 10 u for the
    scalings, the division by n and the oracle's own rounding).
    """
    u_op = operand_rounding(dtype, precision, side)
    e = 2.0 * u_op + u_op**2 + (2 * K + 10) * UNIT[dtype]
    diag = G64.diagonal().clamp_min(0.0)
    return e * torch.sqrt(diag[:, None] * diag[None, :])


def norm_tolerance(norms64: torch.Tensor, d: int, dtype: torch.dtype) -> torch.Tensor:
    """|r - r64| <= (d + 2) u r64 for a row norm: a sum of d squares, then a square root."""
    return (d + 2) * UNIT[dtype] * norms64


def energy_interval(W: torch.Tensor, s: float, eps: float) -> tuple[float, float]:
    """Bounds on any evaluation of the hyperspherical energy of W whose cosines carry Gram-kernel rounding.

    ``E = sum_{i != j} f(dist2_ij)`` with ``f(x) = (x + eps)^(-s/2)`` decreasing
    and ``dist2_ij = max(2 - 2 cos_ij, 0)``. Computed cosines carry a rounding
    error of at most ``delta_c = (2K + 10) u`` (K = d; :func:`gram_tolerance`),
    so each term lies between ``f(dist2 + delta)`` and ``f(max(dist2 - delta, 0))``
    with ``delta = 2 (2 delta_c + 4 u)`` (twice: the float64 oracle rounds
    too), and the sum, up to the relative error of the fp32 exp/log and of
    the in-tile sums, between the sums of those bounds. The interval is
    tight where the energy is well conditioned and honestly wide where it is
    not (duplicate rows with eps far below fp32's resolution of cos near 1).
    """
    n, d = W.shape
    u = UNIT[W.dtype]
    A = W.cpu().double()
    A_hat = A / (torch.linalg.vector_norm(A, dim=1) + NORM_EPS).unsqueeze(1)
    dist2 = (2.0 - 2.0 * (A_hat @ A_hat.T)).clamp_min(0.0)
    delta = 2.0 * (2.0 * (2 * d + 10) * u + 4 * u)
    off = ~torch.eye(n, dtype=torch.bool)
    lo = float(((dist2 + delta + eps) ** (-s / 2))[off].sum())
    hi = float((((dist2 - delta).clamp_min(0.0) + eps) ** (-s / 2))[off].sum())
    # exp(log(x) * -s/2) in the working precision, and a sum of at most 128^2 positive terms per tile
    rel = 4 * (abs(s / 2) * max(abs(math.log(eps)), math.log(4 + eps)) + 3 + 2 * math.log2(128 * 128)) * u
    return lo * (1 - rel), hi * (1 + rel)


def solver_bound(pairs, G: torch.Tensor, tol: float) -> float:
    """What an eigensolve promises, relative to theta_1: the residual tolerance for the
    block method; the backward-error bound of a dense syevd in G's dtype,
    4 sqrt(m) eps ||G||, for the dense method."""
    if pairs.method == "dense":
        eps = torch.finfo(torch.float32).eps if G.dtype == torch.float32 else 2.3e-16
        return 4 * math.sqrt(G.shape[0]) * eps
    return tol
