"""MEMIT's per-layer closed form (Meng et al., 2023).

With keys K (d_in x n), residuals R (d_out x n, the target residual already
divided by the number of remaining layers) and the key covariance C0:

    Delta = R K^T (lambda C0 + K K^T)^-1,   lambda = mom2_update_weight

returned as ``[d_out, d_in]`` (the oriented weight's shape). The solve runs in
float64, as in the public code (C0's spectrum spans many decades).
"""
from __future__ import annotations

import torch

from .strategy import LocateThenEdit


def memit_update(K: torch.Tensor, R: torch.Tensor, C0: torch.Tensor, mom2_update_weight: float) -> torch.Tensor:
    """``R K^T (w C0 + K K^T)^-1`` as [d_out, d_in], float64."""
    d = K.shape[0]
    if C0.shape != (d, d):
        raise ValueError(f"C0 must be {d} x {d} (the key dimension), got {tuple(C0.shape)}")
    if R.shape[1] != K.shape[1]:
        raise ValueError(f"R and K must have as many columns (requests), got R {tuple(R.shape)} and K {tuple(K.shape)}")
    dt = torch.float64
    K, R = K.to(dt), R.to(dt)
    A = mom2_update_weight * C0.to(dt) + K @ K.T
    adj = torch.linalg.solve(A, K)  # A^-1 K, A symmetric
    return R @ adj.T


class MEMIT(LocateThenEdit):
    """MEMIT: the closed form above with C0 of each edited layer."""

    name = "memit"
    label = "MEMIT"
    default_alpha = 0.8  # paper, Appendix D.4.1
    default_update_order = "after_layers"  # the public MEMIT code (and RECT's and PRUNE's on it)

    def __init__(self, hparams):
        super().__init__(hparams)
        self.C0: dict[str, torch.Tensor] = {}

    def has_key_statistics(self, name: str) -> bool:
        return name in self.C0

    def set_key_statistics(self, name: str, C0: torch.Tensor) -> None:
        self.C0[name] = C0

    def layer_update(self, name, K, R, W):
        return memit_update(K, R, self.C0[name], self.hparams.mom2_update_weight)
