"""The reference algorithm: SPHERE's ``sparse_projection`` as published, and its float64 oracle.

``sparse_projection_reference`` is transcribed from the SPHERE code README and
kept verbatim in its arithmetic (d x d Gram, full ``eigh``, dense P) so that
benchmarks and the CLI measure the real baseline; only the print is dropped.

:func:`oracle` runs the same algorithm in float64 and keeps the whole spectrum,
so tests and the GPU check can judge ambiguous cuts and eigengaps: it is the
arbiter of the accuracy contract (docs/design.md, "Accuracy contract"), whose
bounds are in :mod:`sphere_fast.accuracy`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def sparse_projection_reference(A, B, eta=0.5, alpha=0.5):
    A_hat = A / (A.norm(dim=1, keepdim=True) + 1e-8)
    C = (A_hat.T @ A_hat) / A_hat.size(0)
    eigvals, eigvecs = torch.linalg.eigh(C)
    cumsum = torch.cumsum(eigvals.flip(0), 0)
    total = eigvals.sum()
    r = (cumsum / total <= eta).sum().item() + 1
    U = eigvecs[:, -r:]
    P_soft = torch.eye(A.size(1), device=A.device, dtype=A.dtype) - alpha * (U @ U.T)
    B_proj = B @ P_soft.T
    return B_proj, P_soft, U


@dataclass
class Oracle:
    """The reference algorithm's result in float64, with the spectrum around it."""

    eigenvalues: torch.Tensor  # all d eigenvalues of C, descending, float64
    eigenvectors: torch.Tensor  # matching columns, float64
    trace: float
    rank: int

    def acceptable_ranks(self, eta: float, slack: float = 1e-6) -> set[int]:
        """r from the rule, plus every r at an ambiguous cut (the cumulative sum within slack * trace of eta)."""
        cum = torch.cumsum(self.eigenvalues, 0)
        ok = {self.rank}
        near = (cum - eta * self.trace).abs() <= slack * self.trace
        for k in torch.nonzero(near).flatten().tolist():
            ok.update({k + 1, k + 2})
        return ok

    def gap(self, r: int) -> float:
        """Relative eigengap at the cut, (lambda_r - lambda_{r+1}) / lambda_1."""
        ev = self.eigenvalues
        nxt = ev[r] if r < ev.numel() else torch.tensor(0.0, dtype=ev.dtype)
        return float((ev[r - 1] - nxt) / ev[0])

    def project(self, B: torch.Tensor, alpha: float, r: int | None = None) -> torch.Tensor:
        """``B - alpha (B U) U^T`` in float64 with the top ``r`` (default: the oracle's rank) eigenvectors."""
        U = self.eigenvectors[:, : (r or self.rank)]
        B64 = B.double()
        return B64 - alpha * (B64 @ U) @ U.T


def oracle(A: torch.Tensor, eta: float) -> Oracle:
    """The reference algorithm on A's values in float64 (the d x d Gram, a full eigh)."""
    A64 = A.double()
    A_hat = A64 / (A64.norm(dim=1, keepdim=True) + 1e-8)
    C = (A_hat.T @ A_hat) / A_hat.size(0)
    vals, vecs = torch.linalg.eigh(C)
    vals, vecs = vals.flip(0), vecs.flip(1)
    trace = float(((A64.norm(dim=1) / (A64.norm(dim=1) + 1e-8)) ** 2).sum() / A.shape[0])
    cum = torch.cumsum(vals, 0)
    r = min(int((cum / vals.sum() <= eta).sum()) + 1, vals.numel())
    return Oracle(vals, vecs, trace, r)
