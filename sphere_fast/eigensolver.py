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
dense solve and falls back to ``dense`` as soon as it would not win (r a large
fraction of m, or slow convergence). The CUDA extension implements the same
algorithm and takes its auto rules from here (:func:`plan_auto`, the cost model
and :func:`iterations_to_converge`); this module is its oracle on CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._validation import check_eig_args
from .gram import ieee_fp32_matmul

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


# -- the auto rules: one cost model and plan for this module and the CUDA extension --

# Costs in units of the block method's flops (docs/design.md, "Eigensolver plan").
# A dense eigh of m x m (syevd: tridiagonal reduction, divide and conquer,
# back-transformation) is charged DENSE_COST m^3: its tridiagonal reduction runs at
# matrix-vector speed, the block method at GEMM speed, so each of its flops costs
# more. The factor is a calibration, not yet measured: retune it from the cold / warm
# solves against torch_eigh in bench/bench_cuda.py on a GPU.
DENSE_COST = 3.0
# One block iteration on k columns, a m^2 k + b m k^2 + c k^3: G @ X, the
# CholeskyQR2 and Rayleigh-Ritz block Grams (fp64, counted twice), the k x k
# fp64 eigh, the rotation of X and Y. The warm start's set-up (G V, its
# residual directions, CholeskyQR of V) is counted as one iteration on V.
ITERATION_COST = (2.0, 16.0, 30.0)
# auto tries a warm start only while its set-up and first iteration cost at most
# this share of a dense solve: when that step shows that the block method cannot
# win, the refit goes dense and costs at most this much more than a cold fit.
WARM_TRIAL_SHARE = 0.1
COLD_BUDGET_SHARE = 0.5  # a cold block solve may spend half a dense solve


def dense_cost(m: int) -> float:
    return DENSE_COST * m**3


def iteration_cost(m: int, k: int) -> float:
    a, b, c = ITERATION_COST
    return a * m * m * k + b * m * k * k + c * k**3


COLD_BLOCK = 32  # columns of a cold start's first block
COLD_OVERSAMPLE = 8  # guard vectors past r on a cold start


def warm_oversample(k0: int, oversample: int | None = None) -> int:
    """Guard vectors beside a warm start of k0 columns: max(16, k0 / 4), and at least
    enough for a cold start's block (a few more wanted pairs after an edit then fit)."""
    return oversample if oversample is not None else max(16, k0 // 4, COLD_BLOCK - k0)


def iterations_to_converge(theta, worst: float, previous: float | None, r: int, k: int, tol: float) -> float:
    """Block iterations still needed for the worst wanted residual to fall from ``worst`` to ``tol``.

    Subspace iteration on k columns shrinks the residual of pair r by about
    lambda_{k+1} / lambda_r per step. That rate is taken as the larger of a
    power law lambda_i ~ i^-a fitted to the Ritz values ``theta`` (descending)
    over the q indices below r and extrapolated to k + 1 (spectra that flatten
    further down make this err fast), and of what the last step measured,
    ``worst / previous`` (``previous``: the worst residual one step earlier at
    the same r, else None; a step that did not shrink it is a transient, e.g.
    fresh guard vectors, and is not read as a rate). The estimate exists after
    a warm start's first step, so a spectrum too flat for the block method is
    caught there. csrc/eigensolver.cu runs the same rule (tests/csrc compare the two).
    """
    rate = 0.0
    q = min(k + 1 - r, r - 1)
    if q >= 1 and theta[r - 1] > 0.0:
        decay = math.log(float(theta[r - 1 - q]) / float(theta[r - 1])) / math.log(r / (r - q))
        rate = (r / (k + 1)) ** max(decay, 0.0)
    if previous is not None and 0.0 < worst < previous:
        rate = max(rate, worst / previous)
    if rate >= 1.0:
        return math.inf
    if rate <= 0.0 or worst <= tol:
        return 1.0
    return max(1.0, math.log(tol / worst) / math.log(rate))


@ieee_fp32_matmul()
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
        p = warm_oversample(k0, oversample)
        V = orthonormalize(init.to(dtype))
        GV = G @ V
        R = GV - V @ (V.T @ GV)
        keep = torch.topk(torch.linalg.vector_norm(R, dim=0), min(p, k0)).indices
        topup = max(0, min(p, m - k0) - keep.numel())
        guards = [R[:, keep], random_columns(topup)]
        X = torch.cat([V, *guards], dim=1)[:, :m]
    else:
        k0 = min(m, COLD_BLOCK)
        X = random_columns(k0)
        p = oversample if oversample is not None else COLD_OVERSAMPLE
    X = orthonormalize(X)
    # The block carries p guard vectors past the previous (or expected) rank;
    # pairs are accepted while at least min(p, 8) remain past the current r,
    # so a warm start absorbs a rank that grew by a few without growing the block.
    min_guards = min(p, COLD_OVERSAMPLE)
    spent = 0.0 if init is None else iteration_cost(m, k0)  # the warm set-up
    previous = None  # worst relative residual of the leading r pairs, last iteration
    previous_r = None
    last_energy = None  # sum of the Ritz values, last iteration (while r is unknown)
    steps_at_k = 0
    for iteration in range(1, max_iter + 1):
        k = X.shape[1]
        spent += iteration_cost(m, k)
        if cost_budget is not None and spent > cost_budget:
            return None
        theta, X, Y, residual = rayleigh_ritz(G, X)
        r = select_rank(theta, trace, eta, complete=(k == m))
        if r is not None and (r + min_guards <= k or k == m):
            worst = float((residual[:r] / theta[0]).max())
            if worst <= tol:
                return Eigenpairs(theta[:r].clone(), X[:, :r].contiguous(), "block", iteration, k)
            if cost_budget is not None:
                # Give up as soon as the convergence rate says the block cannot
                # reach tol within the budget (flat spectra: dense is cheaper).
                last = previous if previous_r == r else None
                needed = iterations_to_converge(theta.tolist(), worst, last, r, k, tol)
                if spent + needed * iteration_cost(m, k) > cost_budget:
                    return None
            previous, previous_r = worst, r
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


@dataclass(frozen=True)
class AutoPlan:
    """What ``method="auto"`` runs: ``dense`` at once, or ``block`` within ``budget``
    flops and ``max_block`` columns, falling back to dense beyond either."""

    method: str
    budget: float | None = None
    max_block: int | None = None


def plan_auto(G: torch.Tensor, trace: float, *, init_columns: int | None = None,
              oversample: int | None = None) -> AutoPlan:
    """The auto rules, for the torch twin and the CUDA wrapper alike.

    Dense for small m, for warm starts whose first step alone would cost more
    than ``WARM_TRIAL_SHARE`` of a dense solve or whose block passes m / 8
    columns, and for cold starts on flat spectra (:func:`too_flat_for_block`);
    otherwise block, within a dense solve's cost (warm) or half of it (cold).
    """
    m = G.shape[0]
    if m <= 64:
        return AutoPlan("dense")
    max_block = auto_block_limit(m)
    if init_columns is not None:
        k = init_columns + min(warm_oversample(init_columns, oversample), m - init_columns)
        trial = iteration_cost(m, init_columns) + iteration_cost(m, k)
        if k > max_block or trial > WARM_TRIAL_SHARE * dense_cost(m):
            return AutoPlan("dense")
        return AutoPlan("block", dense_cost(m), max_block)
    if too_flat_for_block(G, trace):
        return AutoPlan("dense")
    return AutoPlan("block", COLD_BUDGET_SHARE * dense_cost(m), max_block)


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

    G is m x m, float32 or float64; ``trace`` > 0 is its trace; ``eta`` in (0, 1].
    ``init`` (m x k, orthonormal columns) warm-starts the block method.
    """
    trace, eta, tol = check_eig_args(G, trace, eta, method=method, methods=METHODS, init=init, tol=tol,
                                     max_iter=max_iter)
    if method == "dense":
        return dense_eigenpairs(G, trace, eta)
    if method == "block":
        return block_eigenpairs(G, trace, eta, init=init, tol=tol, max_iter=max_iter)
    plan = plan_auto(G, trace, init_columns=None if init is None else init.shape[1])
    if plan.method == "dense":
        return dense_eigenpairs(G, trace, eta)
    result = block_eigenpairs(
        G, trace, eta, init=init, tol=tol, max_iter=max_iter, cost_budget=plan.budget, max_block=plan.max_block
    )
    return dense_eigenpairs(G, trace, eta) if result is None else result
