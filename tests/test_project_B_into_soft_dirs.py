"""The drop-in names: ``project_B_into_soft_dirs`` called exactly as the public SPHERE code calls it,
and ``sparse_projection`` with either spelling of the ratio, against the float64 reference."""
from __future__ import annotations

import pytest
import torch

import sphere_fast
from sphere_fast import project_B_into_soft_dirs, sparse_projection
from sphere_fast.accuracy import TOL_GAPPED, TOL_OVER_GAP
from sphere_fast.reference import oracle, sparse_projection_reference


def weight_and_update(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # A spectrum with a clear gap at the cut, so fp32 and fp64 agree on U's span.
    scales = torch.cat([torch.full((6,), 5.0), torch.full((117,), 0.5)])
    basis, _ = torch.linalg.qr(torch.randn(123, 123, generator=gen, dtype=torch.float64))
    w = torch.randn(77, 123, generator=gen, dtype=torch.float64) @ (basis * scales) @ basis.T
    upd_matrix = torch.randn(77, 123, generator=gen, dtype=torch.float64)
    return w.float(), upd_matrix


def check_against_float64(A, B, result, eta, alpha):
    """The accuracy contract (docs/design.md) against the reference algorithm run in float64."""
    B_proj, P_soft, U = result
    ref_B, ref_P, ref_U = sparse_projection_reference(A.double(), B.double(), eta, alpha)
    assert U.shape == ref_U.shape
    r = U.shape[1]
    g = oracle(A.double(), eta).gap(r)
    assert g >= 1e-4  # the weight is built with a clear gap: the gapped bound applies
    assert float((B_proj.double() - ref_B).norm() / B.double().norm()) <= TOL_GAPPED[torch.float32]
    # Held for any B, the contract's 1e-6 / g bounds how far rounding moves span(U) (B = x y^T sees
    # ||y^T (P - P64)||): ||U U^T - U64 U64^T||_2 <= 1e-6 / g, plus U's own departure from orthonormality.
    U64 = U.double()
    ortho = float(torch.linalg.matrix_norm(U64.T @ U64 - torch.eye(r, dtype=torch.float64), ord=2))
    subspace = TOL_OVER_GAP[torch.float32] / g + ortho
    assert float(torch.linalg.matrix_norm(U64 @ U64.T - ref_U @ ref_U.T, ord=2)) <= subspace
    # P_soft = I - alpha U U^T formed in fp32: each entry rounds by <= (r + 1) u alpha (|U| |U|^T)_ij + u |P_ij|,
    # spectrally <= (r + 2) u (1 + alpha r) (||U||_F^2 = r).
    forming = (r + 2) * 2.0**-24 * (1 + alpha * r)
    assert float(torch.linalg.matrix_norm(P_soft.double() - ref_P, ord=2)) <= alpha * subspace + forming
    # Ascending eigenvalue order, as the public code's eigvecs[:, -r:].
    rayleigh = ((A.double() / A.double().norm(dim=1, keepdim=True)) @ U.double()).norm(dim=0)
    assert bool((rayleigh[1:] >= rayleigh[:-1] - 1e-6).all())


def test_the_public_codes_call():
    """Written as in the public SPHERE code's FT and MEMIT paths: a parameter, a float update, keywords."""
    weight, update = weight_and_update()
    w = torch.nn.Parameter(weight.clone())
    upd_matrix = update
    beta_hse, alpha = 0.5, 0.8
    with torch.no_grad():
        upd_matrix_proj, P_soft, U = project_B_into_soft_dirs(w, upd_matrix.float(), energy_ratio=beta_hse, alpha = alpha)  # noqa: E251,E501
        w[...] += upd_matrix_proj.float()
    check_against_float64(weight, update.float(), (upd_matrix_proj, P_soft, U), beta_hse, alpha)
    assert torch.equal(w.detach(), weight + upd_matrix_proj.float())


def test_both_names_with_both_spellings_agree():
    A, B = weight_and_update(1)
    B = B.float()
    expected = sparse_projection(A, B, 0.5, 0.8)
    for result in (sparse_projection(A, B, eta=0.5, alpha=0.8), sparse_projection(A, B, energy_ratio=0.5, alpha=0.8),
                   project_B_into_soft_dirs(A, B, energy_ratio=0.5, alpha=0.8),
                   project_B_into_soft_dirs(A, B, eta=0.5, alpha=0.8), project_B_into_soft_dirs(A, B, 0.5, 0.8)):
        for got, want in zip(result, expected):
            assert torch.equal(got, want)
    check_against_float64(A, B, expected, 0.5, 0.8)
    # Each name keeps its source's defaults: the seed README's 0.5 / 0.5, the public code's 0.8 / 0.8.
    for got, want in zip(sparse_projection(A, B), sparse_projection(A, B, 0.5, 0.5)):
        assert torch.equal(got, want)
    for got, want in zip(project_B_into_soft_dirs(A, B), sparse_projection(A, B, 0.8, 0.8)):
        assert torch.equal(got, want)
    assert "project_B_into_soft_dirs" in sphere_fast.__all__


def test_the_ratio_given_twice_is_an_error():
    A, B = weight_and_update(2)
    with pytest.raises(TypeError, match="eta or as energy_ratio, not both"):
        sparse_projection(A, B.float(), 0.5, energy_ratio=0.5)
    with pytest.raises(TypeError, match="project_B_into_soft_dirs: .* not both"):
        project_B_into_soft_dirs(A, B.float(), energy_ratio=0.5, eta=0.5)
