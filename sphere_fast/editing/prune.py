"""PRUNE (Ma et al., 2025) on MEMIT: restrain the accumulated change of each edited matrix.

Once MEMIT has computed a batch's updates (the layers above seeing each layer's
raw update, ``update_order``), each layer's accumulated change ``D = W - W0``
with its update (W0 the unedited weight) has its singular values above
``sigma_max(W0)`` replaced by ``log(sigma) - log(sigma_max(W0)) + sigma_max(W0)``;
SPHERE's projection, when on, acts on the resulting update. Unlike the public SPHERE code,
which restrains only the weights it saves for evaluation, this restrains the
live model after every batch, as the PRUNE paper describes; W0 is part of the
saved state.
"""
from __future__ import annotations

import math

import torch

from .alphaedit import solve_dtype
from .memit import MEMIT


def restrained_correction(D: torch.Tensor, sigma_max: float) -> tuple[torch.Tensor, int]:
    """``(restrain(D) - D, count)``: what moves D's singular values above ``sigma_max`` onto
    ``log(sigma) - log(sigma_max) + sigma_max``, and how many there were (zero correction when none)."""
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    big = S > sigma_max
    count = int(big.sum())
    if count == 0:
        return torch.zeros_like(D), 0
    S_big = S[big]
    change = torch.log(S_big) - math.log(sigma_max) + sigma_max - S_big
    return (U[:, big] * change) @ Vh[big], count


class PRUNE(MEMIT):
    """MEMIT whose accumulated change is restrained after every batch, layer by layer."""

    name = "prune"
    label = "PRUNE"

    def __init__(self, hparams):
        super().__init__(hparams)
        self.W0: dict[str, torch.Tensor] = {}
        self.sigma_max: dict[str, float] = {}
        self.restrained: dict[str, int] = {}

    def start(self, name: str, W: torch.Tensor) -> None:
        if name not in self.W0:
            self.W0[name] = W.detach().clone()
            dt = solve_dtype(W.device, max(W.shape))
            self.sigma_max[name] = float(torch.linalg.matrix_norm(W.to(dt), ord=2))

    def before_projection(self, name, W, delta):
        dt = solve_dtype(W.device, max(W.shape))
        D = W.to(dt) - self.W0[name].to(dt) + delta.to(dt)
        correction, self.restrained[name] = restrained_correction(D, self.sigma_max[name])
        return delta if self.restrained[name] == 0 else delta.to(dt) + correction

    def layer_info(self, name: str) -> dict:
        return {"restrained_singular_values": self.restrained.get(name, 0)}

    def layer_state(self, name: str) -> dict:
        if name not in self.W0:
            return {}
        return {"W0": self.W0[name].detach().cpu().clone(), "sigma_max": self.sigma_max[name]}

    def load_layer_state(self, name: str, entry: dict, device) -> None:
        if "W0" in entry:
            self.W0[name] = entry["W0"].to(device).clone()
            self.sigma_max[name] = float(entry["sigma_max"])
