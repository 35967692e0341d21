"""Synthetic weights and updates for benchmarks and the CLI (no downloads needed)."""
from __future__ import annotations

import torch

SPECTRUM_EXPONENTS = {"decaying": 0.3, "steep": 0.6}
SPECTRA = ("gaussian", *SPECTRUM_EXPONENTS)

def synthetic_weight(n: int, d: int, *, spectrum: str, dtype, device, seed: int = 0):
    """A test weight with a chosen singular-value profile.

    ``gaussian``: i.i.d. N(0, 1) entries (a flat Marchenko-Pastur spectrum: the
    cut at eta = 0.5 needs a large share of the eigenpairs).
    ``decaying`` / ``steep``: W = Q_n diag(s) Q_d^T with random orthonormal
    factors and singular values s_k = k^-0.3 / k^-0.6, plus 1 % Gaussian noise:
    the slow power-law decay seen in trained FFN weights, and a steeper one whose
    cut needs few eigenpairs. The rank r at eta = 0.5 for each spectrum and shape
    is the "r" column of bench/results/cpu-projection-2026-11-21.md.
    """
    # Random numbers come from a seeded CPU generator (the same weight on every
    # device); the QR factorisations and the product run on ``device``.
    g = torch.Generator(device="cpu").manual_seed(seed)
    if spectrum == "gaussian":
        W = torch.randn(n, d, generator=g)
    elif spectrum in SPECTRUM_EXPONENTS:
        k = min(n, d)
        Qn, _ = torch.linalg.qr(torch.randn(n, k, generator=g).to(device))
        Qd, _ = torch.linalg.qr(torch.randn(d, k, generator=g).to(device))
        s = torch.arange(1, k + 1, dtype=torch.float32, device=device).pow(-SPECTRUM_EXPONENTS[spectrum])
        W = (Qn * s) @ Qd.T
        W += 0.01 * W.std() * torch.randn(n, d, generator=g).to(device)
    else:
        raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
    return W.to(device=device, dtype=dtype)


def low_rank_change(W: torch.Tensor, rank: int = 100, relative: float = 1e-3, seed: int = 1) -> torch.Tensor:
    """A rank-``rank`` update with ||dW||_F = relative * ||W||_F, like one editing batch."""
    n, d = W.shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    dW = torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g)
    dW *= relative * float(W.float().norm()) / float(dW.norm())
    return dW.to(device=W.device, dtype=W.dtype)
