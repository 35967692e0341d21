"""The reference ``sparse_projection``, transcribed from the SPHERE code README.

Kept verbatim in its arithmetic (d x d Gram, full ``eigh``, dense P) so that
benchmarks and the CLI measure the real baseline; only the print is dropped.
Tests import it through ``tests/reference.py``.
"""
from __future__ import annotations

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
