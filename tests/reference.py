"""The reference algorithm, restated for tests and benchmarks.

``sparse_projection_reference`` is the plain torch transcription of the
function in the SPHERE code README (shared/seeds/000_*.txt), minus its print;
tests and benchmarks import it from here so they cannot drift apart.
``oracle`` runs the same algorithm in float64 and also returns the full
spectrum, so tests can judge ambiguous cuts and eigengaps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sphere_fast.reference import sparse_projection_reference  # noqa: F401  (re-exported)


@dataclass
class Oracle:
    eigenvalues: torch.Tensor  # all d eigenvalues of C, descending, float64
    eigenvectors: torch.Tensor  # matching columns, float64
    trace: float
    rank: int

    def acceptable_ranks(self, eta: float, slack: float = 1e-6) -> set[int]:
        """r from the rule, plus every r at an ambiguous cut (DESIGN.md section 4)."""
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
        U = self.eigenvectors[:, : (r or self.rank)]
        B64 = B.double()
        return B64 - alpha * (B64 @ U) @ U.T


def oracle(A: torch.Tensor, eta: float) -> Oracle:
    A64 = A.double()
    A_hat = A64 / (A64.norm(dim=1, keepdim=True) + 1e-8)
    C = (A_hat.T @ A_hat) / A_hat.size(0)
    vals, vecs = torch.linalg.eigh(C)
    vals, vecs = vals.flip(0), vecs.flip(1)
    trace = float(((A64.norm(dim=1) / (A64.norm(dim=1) + 1e-8)) ** 2).sum() / A.shape[0])
    cum = torch.cumsum(vals, 0)
    r = min(int((cum / vals.sum() <= eta).sum()) + 1, vals.numel())
    return Oracle(vals, vecs, trace, r)
