"""AlphaEdit's null-space projection and per-layer closed form (Fang et al., 2025).

P = U_0 U_0^T, where U_0 are the eigenvectors of C0 with eigenvalue below
``nullspace_threshold``: updates through P leave the preserved keys' outputs
(almost) unchanged. With keys K (d_in x n), residuals R (d_out x n) and the
accumulated ``cache_c`` = sum of K_p K_p^T over earlier batches, the public code
solves

    Delta^T = (P (K K^T + cache_c) + L2 I)^-1  P K R^T

and the update is returned as ``[d_out, d_in]``. P and cache_c live on the
layer's device.
"""
from __future__ import annotations

import torch

from .compute import compute_keys
from .strategy import Batch, LocateThenEdit


def solve_dtype(device: torch.device, d: int) -> torch.dtype:
    """The dtype of the eigendecomposition and solve: float64 where it is cheap (CPU, or d <= 8192),
    else float32 as in the public code."""
    return torch.float64 if device.type == "cpu" or d <= 8192 else torch.float32


def nullspace_projector(C0: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """``(P, k)``: the projector onto C0's eigenvectors with eigenvalue < threshold, and their count.

    The eigendecomposition runs on C0's device (float64 where cheap).
    """
    d = C0.shape[0]
    dt = solve_dtype(C0.device, d)
    values, vectors = torch.linalg.eigh(C0.to(dt))
    small = values < threshold
    U0 = vectors[:, small]
    return (U0 @ U0.T).float(), int(small.sum())


def alphaedit_update(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, cache_c: torch.Tensor, L2: float
                     ) -> torch.Tensor:
    """The AlphaEdit update as [d_out, d_in], in the solve dtype."""
    d = K.shape[0]
    for name, m in (("P", P), ("cache_c", cache_c)):
        if m.shape != (d, d):
            raise ValueError(f"{name} must be {d} x {d} (the key dimension), got {tuple(m.shape)}")
    if R.shape[1] != K.shape[1]:
        raise ValueError(f"R and K must have as many columns (requests), got R {tuple(R.shape)} and K {tuple(K.shape)}")
    dt = solve_dtype(K.device, d)
    K, R, Pd = K.to(dt), R.to(dt), P.to(dt)
    lhs = Pd @ (K @ K.T + cache_c.to(dt))
    lhs.diagonal().add_(L2)
    rhs = Pd @ K @ R.T
    return torch.linalg.solve(lhs, rhs).T


class AlphaEdit(LocateThenEdit):
    """AlphaEdit: the null-space projector P of each layer's C0 and the accumulated ``cache_c``."""

    name = "alphaedit"
    label = "AlphaEdit"
    default_alpha = 0.5  # paper, Appendix D.4.1
    default_update_order = "per_layer"  # the public AlphaEdit code

    def __init__(self, hparams):
        super().__init__(hparams)
        self.P: dict[str, torch.Tensor] = {}
        self.null_dim: dict[str, int] = {}
        self.cache_c: dict[str, torch.Tensor] = {}

    def has_key_statistics(self, name: str) -> bool:
        return name in self.P

    def set_key_statistics(self, name: str, C0: torch.Tensor) -> None:
        self.P[name], self.null_dim[name] = nullspace_projector(C0, self.hparams.nullspace_threshold)
        if name not in self.cache_c:
            self.cache_c[name] = torch.zeros_like(self.P[name])

    def layer_update(self, name, K, R, W):
        return alphaedit_update(K, R, self.P[name], self.cache_c[name], self.hparams.L2)

    def layer_info(self, name: str) -> dict:
        return {"nullspace_dim": self.null_dim[name]}

    def after_layers(self, batch: Batch) -> None:
        # cache_c gathers the keys of the edited model (as the public code does, after all layers).
        with batch.timed("cache"):
            Ks = compute_keys(batch.model, batch.tokenizer, batch.requests, batch.hparams, batch.module_names,
                              batch.templates)
            grams = {}
            for name in batch.module_names:
                K = Ks[name].to(self.cache_c[name].device).T
                grams[name] = (K @ K.T).to(self.cache_c[name].dtype)
            for name, g in grams.items():  # no failure point past here
                self.cache_c[name].add_(g)

    def layer_state(self, name: str) -> dict:
        return {"cache_c": self.cache_c[name].detach().cpu().clone()} if name in self.cache_c else {}

    def load_layer_state(self, name: str, entry: dict, device) -> None:
        if "cache_c" in entry:
            self.cache_c[name] = entry["cache_c"].to(device).clone()
