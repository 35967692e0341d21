"""The torch eigensolver: rank rule, dense vs block, warm start, growth, fallback, errors.

Eigen-results are judged by eigenvalues, residuals ||G u - lambda u||, and
orthogonality, never by eigenvector entries.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import sphere_fast.eigensolver as eigensolver
from sphere_fast.accuracy import ORTHO_TOL, solver_bound
from sphere_fast.eigensolver import (
    DEFAULT_TOL,
    WARM_TRIAL_SHARE,
    AutoPlan,
    ConvergenceError,
    block_eigenpairs,
    dense_cost,
    dense_eigenpairs,
    iteration_cost,
    iterations_to_converge,
    plan_auto,
    select_rank,
    top_eigenpairs,
    warm_oversample,
)


def psd_with_spectrum(eigs, seed=0, dtype=torch.float64):
    eigs = torch.as_tensor(eigs, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(eigs.numel(), eigs.numel(), generator=g, dtype=torch.float64))
    return ((Q * eigs) @ Q.T).to(dtype), eigs


def power_law(m, exponent):
    return torch.arange(1, m + 1, dtype=torch.float64).pow(-exponent)


def reference_rank(true_eigs, eta):
    """r by the reference's rule on the float64 spectrum, by hand (select_rank is code under test); the
    cases are clear cuts, so the accuracy contract's ambiguous-cut slack never applies."""
    desc = true_eigs.double().sort(descending=True).values
    cum, total = torch.cumsum(desc, 0), float(desc.sum())
    assert float((cum - eta * total).abs().min()) > 1e-6 * total, "an ambiguous cut: pick another eta"
    return min(int((cum / total <= eta).sum()) + 1, desc.numel())


def assert_eigenpairs(G, pairs, true_eigs, eta, tol=None):
    """Rank, residuals, eigenvalues and orthogonality of a solve against what the solver promises (tol: the
    block method's, default the solver's own)."""
    tol = DEFAULT_TOL[G.dtype] if tol is None else tol
    m = G.shape[0]
    G64 = G.double()  # the matrix that was solved, exactly
    V = pairs.vectors.double()
    r = V.shape[1]
    assert V.shape[0] == m and pairs.vectors.dtype == G.dtype
    assert r == reference_rank(true_eigs, eta)
    theta1 = float(pairs.values[0])
    bound = solver_bound(pairs, G, tol) * theta1
    if pairs.method == "block":
        # The block method accepts on residuals of its working-precision product fl(G V); a length-m dot
        # rounds by about sqrt(m) eps of sum |G_ij v_j| (probabilistic bound), <= sqrt(m) eps ||G||_F per column.
        bound += math.sqrt(m) * torch.finfo(G.dtype).eps * float(torch.linalg.matrix_norm(G64))
    residual = torch.linalg.vector_norm(G64 @ V - V * pairs.values, dim=0)
    assert float(residual.max()) <= bound, float(residual.max()) / theta1
    ortho = (V.T @ V - torch.eye(r, dtype=torch.float64)).abs()
    assert float(ortho.max()) <= ORTHO_TOL[G.dtype]
    # Each value lies within residual / ||v|| of an eigenvalue of G (symmetric Bauer-Fike); it must be the
    # i-th one (fp64 eigvalsh of G, backward error <= m eps64 ||G||).
    exact = torch.linalg.eigvalsh(G64).flip(0)[:r]
    oracle_err = m * torch.finfo(torch.float64).eps * float(torch.linalg.matrix_norm(G64, ord=2))
    norms = torch.sqrt(1 - ortho.diagonal())
    assert bool(((pairs.values - exact).abs() <= residual / norms + oracle_err).all())


@pytest.mark.parametrize(
    "vals, eta, expected",
    [
        ([4.0, 3.0, 2.0, 1.0], 0.5, 2),  # 0.4 <= 0.5 < 0.7
        ([4.0, 3.0, 2.0, 1.0], 0.4, 2),  # cumsum/total <= eta counts the tie: reference gives 2
        ([4.0, 3.0, 2.0, 1.0], 0.01, 1),
        ([4.0, 3.0, 2.0, 1.0], 1.0, 4),
        ([5.0, 5.0, 0.0, 0.0], 1.0, 2),  # stops at the numerical rank
        ([2.0, 0.0], 1.0, 1),
    ],
)
def test_select_rank_rule(vals, eta, expected):
    vals = torch.tensor(vals, dtype=torch.float64)
    assert select_rank(vals, float(vals.sum()), eta, complete=True) == expected


def test_select_rank_needs_more_values_when_incomplete():
    vals = torch.tensor([4.0, 3.0], dtype=torch.float64)
    assert select_rank(vals, 10.0, 0.8, complete=False) is None
    assert select_rank(vals, 10.0, 0.5, complete=False) == 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("eta", [0.1, 0.5, 0.9])
def test_block_matches_dense(dtype, eta):
    G, eigs = psd_with_spectrum(power_law(150, 1.2), seed=1, dtype=dtype)
    trace = float(eigs.sum())
    dense = dense_eigenpairs(G, trace, eta)
    block = block_eigenpairs(G, trace, eta)
    assert block.method == "block" and dense.method == "dense"
    assert_eigenpairs(G, block, eigs, eta)
    assert_eigenpairs(G, dense, eigs, eta)


def test_block_grows_until_the_energy_is_reached():
    G, eigs = psd_with_spectrum(power_law(300, 0.5), seed=2)
    pairs = block_eigenpairs(G, float(eigs.sum()), 0.6)
    assert pairs.block_size > 32  # started at 32 columns, had to grow
    assert_eigenpairs(G, pairs, eigs, 0.6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_warm_start_converges_in_fewer_iterations(dtype):
    G, eigs = psd_with_spectrum(power_law(200, 1.5), seed=3)
    g = torch.Generator().manual_seed(4)
    E = torch.randn(200, 2, generator=g, dtype=torch.float64)
    G2 = G + 1e-4 * E @ E.T  # a small low-rank change, as one editing batch makes
    eigs2 = torch.linalg.eigvalsh(G2)
    G, G2 = G.to(dtype), G2.to(dtype)
    first = block_eigenpairs(G, float(eigs.sum()), 0.5)
    cold = block_eigenpairs(G2, float(eigs2.sum()), 0.5)
    warm = block_eigenpairs(G2, float(eigs2.sum()), 0.5, init=first.vectors)
    assert warm.iterations < cold.iterations
    assert_eigenpairs(G2, warm, eigs2, 0.5)


def test_auto_falls_back_to_dense_on_flat_spectra():
    G, eigs = psd_with_spectrum(torch.linspace(1.0, 0.9, 200), seed=5)
    pairs = top_eigenpairs(G, float(eigs.sum()), 0.5)
    assert pairs.method == "dense"
    assert_eigenpairs(G, pairs, eigs, 0.5)


def test_auto_uses_block_on_steep_spectra():
    G, eigs = psd_with_spectrum(power_law(400, 2.0), seed=6)
    pairs = top_eigenpairs(G, float(eigs.sum()), 0.5)
    assert pairs.method == "block"
    assert_eigenpairs(G, pairs, eigs, 0.5)


def test_iteration_cap_raises():
    G, eigs = psd_with_spectrum(torch.linspace(1.0, 0.99, 100), seed=7)
    with pytest.raises(ConvergenceError, match="did not converge in 2 iterations"):
        block_eigenpairs(G, float(eigs.sum()), 0.5, max_iter=2)


def test_non_finite_input_raises():
    G = torch.eye(5)
    G[1, 1] = float("nan")
    with pytest.raises(ValueError, match="G contains NaN"):
        top_eigenpairs(G, 5.0, 0.5)


def test_bad_method_raises():
    with pytest.raises(ValueError, match="method"):
        top_eigenpairs(torch.eye(3), 3.0, 0.5, method="lanczos")


_G6, _EIGS6 = psd_with_spectrum([6.0, 5.0, 4.0, 3.0, 2.0, 1.0], seed=11)
_TRACE6 = float(_EIGS6.sum())


def _nan_at(x, index):
    x = x.clone()
    x[index] = float("nan")
    return x


# (keyword changes to a valid call, the exception, the start of its message); the NaN cases
# are the torch twin's alone: the CUDA twin scans G and init on the device.
BAD_EIG_ARGS = [
    ({"eta": 0.0}, ValueError, "eta must be in (0, 1]"),
    ({"eta": -1.0}, ValueError, "eta must be in (0, 1]"),
    ({"eta": 2.0}, ValueError, "eta must be in (0, 1]"),
    ({"eta": float("nan")}, ValueError, "eta must be finite"),
    ({"eta": "0.5"}, TypeError, "eta must be a real number"),
    ({"trace": float("nan")}, ValueError, "trace must be finite"),
    ({"trace": 0.0}, ValueError, "trace must be > 0"),
    ({"trace": -1.0}, ValueError, "trace must be > 0"),
    ({"G": _G6[:, :5]}, ValueError, "G must be square"),
    ({"G": _G6[0]}, ValueError, "G must be 2-D"),
    ({"G": torch.empty(0, 0)}, ValueError, "G must not be empty"),
    ({"G": _G6.half()}, TypeError, "G must be float32 or float64"),
    ({"G": _G6.tolist()}, TypeError, "G must be a torch.Tensor"),
    ({"method": "lanczos"}, ValueError, "method must be one of"),
    ({"init": torch.eye(5, 2, dtype=torch.float64)}, ValueError, "init must have shape (m, k) with m = 6"),
    ({"init": torch.zeros(6, 7, dtype=torch.float64)}, ValueError, "init must have shape (m, k) with m = 6"),
    ({"init": torch.zeros(6, 0, dtype=torch.float64)}, ValueError, "init must not be empty"),
    ({"init": torch.zeros(6, dtype=torch.float64)}, ValueError, "init must be 2-D"),
    ({"init": torch.zeros(6, 2, dtype=torch.int64)}, TypeError, "init must be"),
    ({"init": torch.empty(6, 2, device="meta")}, ValueError,
     "tensors must be on one device, got G on cpu, init on meta"),
    ({"tol": 0.0}, ValueError, "tol must be > 0"),
    ({"tol": float("inf")}, ValueError, "tol must be finite"),
    ({"max_iter": 0}, ValueError, "max_iter must be a positive integer"),
    ({"max_iter": 2.5}, ValueError, "max_iter must be a positive integer"),
]
BAD_EIG_VALUES = [
    ({"G": _nan_at(_G6, (2, 3))}, ValueError, "G contains NaN or Inf"),
    ({"init": _nan_at(torch.eye(6, 2, dtype=torch.float64), (4, 1))}, ValueError, "init contains NaN or Inf"),
]


def _call_with(top, change: dict, method: str):
    args = {"G": _G6, "trace": _TRACE6, "eta": 0.5, "method": method, **change}
    return top(args.pop("G"), args.pop("trace"), args.pop("eta"), **args)


@pytest.mark.parametrize("method", ["auto", "dense", "block"])
@pytest.mark.parametrize("change, exc, message", BAD_EIG_ARGS + BAD_EIG_VALUES,
                         ids=[m for _, _, m in BAD_EIG_ARGS + BAD_EIG_VALUES])
def test_each_bad_argument_raises_naming_it(change, exc, message, method):
    """The torch twin refuses what the CUDA twin refuses, with the same message; none is read as a valid
    request (eta = 0 or a NaN trace used to give rank 1, eta = 2 every eigenpair)."""
    with pytest.raises(exc, match="^" + re.escape(message)):
        _call_with(top_eigenpairs, change, method)


@pytest.mark.parametrize("change, exc, message", BAD_EIG_ARGS, ids=[m for _, _, m in BAD_EIG_ARGS])
def test_the_cuda_twin_checks_its_arguments_alike(change, exc, message):
    """The CUDA twin runs the same check (sphere_fast._validation.check_eig_args) before it looks at the
    device or loads the extension, so on a CPU tensor it raises the torch twin's message."""
    from sphere_fast import _cuda

    with pytest.raises(exc, match="^" + re.escape(message)):
        _call_with(_cuda.top_eigenpairs, change, "auto")


def test_the_cuda_twin_refuses_a_cpu_matrix_and_bad_seeds():
    from sphere_fast import _cuda

    with pytest.raises(ValueError, match="^G must be a CUDA tensor, got a tensor on cpu"):
        _cuda.top_eigenpairs(_G6, _TRACE6, 0.5)
    with pytest.raises(ValueError, match=re.escape("seed must be an int in [0, 2**64), got -1")):
        _cuda.top_eigenpairs(_G6, _TRACE6, 0.5, seed=-1)
    with pytest.raises(ValueError, match=re.escape("oversample must be an int >= 0 or None, got True")):
        _cuda.top_eigenpairs(_G6, _TRACE6, 0.5, oversample=True)


def test_valid_arguments_still_solve():
    init = dense_eigenpairs(_G6, _TRACE6, 0.5).vectors
    for method in ("auto", "dense", "block"):
        pairs = top_eigenpairs(_G6, _TRACE6, 0.5, method=method, init=init.float(), tol=1e-10, max_iter=50)
        assert_eigenpairs(_G6, pairs, _EIGS6, 0.5, 1e-10)


# -- the auto rules (shared with the CUDA extension) -------------------------------------


def test_plan_auto_rules():
    steep, _ = psd_with_spectrum(power_law(1024, 2.0), seed=8, dtype=torch.float32)
    flat, _ = psd_with_spectrum(torch.linspace(1.0, 0.9, 1024), seed=9, dtype=torch.float32)
    small, _ = psd_with_spectrum(power_law(64, 2.0), seed=10, dtype=torch.float32)
    trace = lambda G: float(G.double().trace())  # noqa: E731
    m = 1024
    assert plan_auto(small, trace(small)) == AutoPlan("dense")
    assert plan_auto(flat, trace(flat)) == AutoPlan("dense")  # effective rank >> m / 8
    assert plan_auto(steep, trace(steep)) == AutoPlan("block", 0.5 * dense_cost(m), m // 8)
    admitted = []
    for k0 in (1, 8, 24, 40, 64, 100, 127, 200, 512):
        plan = plan_auto(steep, trace(steep), init_columns=k0)
        k = k0 + warm_oversample(k0)
        if plan.method == "block":
            admitted.append(k0)
            assert plan == AutoPlan("block", dense_cost(m), m // 8)
            # A warm start that gives up after its first step costs at most this share more than dense.
            assert iteration_cost(m, k0) + iteration_cost(m, k) <= WARM_TRIAL_SHARE * dense_cost(m)
            assert k <= m // 8
    assert admitted[:2] == [1, 8] and 200 not in admitted


def test_iterations_to_converge_reads_the_rate_from_ritz_values_and_residuals():
    r, k, tol = 10, 30, 1e-8
    theta = power_law(40, 2.0).tolist()  # lambda_i = i^-2: the rate of pair r is (r / (k + 1))^2
    rate = (r / (k + 1)) ** 2
    assert iterations_to_converge(theta, 1e-3, None, r, k, tol) == pytest.approx(math.log(1e-5) / math.log(rate))
    # A measured step slower than the spectrum says wins; one that did not shrink the residual is ignored.
    assert iterations_to_converge(theta, 1e-3, 2e-3, r, k, tol) == pytest.approx(math.log(1e-5) / math.log(0.5))
    assert iterations_to_converge(theta, 1e-3, 5e-4, r, k, tol) == pytest.approx(math.log(1e-5) / math.log(rate))
    assert iterations_to_converge([1.0] * 40, 1e-3, None, r, k, tol) == math.inf  # flat at the cut
    assert iterations_to_converge(theta, 1e-9, None, r, k, tol) == 1.0
    assert iterations_to_converge(theta[:1], 1e-3, None, 1, k, tol) == 1.0  # r = 1: nothing to fit


def _count_block_steps(monkeypatch):
    steps = []
    rayleigh_ritz = eigensolver.rayleigh_ritz

    def counted(G, X):
        steps.append(X.shape[1])
        return rayleigh_ritz(G, X)

    monkeypatch.setattr(eigensolver, "rayleigh_ritz", counted)
    return steps


def _edited(G, size, seed):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(G.shape[0], 4, generator=g, dtype=torch.float64)
    G2 = G.double() + size * (E @ E.T) / G.shape[0]
    return G2.to(G.dtype), torch.linalg.eigvalsh(G2)


def test_warm_start_gives_up_after_its_first_step_when_the_cut_is_flat(monkeypatch):
    """A few large eigenvalues, then a shelf that the cut falls into: subspace
    iteration there converges at about 0.99 per step, so the refit goes dense
    after one block step instead of spending a dense solve's budget first."""
    eigs = torch.cat([torch.tensor([100.0, 80.0, 60.0, 50.0]), torch.linspace(20.0, 18.0, 56),
                      torch.full((964,), 0.01)])
    G, _ = psd_with_spectrum(eigs, seed=11, dtype=torch.float32)
    first = dense_eigenpairs(G, float(eigs.sum()), 0.5)
    G2, eigs2 = _edited(G, 0.5, seed=12)
    assert plan_auto(G2, float(eigs2.sum()), init_columns=first.vectors.shape[1]).method == "block"
    steps = _count_block_steps(monkeypatch)
    pairs = top_eigenpairs(G2, float(eigs2.sum()), 0.5, init=first.vectors)
    assert pairs.method == "dense" and len(steps) == 1
    assert_eigenpairs(G2, pairs, eigs2, 0.5)


def test_warm_start_on_a_steep_spectrum_stays_block_and_beats_a_cold_start(monkeypatch):
    G, eigs = psd_with_spectrum(power_law(600, 1.5), seed=13, dtype=torch.float32)
    first = top_eigenpairs(G, float(eigs.sum()), 0.5)
    G2, eigs2 = _edited(G, 1e-3, seed=14)
    steps = _count_block_steps(monkeypatch)
    warm = top_eigenpairs(G2, float(eigs2.sum()), 0.5, init=first.vectors)
    warm_steps = len(steps)
    cold = top_eigenpairs(G2, float(eigs2.sum()), 0.5)
    assert warm.method == cold.method == "block"
    assert warm_steps < len(steps) - warm_steps  # fewer block steps than the cold solve took
    assert_eigenpairs(G2, warm, eigs2, 0.5)
