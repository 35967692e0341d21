"""RECT (Gu et al., 2024) as the public SPHERE code runs it on MEMIT.

Each layer's MEMIT update keeps only its entries with the largest relative
change ``|Delta| / (|W| + 1e-8)``, 40 % of them (the threshold is the k-th
smallest value over all entries, k = 60 % of the count); the rest are zeroed.
SPHERE's projection, when on, acts on the masked update. As in that code, the
layers above see each layer's unmasked update while the batch's updates are
computed; the masks apply after the last layer (``update_order``).
"""
from __future__ import annotations

import torch

from .memit import MEMIT

KEEP_PERCENT = 40
EPS = 1e-8


def rect_mask(delta: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """True where the relative change is at or above the k-th smallest value, k = 60 % of the entries."""
    relative = delta.abs() / (W.to(delta.dtype).abs() + EPS)
    k = max(1, relative.numel() * (100 - KEEP_PERCENT) // 100)
    threshold = torch.kthvalue(relative.reshape(-1), k).values
    return relative >= threshold


class RECT(MEMIT):
    """MEMIT with each update rectified to its largest relative changes."""

    name = "rect"
    label = "RECT"

    def before_projection(self, name, W, delta):
        return torch.where(rect_mask(delta, W), delta, torch.zeros_like(delta))
