"""Drop-in replacements for SPHERE's projection under both of its public names.

The seed README names it ``sparse_projection(A, B, eta, alpha)``; the public
SPHERE code (its AlphaEdit, MEMIT-RECT, PRUNE and FT paths) calls
``project_B_into_soft_dirs(A, B, energy_ratio=..., alpha=...)``. Both are here,
each accepting ``eta`` and ``energy_ratio`` as the name of the ratio, with the
same return values, so either caller swaps in this package with one import.
"""
from __future__ import annotations

import torch

from . import _validation as val
from .projector import SphereProjector


def _ratio(eta, energy_ratio, default: float, function: str) -> float:
    if eta is not None and energy_ratio is not None:
        raise TypeError(f"{function}: pass the cumulative ratio as eta or as energy_ratio, not both "
                        f"(got eta={eta!r}, energy_ratio={energy_ratio!r})")
    if eta is not None:
        return eta
    return default if energy_ratio is None else energy_ratio


def _project(A: torch.Tensor, B: torch.Tensor, eta: float, alpha: float, backend: str):
    # Every check here, each tensor scanned once; the projector's own entries would repeat them.
    val.check_matrix(A, "A", finite=False)
    val.check_matrix(B, "B", finite=False)
    val.check_same_device(A=A, B=B)
    val.check_columns(B, A.shape[1], "B", "A")
    eta = val.check_eta(eta)
    alpha = val.check_alpha(alpha)
    val.check_finite(A, "A")
    val.check_finite(B, "B")
    projector = SphereProjector._fit(A, eta, alpha, backend=backend, method="auto", precision="fp32", init=None)
    return projector._apply(B), projector.projection_matrix(), projector.U.flip(1)


def sparse_projection(A: torch.Tensor, B: torch.Tensor, eta: float | None = None, alpha: float = 0.5, *,
                      energy_ratio: float | None = None, backend: str = "auto"):
    """SPHERE's sparse projection, same arguments and results as the reference.

    Parameters
    ----------
    A : (n, d) weight matrix of the current model.
    B : (m, d) update to be applied (any number of rows).
    eta : cumulative ratio in (0, 1] (default 0.5); ``energy_ratio`` is the same, under the
        public code's name (give one of them).
    alpha : suppression strength in [0, 1].

    Returns
    -------
    B_proj : ``B (I - alpha U U^T)`` in B's dtype and device.
    P_soft : the dense d x d projection matrix ``I - alpha U U^T``.
    U : (d, r) principal eigenvectors in ascending eigenvalue order, as the
        reference returns them. Unlike the reference, nothing is printed.
    """
    return _project(A, B, _ratio(eta, energy_ratio, 0.5, "sparse_projection"), alpha, backend)


def project_B_into_soft_dirs(A: torch.Tensor, B: torch.Tensor, energy_ratio: float | None = None,
                             alpha: float = 0.8, *, eta: float | None = None, backend: str = "auto"):
    """:func:`sparse_projection` under the public SPHERE code's name and defaults (energy_ratio 0.8,
    alpha 0.8); ``eta`` is accepted for ``energy_ratio``. Returns ``(B_proj, P_soft, U)``."""
    return _project(A, B, _ratio(eta, energy_ratio, 0.8, "project_B_into_soft_dirs"), alpha, backend)
