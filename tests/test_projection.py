"""The drop-in sparse_projection and SphereProjector against the float64 oracle.

Every case checks the accuracy contract (docs/design.md, "Accuracy contract"):
the rank (unless the cut is ambiguous), ||B_proj - B_proj_fp64|| / ||B||
(<= 1e-5 for fp32 when the relative eigengap g >= 1e-4 and B is Gaussian,
<= 1e-6 / g in any case; for bf16/fp16 that plus the output's unit roundoff, 2^-8 / 2^-11),
U^T U = I, captured energy >= eta * trace, and ||B_proj|| <= ||B||.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from sphere_fast import (
    SphereProjector,
    hyperspherical_energy,
    normalized_gram,
    project_B_into_soft_dirs,
    sparse_projection,
)
from sphere_fast.accuracy import ORTHO_TOL, OUTPUT_ROUNDING, TOL_GAPPED, TOL_OVER_GAP
from sphere_fast.gram import work_dtype
import sphere_fast.projector as projector_module
from sphere_fast.projector import project_work
from sphere_fast.reference import oracle, sparse_projection_reference


def hadamard(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H / math.sqrt(n)


def weight_with_spectrum(eigs, d: int, seed: int = 0) -> torch.Tensor:
    """W (n x d, n a power of two) whose normalised Gram has eigenvalues proportional to ``eigs``.

    A Hadamard left factor gives every row the same norm, so the row
    normalisation is a uniform scaling and leaves the spectrum's shape intact.
    """
    eigs = torch.as_tensor(eigs, dtype=torch.float64)
    n = eigs.numel()
    g = torch.Generator().manual_seed(seed)
    V, _ = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))
    return (hadamard(n) * eigs.sqrt()) @ V.T


def make_weight(kind: str, n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, d, generator=g, dtype=torch.float64)
    if kind == "steep":
        k = min(n, d)
        Q1, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
        Q2, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
        s = torch.arange(1, k + 1, dtype=torch.float64).pow(-1.5)
        return (Q1 * s) @ Q2.T + 1e-4 * torch.randn(n, d, generator=g, dtype=torch.float64)
    if kind == "duplicate_zero_rows":
        W = torch.randn(n, d, generator=g, dtype=torch.float64)
        W[1] = W[0]
        W[3] = 2.5 * W[2]
        W[5] = 0.0
        return W
    raise ValueError(kind)


def assert_contract(A, B, eta, alpha, B_proj, U, values=None, *, gaussian_B=True, rank_ambiguity_ok=True):
    """Check one result against the float64 oracle of the reference algorithm."""
    dtype = A.dtype
    orc = oracle(A.double(), eta)
    r = U.shape[1]
    acceptable = sorted(orc.acceptable_ranks(eta))
    assert r in acceptable, f"rank {r}, oracle {orc.rank}, acceptable {acceptable}"
    assert B_proj.dtype == B.dtype and B_proj.device == B.device and B_proj.shape == B.shape

    U64 = U.double().cpu()
    eye = torch.eye(r, dtype=torch.float64)
    ortho = ORTHO_TOL.get(U.dtype, 1e-5)
    assert float((U64.T @ U64 - eye).abs().max()) <= ortho

    # Captured energy: trace(U^T C U) in float64 against eta * trace (ambiguous cuts allowed).
    C = orc.eigenvectors @ torch.diag(orc.eigenvalues) @ orc.eigenvectors.T
    captured = float(torch.trace(U64.T @ C @ U64))
    assert captured >= (eta - 1e-6) * orc.trace - 1e-6 * orc.trace

    Bc = B.double().cpu()
    expected = orc.project(Bc, alpha, r)
    err = float((B_proj.double().cpu() - expected).norm() / Bc.norm())
    n, d = A.shape
    g = orc.gap(r)
    if r == d:
        g = 1.0  # U is a full basis: P = (1 - alpha) I, whatever the spectrum
    elif r == n:
        # Every eigenvector of the n x n Gram is kept, so no cut moves span(U): only the lift's rounding
        # does, amplified by (lambda_1 / lambda_r)^(1/2), i.e. the gap's square root.
        g = math.sqrt(g)
    work = torch.float64 if dtype == B.dtype == torch.float64 else torch.float32  # 16-bit work in fp32
    bound = TOL_OVER_GAP[work] / max(g, 1e-300)
    if gaussian_B and g >= 1e-4:
        bound = min(bound, TOL_GAPPED[work]) if work == torch.float64 else TOL_GAPPED[work]
    bound += OUTPUT_ROUNDING.get(B.dtype, 0.0)
    assert err <= bound, f"relative error {err:.3e} > bound {bound:.3e} (rank {r}, gap {orc.gap(r):.2e})"
    # P is a contraction for 0 <= alpha <= 1 (up to the output dtype's rounding).
    slack = {torch.float64: 1e-12, torch.float32: 1e-6, **OUTPUT_ROUNDING}[B.dtype]
    assert float(B_proj.double().norm()) <= float(Bc.norm()) * (1 + slack)


SHAPES = [(64, 200), (300, 100), (128, 128), (1, 50)]
ETAS = [0.01, 0.5, 0.99, 1.0]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("kind", ["gaussian", "steep"])
def test_contract_shapes_and_eta(shape, eta, kind, device):
    n, d = shape
    A = make_weight(kind, n, d, seed=n + d).float().to(device)
    B = torch.randn(37, d, generator=torch.Generator().manual_seed(1)).to(device)
    B_proj, P_soft, U = sparse_projection(A, B, eta, 0.5)
    assert_contract(A, B, eta, 0.5, B_proj, U)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_contract_alpha(alpha, device):
    A = make_weight("gaussian", 96, 160, seed=3).float().to(device)
    B = torch.randn(50, 160, generator=torch.Generator().manual_seed(4)).to(device)
    B_proj, P_soft, U = sparse_projection(A, B, 0.5, alpha)
    assert_contract(A, B, 0.5, alpha, B_proj, U)
    if alpha == 0.0:
        torch.testing.assert_close(B_proj, B, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_contract_dtypes(dtype, device):
    A = make_weight("gaussian", 80, 150, seed=5).to(device=device, dtype=dtype)
    B = torch.randn(40, 150, generator=torch.Generator().manual_seed(6)).to(device=device, dtype=dtype)
    B_proj, P_soft, U = sparse_projection(A, B, 0.5, 0.5)
    assert U.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_contract(A, B, 0.5, 0.5, B_proj, U)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_weight_is_lifted_a_block_of_columns_at_a_time(dtype, device, monkeypatch):
    # 7 columns per block over d = 150: 22 blocks, the last one ragged; each must land in its rows of U.
    monkeypatch.setattr(projector_module, "LIFT_BLOCK_BYTES", 80 * 4 * 7)
    A = make_weight("gaussian", 80, 150, seed=5).to(device=device, dtype=dtype)
    B = torch.randn(40, 150, generator=torch.Generator().manual_seed(6)).to(device=device, dtype=dtype)
    proj = SphereProjector.fit(A, 0.5, 0.5)
    assert_contract(A, B, 0.5, 0.5, proj.apply(B), proj.U)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak device memory needs CUDA")
def test_fitting_a_16_bit_weight_on_cuda_never_holds_an_fp32_copy_of_it(monkeypatch):
    monkeypatch.setattr(projector_module, "LIFT_BLOCK_BYTES", 2**20)
    W = make_weight("steep", 512, 8192, seed=3).to(device="cuda", dtype=torch.bfloat16)
    # One fit first: Triton's autotuner (its 256 MiB cache-flush buffer) and cuBLAS's workspace
    # allocate once per process, not per fit, and must not count.
    SphereProjector.fit(W, 0.5, 0.5)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    proj = SphereProjector.fit(W, 0.5, 0.5)
    torch.cuda.synchronize()
    assert proj.rank < 64  # U and its orthonormalisation stay small beside W
    assert torch.cuda.max_memory_allocated() - before < W.numel() * 4 // 2


def test_duplicate_and_zero_rows(device):
    A = make_weight("duplicate_zero_rows", 70, 120, seed=7).float().to(device)
    B = torch.randn(70, 120, generator=torch.Generator().manual_seed(8)).to(device)
    for eta in (0.5, 1.0):
        B_proj, _, U = sparse_projection(A, B, eta, 0.8)
        assert_contract(A, B, eta, 0.8, B_proj, U)


def test_transposed_noncontiguous_inputs(device):
    base = make_weight("gaussian", 150, 90, seed=9).float().to(device)
    A = base.T  # 90 x 150, not contiguous
    B = torch.randn(150, 60, generator=torch.Generator().manual_seed(10)).to(device).T
    assert not A.is_contiguous() and not B.is_contiguous()
    B_proj, _, U = sparse_projection(A, B, 0.5, 0.5)
    assert_contract(A, B, 0.5, 0.5, B_proj, U)
    # Contiguous copies take other BLAS paths: both results lie within the contract of the oracle.
    ref = sparse_projection(A.contiguous(), B.contiguous(), 0.5, 0.5)[0]
    assert float((B_proj - ref).norm() / B.norm()) <= 2 * TOL_GAPPED[torch.float32]


def test_flat_spectrum_degenerate_everywhere():
    # All eigenvalues equal: every cut is a tie (gap 0), any orthonormal U of the right rank is exact.
    A = weight_with_spectrum(torch.ones(32), 80).float()
    B = torch.randn(10, 80, generator=torch.Generator().manual_seed(11))
    B_proj, _, U = sparse_projection(A, B, 0.5, 0.5)
    assert_contract(A, B, 0.5, 0.5, B_proj, U)


def test_degenerate_cluster_at_the_cut(device):
    # Eigenvalues 8, 7, 6, then a triple cluster at 5 straddling the eta cut, then a tail.
    eigs = torch.tensor([8.0, 7.0, 6.0, 5.0, 5.0, 5.0] + [0.5] * 26)
    A = weight_with_spectrum(eigs, 100, seed=12).float().to(device)
    eta = float((eigs[:4].sum() + 0.01) / eigs.sum())  # the cut falls inside the cluster
    B = torch.randn(20, 100, generator=torch.Generator().manual_seed(13)).to(device)
    B_proj, _, U = sparse_projection(A, B, eta, 0.8)
    assert_contract(A, B, eta, 0.8, B_proj, U)


def test_cluster_near_cut_with_gap(device):
    # lambda_r - lambda_{r+1} = 1e-3 * lambda_1: a narrow but resolvable gap.
    eigs = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6010, 0.6000] + [0.05] * 26)
    A = weight_with_spectrum(eigs, 120, seed=14).float().to(device)
    eta = float(eigs[:5].sum() / eigs.sum()) - 1e-3
    B = torch.randn(30, 120, generator=torch.Generator().manual_seed(15)).to(device)
    B_proj, _, U = sparse_projection(A, B, eta, 0.5)
    assert U.shape[1] == 5
    assert_contract(A, B, eta, 0.5, B_proj, U)


def test_matches_fp32_reference_on_clear_cut(device):
    A = make_weight("steep", 64, 96, seed=16).float().to(device)
    B = torch.randn(12, 96, generator=torch.Generator().manual_seed(17)).to(device)
    ours = sparse_projection(A, B, 0.5, 0.8)
    ref = sparse_projection_reference(A, B, 0.5, 0.8)
    assert ours[2].shape == ref[2].shape
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-4, atol=1e-5)


def test_return_values_follow_the_reference_layout(capsys):
    A = make_weight("steep", 40, 70, seed=18).float()
    B = torch.randn(9, 70, generator=torch.Generator().manual_seed(19))
    B_proj, P_soft, U = sparse_projection(A, B, 0.5, 0.5)
    assert capsys.readouterr().out == ""
    assert P_soft.shape == (70, 70)
    torch.testing.assert_close(P_soft, torch.eye(70) - 0.5 * U @ U.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(B_proj, B @ P_soft.T, rtol=1e-5, atol=1e-6)
    # U's columns in ascending eigenvalue order, like eigh's eigvecs[:, -r:].
    C = oracle(A.double(), 0.5)
    Cmat = C.eigenvectors @ torch.diag(C.eigenvalues) @ C.eigenvectors.T
    rq = torch.einsum("dr,de,er->r", U.double(), Cmat, U.double())
    assert bool((rq[1:] >= rq[:-1]).all())


# -- SphereProjector ------------------------------------------------------------------


def test_projector_attributes_and_apply(device):
    W = make_weight("gaussian", 60, 110, seed=20).float().to(device)
    P = SphereProjector.fit(W, eta=0.5, alpha=0.8)
    assert P.U.shape == (110, P.rank) and P.eigenvalues.shape == (P.rank,)
    assert bool((P.eigenvalues[:-1] >= P.eigenvalues[1:]).all())
    assert P.eta == 0.5 and P.alpha == 0.8
    assert math.isclose(P.trace, oracle(W.double(), 0.5).trace, rel_tol=1e-12)
    assert float(P.eigenvalues.sum()) > 0.5 * P.trace
    B = torch.randn(25, 110, generator=torch.Generator().manual_seed(21)).to(device)
    assert_contract(W, B, 0.5, 0.8, P.apply(B), P.U)
    torch.testing.assert_close(P.projection_matrix(), torch.eye(110, device=device) - 0.8 * P.U @ P.U.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_apply_in_place(dtype, device):
    W0 = make_weight("gaussian", 48, 90, seed=22).to(device=device, dtype=dtype)
    P = SphereProjector.fit(W0, 0.5, 0.5)
    B = (0.01 * torch.randn(48, 90, generator=torch.Generator().manual_seed(23))).to(device=device, dtype=dtype)
    W = W0.clone()
    out = P.apply_(W, B)
    assert out is W and W.dtype == dtype
    if device.type == "cpu":  # the torch backend: exactly its twin's arithmetic
        expected = (W0.double() + project_work(B, P.U, P.alpha).double()).to(dtype)
        torch.testing.assert_close(W, expected, rtol=0, atol=0)
    # Any backend and summation order (the fused CUDA kernel sums (B U) U^T in its own): within
    # the rounding bound. Not ulps of the result, which are tiny where W0 and the update cancel.
    exact, bound = apply_bound(W0, B, P.U, P.alpha)
    assert bool(((W.double() - exact).abs() <= bound).all())


def apply_bound(W0: torch.Tensor, B: torch.Tensor, U: torch.Tensor, alpha: float):
    """``W0 + B - alpha (B U) U^T`` in float64, and how far any in-place apply may round from it.

    The work runs in B's working precision (fp64 for fp64 B, else fp32), each operation off by at most
    eps relative (an ulp, which also
    covers adders that truncate, as tensor cores may). Summed in any order, B U (d terms) and
    (B U) U^T (r terms), then the scaling and two additions, stay within (Higham, Accuracy and
    Stability, 3.1 and 3.5, to first order)
        alpha ((d + r + 3) eps + s) (|B| |U|) |U|^T + 3 eps (|W0| + |B|),
    where s is the relative error of U split into two halves of a 16-bit B's dtype (u_B^2,
    csrc/project.cu). Rounding to W's dtype then adds half an ulp of the result (u_W |exact|, or a
    subnormal step).
    """
    eps = torch.finfo(work_dtype(B.dtype)).eps
    s = (torch.finfo(B.dtype).eps / 2) ** 2 if B.element_size() == 2 else 0.0
    d, r = U.shape
    B64, U64 = B.double(), U.double()
    exact = W0.double() + B64 - alpha * (B64 @ U64) @ U64.T
    products = (B64.abs() @ U64.abs()) @ U64.abs().T
    work = alpha * ((d + r + 3) * eps + s) * products + 3 * eps * (W0.double().abs() + B64.abs())
    w = torch.finfo(W0.dtype)
    return exact, w.eps / 2 * exact.abs() + (1 + w.eps) * work + w.tiny * w.eps


def test_apply_bound_rejects_tf32_products_and_a_double_rounding():
    """The bound is tight enough to fail the two likely slips of a fused kernel."""
    W0 = make_weight("gaussian", 48, 90, seed=22).float()
    U = SphereProjector.fit(W0, 0.5, 0.5).U
    B = 0.01 * torch.randn(48, 90, generator=torch.Generator().manual_seed(23))
    exact, bound = apply_bound(W0, B, U, 0.5)
    Bt, Ut = ((x.view(torch.int32) & ~0x1FFF).view(torch.float32) for x in (B, U))  # TF32: 10 mantissa bits
    tf32 = W0 + B - 0.5 * (Bt @ Ut) @ Ut.T
    assert not bool(((tf32.double() - exact).abs() <= bound).all())
    W16, B16 = W0.bfloat16(), B.bfloat16()
    exact, bound = apply_bound(W16, B16, U, 0.5)
    twice = W16 + (B16.float() - 0.5 * (B16.float() @ U) @ U.T).bfloat16()  # the update rounded first
    assert not bool(((twice.double() - exact).abs() <= bound).all())


def test_apply_in_place_into_a_wider_weight(device):
    """A float64 master weight with an fp32 projector and update keeps its low bits (one fp64 addition)."""
    W32 = make_weight("gaussian", 48, 90, seed=26).to(device=device, dtype=torch.float32)
    P = SphereProjector.fit(W32, 0.5, 0.5)
    W64 = W32.double() + 1e-12 * torch.randn(48, 90, generator=torch.Generator().manual_seed(27)).to(device).double()
    B = (1e-4 * torch.randn(48, 90, generator=torch.Generator().manual_seed(28))).to(device)
    W = W64.clone()
    P.apply_(W, B)
    # Rounding W to fp32 on the way would cost ~3e-8; an ulp of the update is below 1e-10.
    torch.testing.assert_close(W, W64 + P.apply(B).double(), rtol=0, atol=1e-9)


def test_torch_apply_computes_in_the_working_precision_of_the_update():
    """fp64 input is computed in fp64 (docs/design.md), as the CUDA backend does: an fp64 update
    projected by an fp32-fitted U is exact to fp64 rounding, an fp32 update by an fp64-fitted U
    is computed in fp32 and meets the fp32 contract."""
    W = make_weight("gaussian", 40, 96, seed=43)
    g = torch.Generator().manual_seed(44)
    alpha = 0.8
    P32 = SphereProjector.fit(W.float(), 0.5, alpha, backend="torch")
    B64 = torch.randn(7, 96, generator=g, dtype=torch.float64)
    U = P32.U.double()
    expected = B64 - alpha * (B64 @ U) @ U.T
    for out in (P32.apply(B64), P32.apply_(torch.zeros_like(B64), B64)):
        assert out.dtype == torch.float64
        assert float((out - expected).norm() / B64.norm()) <= 1e-14

    P64 = SphereProjector.fit(W, 0.5, alpha, backend="torch")
    B32 = torch.randn(7, 96, generator=g)
    assert_contract(W.float(), B32, 0.5, alpha, P64.apply(B32), P64.U)
    W32 = torch.zeros(7, 96)
    P64.apply_(W32, B32)
    assert_contract(W.float(), B32, 0.5, alpha, W32, P64.U)


def test_refit_after_low_rank_change_matches_cold_fit(device):
    g = torch.Generator().manual_seed(24)
    W = make_weight("steep", 128, 300, seed=25).float()
    W2 = W + 0.05 * W.std() * (torch.randn(128, 8, generator=g) @ torch.randn(8, 300, generator=g)) / math.sqrt(8)
    B = torch.randn(40, 300, generator=g)
    W, W2, B = W.to(device), W2.to(device), B.to(device)
    cold = SphereProjector.fit(W2, 0.5, 0.5)
    for method in ("auto", "block"):
        warm = SphereProjector.fit(W, 0.5, 0.5).refit(W2, method=method)
        assert warm.rank == cold.rank
        assert_contract(W2, B, 0.5, 0.5, warm.apply(B), warm.U)
        # Both lie within the fp32 contract of the oracle (the cut is gapped: assert_contract held them there).
        assert float((warm.apply(B) - cold.apply(B)).norm() / B.norm()) <= 2 * TOL_GAPPED[torch.float32]


def test_refit_rejects_a_different_shape():
    P = SphereProjector.fit(torch.randn(20, 30), 0.5, 0.5)
    with pytest.raises(ValueError, match=exactly("W_new must have the fitted shape (20, 30), got (21, 30)")):
        P.refit(torch.randn(21, 30))


def test_state_dict_round_trip_restores_projection_and_warm_start(device):
    g = torch.Generator().manual_seed(31)
    W = make_weight("steep", 64, 150, seed=32).float().to(device)
    P = SphereProjector.fit(W, 0.5, 0.4)
    state = P.state_dict()
    assert all(v.device.type == "cpu" for v in state.values() if isinstance(v, torch.Tensor))
    Q = SphereProjector.from_state_dict(state, device=device)
    assert Q.U.device == P.U.device
    B = torch.randn(7, 150, generator=g).to(device)
    assert (Q.rank, Q.eta, Q.alpha, Q.trace, Q.shape, Q.precision) == (P.rank, P.eta, P.alpha, P.trace, P.shape, "fp32")
    assert torch.equal(Q.apply(B), P.apply(B))
    W2 = W + 0.01 * W.std() * torch.randn(64, 150, generator=g).to(device)
    assert torch.equal(Q.refit(W2).U, P.refit(W2).U)  # the warm start came back too
    legacy = {k: v for k, v in state.items() if k != "precision"}  # checkpoints from before precision was kept
    assert SphereProjector.from_state_dict(legacy).precision == "fp32"
    with pytest.raises(ValueError, match=exactly("state is not a SphereProjector.state_dict(): missing ['basis']")):
        SphereProjector.from_state_dict({k: v for k, v in state.items() if k != "basis"})


def _corrupt(**changes):
    """A state of _fitted() (6 x 9: the 6 x 6 rows-side Gram) with ``changes`` applied (None removes a field)."""
    state = _fitted().state_dict()
    state.update(changes)
    return {k: v for k, v in state.items() if v is not None}


_U_MESSAGE = "state['U'] must have shape (d, r) with d = 9 and 1 <= r <= 6 for shape (6, 9), got "
CORRUPT_STATES = [
    (lambda: _corrupt(U=torch.zeros(5, 2)), ValueError, _U_MESSAGE + "(5, 2)"),
    (lambda: _corrupt(U=torch.zeros(9, 7)), ValueError, _U_MESSAGE + "(9, 7)"),
    (lambda: _corrupt(shape=[9, 6]), ValueError,
     "state['side'] must be 'cols' for shape (9, 6) (the Gram's smaller side), got 'rows'"),
    (lambda: _corrupt(shape=(6, 9, 1)), ValueError, "state['shape'] must be two positive ints (n, d), got (6, 9, 1)"),
    (lambda: _corrupt(shape=["6", 9]), ValueError, "state['shape'] must be two positive ints (n, d), got ['6', 9]"),
    (lambda: _corrupt(basis=torch.zeros(9, 2)), ValueError,
     "state['basis'] must have shape (6, 2) (the rows side's Gram size, U's rank), got (9, 2)"),
    (lambda: _corrupt(basis=torch.zeros(6, 3)), ValueError,
     "state['basis'] must have shape (6, 2) (the rows side's Gram size, U's rank), got (6, 3)"),
    (lambda: _corrupt(eigenvalues=torch.ones(4, dtype=torch.float64)), ValueError,
     "state['eigenvalues'] must have shape (2,) (U's rank), got (4,)"),
    (lambda: _corrupt(eigenvalues=[1.0, 0.5, 0.2]), TypeError,
     "state['eigenvalues'] must be a float32 or float64 tensor, got list"),
    (lambda: _corrupt(U=torch.zeros(9, 3, dtype=torch.int64)), TypeError,
     "state['U'] must be float32 or float64, got torch.int64"),
    (lambda: _corrupt(basis=torch.zeros(6, 2, dtype=torch.float64)), TypeError,
     "state['basis'] must have U's dtype torch.float32, got torch.float64"),
    (lambda: _corrupt(trace=-1.0), ValueError, "state['trace'] must be > 0, got -1.0"),
    (lambda: _corrupt(eta=2.0), ValueError, "state['eta'] must be in (0, 1], got 2.0"),
    (lambda: _corrupt(alpha=float("nan")), ValueError, "state['alpha'] must be finite, got nan"),
    (lambda: _corrupt(precision="fp8"), ValueError,
     "state['precision'] must be one of ('fp32', 'tf32', 'tf32x3', 'bf16'), got 'fp8'"),
    (lambda: _corrupt(basis=None), ValueError, "state is not a SphereProjector.state_dict(): missing ['basis']"),
    (lambda: [1, 2], TypeError, "state must be a dict (a SphereProjector.state_dict()), got list"),
]


@pytest.mark.parametrize("make, exc, message", CORRUPT_STATES, ids=[c[2] for c in CORRUPT_STATES])
def test_a_corrupted_state_is_refused_naming_the_field(make, exc, message):
    """Checked on load: a U of the wrong shape used to load and fail later, in apply, naming B."""
    assert _fitted().rank == 2  # what the messages above count on
    with pytest.raises(exc, match=exactly(message)):
        SphereProjector.from_state_dict(make())


def test_a_cols_side_state_loads():
    W = make_weight("gaussian", 12, 5, seed=50)
    P = SphereProjector.fit(W, 0.9, 0.5)
    state = P.state_dict()
    assert state["side"] == "cols" and state["basis"].shape == (5, P.rank)
    B = torch.randn(3, 5, generator=torch.Generator().manual_seed(51), dtype=torch.float64)
    assert torch.equal(SphereProjector.from_state_dict(state).apply(B), P.apply(B))


def test_refit_keeps_the_fitted_precision(monkeypatch):
    import sphere_fast.projector as projector_module

    seen = []
    real = projector_module._gram
    monkeypatch.setattr(projector_module, "_gram",
                        lambda W, *, backend, precision: seen.append(precision) or real(W, backend=backend,
                                                                                        precision=precision))
    W = make_weight("steep", 48, 100, seed=33).float()
    P = SphereProjector.fit(W, 0.5, 0.5, precision="tf32x3")
    P.refit(W * 1.01)
    assert seen == ["tf32x3", "tf32x3"] and P.precision == "tf32x3"


# -- bad input: clear errors naming the argument, nothing changed -------------------------

def exactly(message: str) -> str:
    """A pytest.raises pattern that matches the whole message and nothing else."""
    return "^" + re.escape(message) + "$"


_BACKENDS = "'auto', 'cuda', 'triton', 'torch'"
_DTYPES = "float16, bfloat16, float32 or float64"
# (the call, the exception, its whole message)
BAD_CASES = [
    (lambda: sparse_projection(torch.randn(5), torch.randn(3, 5)), ValueError, "A must be 2-D, got shape (5,)"),
    (lambda: sparse_projection(torch.randn(4, 5), torch.randn(3, 6)), ValueError,
     "B must have 5 columns (as many as A), got shape (3, 6)"),
    (lambda: sparse_projection(torch.randn(4, 5), torch.randn(3, 5), eta=0.0), ValueError,
     "eta must be in (0, 1], got 0.0"),
    (lambda: sparse_projection(torch.randn(4, 5), torch.randn(3, 5), eta=1.5), ValueError,
     "eta must be in (0, 1], got 1.5"),
    (lambda: sparse_projection(torch.randn(4, 5), torch.randn(3, 5), alpha=-0.1), ValueError,
     "alpha must be in [0, 1], got -0.1"),
    (lambda: sparse_projection(torch.randn(4, 5), torch.randn(3, 5), alpha=1.1), ValueError,
     "alpha must be in [0, 1], got 1.1"),
    (lambda: sparse_projection(torch.randn(4, 5), torch.randn(3, 5), eta="0.5"), TypeError,
     "eta must be a real number, got str"),
    (lambda: sparse_projection(torch.full((4, 5), float("nan")), torch.randn(3, 5)), ValueError,
     "A contains NaN or Inf"),
    (lambda: sparse_projection(torch.randn(4, 5), torch.tensor([[float("inf")] * 5])), ValueError,
     "B contains NaN or Inf"),
    (lambda: sparse_projection(torch.empty(0, 5), torch.randn(3, 5)), ValueError,
     "A must not be empty, got shape (0, 5)"),
    (lambda: sparse_projection(torch.ones(4, 5, dtype=torch.int64), torch.randn(3, 5)), TypeError,
     f"A must be {_DTYPES}, got torch.int64"),
    (lambda: sparse_projection([[1.0]], torch.randn(3, 5)), TypeError, "A must be a torch.Tensor, got list"),
    (lambda: SphereProjector.fit(torch.randn(4, 5), backend="nope"), ValueError,
     f"backend must be one of {_BACKENDS}; got 'nope'"),
    (lambda: sparse_projection(torch.randn(4, 5), torch.randn(3, 5), alpha=float("nan")), ValueError,
     "alpha must be finite, got nan"),
    (lambda: sparse_projection(torch.randn(4, 5), torch.randn(3, 5), alpha=float("inf")), ValueError,
     "alpha must be finite, got inf"),
    (lambda: SphereProjector.fit(torch.randn(4, 5), alpha=float("-inf")), ValueError, "alpha must be finite, got -inf"),
    (lambda: SphereProjector.fit(torch.randn(4, 5), alpha=float("nan")), ValueError, "alpha must be finite, got nan"),
    (lambda: sparse_projection(torch.randn(4, 5), torch.randn(3, 5), eta=True), TypeError,
     "eta must be a real number, got bool"),
    (lambda: SphereProjector.fit(torch.randn(4, 5), eta=torch.tensor([0.5, 0.6])), TypeError,
     "eta must be a real number, got a tensor of shape (2,)"),
    (lambda: SphereProjector.fit(torch.randn(4, 5), backend=3), ValueError,
     f"backend must be one of {_BACKENDS}; got 3"),
    (lambda: normalized_gram(torch.randn(4, 5), backend="Nope"), ValueError,
     f"backend must be one of {_BACKENDS}; got 'Nope'"),
    (lambda: hyperspherical_energy(torch.randn(4, 5), backend="nope"), ValueError,
     f"backend must be one of {_BACKENDS}; got 'nope'"),
]


@pytest.mark.parametrize("call, exc, message", BAD_CASES, ids=[c[2] for c in BAD_CASES])
def test_bad_input_raises_naming_the_argument(call, exc, message):
    with pytest.raises(exc, match=exactly(message)):
        call()


def _unchanged(P: SphereProjector, before: dict) -> bool:
    """P's state equals ``before`` (a state_dict taken earlier), tensors bit for bit."""
    after = P.state_dict()
    return before.keys() == after.keys() and all(
        torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k] for k, v in before.items())


@pytest.mark.parametrize("change, message", [
    ({"method": "lanczos"}, "method must be one of ('auto', 'dense', 'block'), got 'lanczos'"),
    ({"precision": "fp8"}, "precision must be one of ('fp32', 'tf32', 'tf32x3', 'bf16'), got 'fp8'"),
])
def test_fit_refuses_a_bad_method_or_precision_before_any_work(monkeypatch, change, message):
    import sphere_fast.projector as projector_module

    monkeypatch.setattr(projector_module, "_gram", lambda *a, **k: pytest.fail("the Gram was computed"))
    with pytest.raises(ValueError, match=exactly(message)):
        SphereProjector.fit(torch.randn(6, 9), 0.5, 0.5, **change)


def test_a_refit_with_a_bad_method_leaves_the_projector_as_it_was():
    P = _fitted()
    before = P.state_dict()
    with pytest.raises(ValueError, match=exactly("method must be one of ('auto', 'dense', 'block'), got 'bogus'")):
        P.refit(1.01 * torch.randn(6, 9), method="bogus")
    assert _unchanged(P, before)


def test_apply_in_place_refuses_a_bad_weight():
    P = _fitted()
    B = torch.randn(6, 9, generator=torch.Generator().manual_seed(49))
    W = torch.arange(54, dtype=torch.int32).reshape(6, 9)
    with pytest.raises(TypeError, match=exactly(f"W must be {_DTYPES}, got torch.int32")):
        P.apply_(W, B)
    assert torch.equal(W, torch.arange(54, dtype=torch.int32).reshape(6, 9))
    with pytest.raises(ValueError, match=exactly("tensors must be on one device, got W on meta, B on cpu")):
        P.apply_(torch.empty(6, 9, device="meta"), B)
    with pytest.raises(ValueError, match=exactly("W must be 2-D, got shape (54,)")):
        P.apply_(torch.zeros(54), B)


def _nan(shape, where=(1, 2)):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(45))
    x[where] = float("nan")
    return x


def _fitted():
    return SphereProjector.fit(torch.randn(6, 9, generator=torch.Generator().manual_seed(46)), 0.5, 0.5)


# Every public entry that takes a weight or an update, with NaN in one tensor argument.
NAN_CASES = [
    ("sparse_projection", "A", lambda: sparse_projection(_nan((6, 9)), torch.randn(3, 9))),
    ("sparse_projection", "B", lambda: sparse_projection(torch.randn(6, 9), _nan((3, 9)))),
    ("project_B_into_soft_dirs", "A", lambda: project_B_into_soft_dirs(_nan((6, 9)), torch.randn(3, 9))),
    ("project_B_into_soft_dirs", "B", lambda: project_B_into_soft_dirs(torch.randn(6, 9), _nan((3, 9)))),
    ("SphereProjector.fit", "W", lambda: SphereProjector.fit(_nan((6, 9)))),
    ("SphereProjector.refit", "W_new", lambda: _fitted().refit(_nan((6, 9)))),
    ("SphereProjector.apply", "B", lambda: _fitted().apply(_nan((4, 9)))),
    ("SphereProjector.apply_", "B", lambda: _fitted().apply_(torch.zeros(6, 9), _nan((6, 9)))),
    ("normalized_gram", "W", lambda: normalized_gram(_nan((6, 9)))),
    ("hyperspherical_energy", "W", lambda: hyperspherical_energy(_nan((6, 9)))),
]


@pytest.mark.parametrize("entry, name, call", NAN_CASES, ids=[f"{e}-{n}" for e, n, _ in NAN_CASES])
def test_each_public_entry_rejects_nan_naming_the_argument(entry, name, call):
    with pytest.raises(ValueError, match=f"^{name} contains NaN or Inf$"):
        call()


def test_apply_in_place_refuses_an_expanded_weight():
    P = _fitted()
    with pytest.raises(ValueError, match=r"^W must not be an expanded \(stride-0\) view"):
        P.apply_(torch.zeros(9).expand(6, 9), torch.randn(6, 9))


def test_a_refit_on_nan_leaves_the_projector_as_it_was():
    P = _fitted()
    before = P.state_dict()
    with pytest.raises(ValueError, match="^W_new contains NaN or Inf$"):
        P.refit(_nan((6, 9)))
    assert _unchanged(P, before)


SCAN_CASES = [
    ("sparse_projection", lambda W, B, P: sparse_projection(W, B), {"A": 1, "B": 1}),
    ("project_B_into_soft_dirs", lambda W, B, P: project_B_into_soft_dirs(W, B), {"A": 1, "B": 1}),
    ("SphereProjector.fit", lambda W, B, P: SphereProjector.fit(W), {"W": 1}),
    ("SphereProjector.refit", lambda W, B, P: P.refit(1.01 * W), {"W_new": 1}),
    ("SphereProjector.apply", lambda W, B, P: P.apply(B), {"B": 1}),
    ("SphereProjector.apply_", lambda W, B, P: P.apply_(W.clone(), B), {"B": 1}),
]


@pytest.mark.parametrize("entry, call, expected", SCAN_CASES, ids=[c[0] for c in SCAN_CASES])
def test_each_public_entry_scans_its_inputs_once(monkeypatch, entry, call, expected):
    """A NaN/Inf scan is a full read and a host sync: the public entry scans each input once and
    its internal calls do not repeat it (G, the Gram, is the eigensolver's own input)."""
    import sphere_fast._validation as validation

    W = torch.randn(16, 40, generator=torch.Generator().manual_seed(47))
    B = torch.randn(16, 40, generator=torch.Generator().manual_seed(48))
    P = SphereProjector.fit(W, 0.5, 0.5)
    scans = []
    real = validation.check_finite
    monkeypatch.setattr(validation, "check_finite", lambda x, name: scans.append(name) or real(x, name))
    call(W, B, P)
    assert {n: scans.count(n) for n in set(scans) - {"G", "init"}} == expected


def test_all_zero_weight_raises():
    message = "W has only zero rows: it has no principal directions to project out"
    with pytest.raises(ValueError, match=exactly(message)):
        SphereProjector.fit(torch.zeros(4, 6))


def test_tensors_on_different_devices_raise():
    meta = torch.empty(3, 5, device="meta")
    with pytest.raises(ValueError, match=exactly("tensors must be on one device, got A on cpu, B on meta")):
        sparse_projection(torch.randn(4, 5), meta)


@pytest.mark.parametrize(
    "make_B, match",
    [
        (lambda: torch.full((6, 9), float("nan")), "B contains NaN or Inf"),
        (lambda: torch.randn(6, 8), "B must have 9 columns (as many as the fitted weight), got shape (6, 8)"),
        (lambda: torch.randn(5, 9), "W and B must have the same shape, got W (6, 9) and B (5, 9)"),
        (lambda: torch.ones(6, 9, dtype=torch.int32), f"B must be {_DTYPES}, got torch.int32"),
    ],
)
def test_apply_in_place_leaves_W_untouched_on_error(make_B, match):
    W = torch.randn(6, 9)
    before = W.clone()
    P = SphereProjector.fit(W, 0.5, 0.5)
    with pytest.raises((ValueError, TypeError), match=exactly(match)):
        P.apply_(W, make_B())
    assert torch.equal(W, before)


# -- fp32 products ignore a caller's TF32 / reduced-precision setting ---------------------

_MATMULS = {torch.matmul, torch.mm, torch.addmm, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
            torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.addmm}


class Fp32MatmulPrecision(torch.overrides.TorchFunctionMode):
    """Records torch's fp32 matmul precision (CUDA, oneDNN) at every fp32 matrix product."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _MATMULS and any(isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args):
            self.seen.append((func.__name__, torch.backends.cuda.matmul.fp32_precision,
                              torch.backends.mkldnn.matmul.fp32_precision))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="needs torch >= 2.9")
@pytest.mark.parametrize("method", ["auto", "block"])
def test_fp32_products_run_in_ieee_fp32_whatever_the_caller_set(method):
    """set_float32_matmul_precision("medium") puts fp32 products on TF32 (CUDA; unit roundoff 2^-11
    per product) / bf16 (oneDNN; 2^-8), against the 1e-5 contract: the Gram, the eigensolver, the
    lift and the projection force IEEE fp32 for their own products and restore the caller's setting."""
    g = torch.Generator().manual_seed(31)
    W = make_weight("steep", 96, 240, seed=32).float()
    W2 = W + 1e-3 * torch.randn(96, 240, generator=g)
    B = torch.randn(12, 240, generator=g)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with Fp32MatmulPrecision() as record:
            P = SphereProjector.fit(W, 0.5, 0.5, method=method)
            P.refit(W2, method=method)
            P.apply(B)
            P.apply_(W2.clone(), W2 - W)
            sparse_projection(W2, B, 0.5, 0.5)
        # Read inside the same scope: the legacy setting is back, and reading it does not raise.
        assert torch.get_float32_matmul_precision() == "medium"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    names = {name for name, _, _ in record.seen}
    assert {"matmul", "__matmul__", "addmm"} & names, record.seen  # products were seen at all
    wrong = [entry for entry in record.seen if entry[1:] != ("ieee", "ieee")]
    assert not wrong, wrong
