"""Top-r eigenpairs of a symmetric PSD Gram with known trace: the torch backend.

r is the smallest count of leading eigenvalues whose sum passes ``eta * trace``
(the reference's ``r = #{k : cumsum_k / total <= eta} + 1``). Two methods:

* ``dense``: ``torch.linalg.eigh`` of the whole m x m matrix;
* ``block``: block subspace iteration with Rayleigh-Ritz. The bulk product
  ``G @ X`` runs in the working precision; the projected k x k problem, the
  block Gram for CholeskyQR2 and the residuals are float64. The block grows
  until its Ritz values pass ``eta * trace``; the leading r pairs are accepted
  when ``||G u - theta u|| <= tol * theta_1``. A warm start (the previous basis,
  for sequential editing) usually needs one or two iterations.

``auto`` runs the block method while its estimated cost stays below that of a
dense solve and falls back to ``dense`` when it would not win (r a large
fraction of m, or slow convergence). The CUDA extension implements the same
algorithm; this module is its oracle on CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._validation import check_finite

# Energy left above which the cut is not "at the end of the spectrum": beyond
# this point the float64 cumulative sum is within 1e-6 * trace of any eta close
# to 1, which the accuracy contract treats as an ambiguous cut.
FULL_ENERGY_SLACK = 5e-7
DEFAULT_TOL = {torch.float32: 2e-6, torch.float64: 1e-11}
METHODS = ("auto", "dense", "block")
AUTO_BLOCK_FRACTION = 8  # auto uses the block method only for blocks of at most m / 8 columns


class ConvergenceError(RuntimeError):
    """The block eigensolver did not converge within its iteration cap."""


@dataclass(frozen=True)
class Eigenpairs:
    values: torch.Tensor  # (r,) descending, float64
    vectors: torch.Tensor  # (m, r) orthonormal columns, working precision
    method: str  # "dense" or "block"
    iterations: int  # block iterations run (0 for dense)
    block_size: int  # final block size (m for dense)


def select_rank(values_desc: torch.Tensor, trace: float, eta: float, *, complete: bool) -> int | None:
    """The cumulative rule on leading eigenvalues (float64, descending).

    Returns None when ``values_desc`` is only a leading part of the spectrum
    (``complete=False``) whose sum does not yet pass ``eta * trace``.
    """
    vals = values_desc.double().cpu()
    cum = torch.cumsum(vals, 0)
    count = int((cum <= eta * trace).sum())
    full = torch.nonzero(cum >= trace * (1.0 - FULL_ENERGY_SLACK))
    if full.numel():
        # All energy is captured by then: any larger r is an ambiguous cut, and
        # the eigenvectors past the numerical rank are rounding noise.
        return min(count + 1, int(full[0]) + 1)
    if count == vals.numel():
        return None if not complete else max(1, int((vals > 0).sum()))
    return count + 1


def orthonormalize(X: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """Orthonormal basis of X's columns: CholeskyQR2 with a float64 block Gram.

    ``passes=1`` (CholeskyQR) suffices when X is already close to orthonormal.
    Falls back to Householder QR when the block is numerically rank-deficient.
    """
    Q = X
    for _ in range(passes):
        Qd = Q.double()
        L, info = torch.linalg.cholesky_ex(Qd.T @ Qd)
        if int(info) != 0 or not bool(torch.isfinite(L).all()):
            return torch.linalg.qr(X.double())[0].to(X.dtype)
        Q = torch.linalg.solve_triangular(L, Qd.T, upper=False).T.to(X.dtype)
    return Q


def rayleigh_ritz(G: torch.Tensor, X: torch.Tensor):
    """Ritz values (float64, descending), rotated X and G X, and residual norms."""
    Y = G @ X
    H = X.double().T @ Y.double()
    H = 0.5 * (H + H.T)
    theta, S = torch.linalg.eigh(H)
    theta, S = theta.flip(0), S.flip(1)
    X = X @ S.to(X.dtype)
    Y = Y @ S.to(X.dtype)
    residual = torch.linalg.vector_norm(Y.double() - X.double() * theta, dim=0)
    return theta, X, Y, residual


def dense_eigenpairs(G: torch.Tensor, trace: float, eta: float) -> Eigenpairs:
    values, vectors = torch.linalg.eigh(G)
    values, vectors = values.flip(0).double(), vectors.flip(1)
    r = select_rank(values, trace, eta, complete=True)
    return Eigenpairs(values[:r], vectors[:, :r].contiguous(), "dense", 0, G.shape[0])


def _dense_cost(m: int) -> float:
    # eigh of m x m (LAPACK syevd: tridiagonal reduction, divide and conquer,
    # back-transformation) in units of the block method's flops; measured on
    # a CPU at m = 2048 as about as long as 3 m^3 of block-method work.
    return 3.0 * m**3


def _iteration_cost(m: int, k: int) -> float:
    # G @ X (fp32), CholeskyQR2 and Rayleigh-Ritz block Grams (fp64, counted
    # twice), the k x k fp64 eigh, the rotation of X and Y.
    return 2.0 * m * m * k + 16.0 * m * k * k + 30.0 * k**3


def block_eigenpairs(
    G: torch.Tensor,
    trace: float,
    eta: float,
    *,
    init: torch.Tensor | None = None,
    tol: float | None = None,
    max_iter: int = 200,
    oversample: int | None = None,
    cost_budget: float | None = None,
    max_block: int | None = None,
    generator: torch.Generator | None = None,
) -> Eigenpairs | None:
    """Block subspace iteration with Rayleigh-Ritz.

    Returns None when ``cost_budget`` (in flops) would be exceeded or the block
    would outgrow ``max_block`` columns, so the caller can fall back to a dense
    solve; raises ConvergenceError when
    ``max_iter`` is reached.
    """
    m = G.shape[0]
    dtype = G.dtype
    tol = DEFAULT_TOL[dtype] if tol is None else tol
    if generator is None:
        generator = torch.Generator(device=G.device).manual_seed(0)

    def random_columns(count: int) -> torch.Tensor:
        return torch.randn(m, count, generator=generator, device=G.device, dtype=dtype)

    if init is not None:
        # Warm start: the previous basis plus the directions its residual
        # G V - V (V^T G V) points to (where the change moved the subspace),
        # topped up with random guard vectors.
        k0 = init.shape[1]
        p = oversample if oversample is not None else max(16, k0 // 4)
        V = orthonormalize(init.to(dtype))
        GV = G @ V
        R = GV - V @ (V.T @ GV)
        keep = torch.topk(torch.linalg.vector_norm(R, dim=0), min(p, k0)).indices
        topup = max(0, min(p, m - k0) - keep.numel())
        guards = [R[:, keep], random_columns(topup)]
        X = torch.cat([V, *guards], dim=1)[:, :m]
    else:
        k0 = min(m, 32)
        X = random_columns(k0)
        p = oversample if oversample is not None else 8
    X = orthonormalize(X)
    spent = 0.0
    previous = None  # worst relative residual of the leading r pairs, last iteration
    last_energy = None  # sum of the Ritz values, last iteration (while r is unknown)
    steps_at_k = 0
    for iteration in range(1, max_iter + 1):
        k = X.shape[1]
        spent += _iteration_cost(m, k)
        if cost_budget is not None and spent > cost_budget:
            return None
        theta, X, Y, residual = rayleigh_ritz(G, X)
        r = select_rank(theta, trace, eta, complete=(k == m))
        if r is not None and (r + p <= k or k == m):
            worst = float((residual[:r] / theta[0]).max())
            if worst <= tol:
                return Eigenpairs(theta[:r].clone(), X[:, :r].contiguous(), "block", iteration, k)
            if cost_budget is not None and previous is not None:
                # Give up early when the observed convergence rate cannot reach
                # tol within the budget (flat spectra: a dense solve is cheaper).
                rate = worst / previous
                needed = math.inf if rate >= 1.0 else math.log(tol / worst) / math.log(rate)
                if spent + needed * _iteration_cost(m, k) > cost_budget:
                    return None
            previous = worst
            X = orthonormalize(Y)  # one subspace-iteration step
            continue
        previous = None
        # Too few guard vectors, or too little energy in the block. Grow it once
        # its Ritz values have settled (more iterations would not add energy);
        # until then a subspace-iteration step is cheaper.
        energy = float(theta.sum())
        steps_at_k = 0 if last_energy is None else steps_at_k + 1
        settled = r is not None or steps_at_k >= 3 or (last_energy is not None and energy <= last_energy * 1.01)
        last_energy = energy
        if not settled:
            X = orthonormalize(Y)
            continue
        k_new = min(m, max(2 * k, (r or 0) + p))
        if max_block is not None and k_new > max_block:
            return None
        extra = random_columns(k_new - k)
        extra -= X @ (X.T @ extra)
        X = orthonormalize(torch.cat([Y, extra], dim=1))
        last_energy = None
    raise ConvergenceError(
        f"block eigensolver did not converge in {max_iter} iterations "
        f"(m={m}, block={X.shape[1]}, tol={tol:g})"
    )


def auto_block_limit(m: int) -> int:
    """Largest block the auto rule gives the block method (m / AUTO_BLOCK_FRACTION columns)."""
    return max(m // AUTO_BLOCK_FRACTION, 1)


def too_flat_for_block(G: torch.Tensor, trace: float) -> bool:
    """The cold-start rule of ``auto``: the effective rank trace^2 / ||G||_F^2 (how many
    eigenvalues of comparable size carry the energy) exceeds the block limit, so a
    dense solve wins; known at the cost of one pass over G."""
    return trace**2 / float(torch.linalg.matrix_norm(G).double() ** 2) > auto_block_limit(G.shape[0])


def top_eigenpairs(
    G: torch.Tensor,
    trace: float,
    eta: float,
    *,
    method: str = "auto",
    init: torch.Tensor | None = None,
    tol: float | None = None,
    max_iter: int = 200,
) -> Eigenpairs:
    """The top-r eigenpairs of the symmetric PSD matrix G, r by the cumulative rule.

    ``init`` (m x k, orthonormal columns) warm-starts the block method.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_finite(G, "G")
    m = G.shape[0]
    if method == "dense" or (method == "auto" and m <= 64):
        return dense_eigenpairs(G, trace, eta)
    if method == "block":
        return block_eigenpairs(G, trace, eta, init=init, tol=tol, max_iter=max_iter)
    # auto: the block method wins only while its block is a small part of m
    # (its per-iteration cost grows as k^3 and flat spectra converge slowly).
    max_block = auto_block_limit(m)
    if init is not None and init.shape[1] + max(16, init.shape[1] // 4) > max_block:
        return dense_eigenpairs(G, trace, eta)
    if init is None and too_flat_for_block(G, trace):
        return dense_eigenpairs(G, trace, eta)
    budget = (0.5 if init is None else 1.0) * _dense_cost(m)
    result = block_eigenpairs(
        G, trace, eta, init=init, tol=tol, max_iter=max_iter, cost_budget=budget, max_block=max_block
    )
    return dense_eigenpairs(G, trace, eta) if result is None else result
