"""Drop-in replacement for the reference ``sparse_projection`` of SPHERE."""
from __future__ import annotations

import torch

from . import _validation as val
from .projector import SphereProjector


def sparse_projection(A: torch.Tensor, B: torch.Tensor, eta: float = 0.5, alpha: float = 0.5, *, backend: str = "auto"):
    """SPHERE's sparse projection, same arguments and results as the reference.

    Parameters
    ----------
    A : (n, d) weight matrix of the current model.
    B : (m, d) update to be applied (any number of rows).
    eta : cumulative ratio in (0, 1].
    alpha : suppression strength in [0, 1].

    Returns
    -------
    B_proj : ``B (I - alpha U U^T)`` in B's dtype and device.
    P_soft : the dense d x d projection matrix ``I - alpha U U^T``.
    U : (d, r) principal eigenvectors in ascending eigenvalue order, as the
        reference returns them. Unlike the reference, nothing is printed.
    """
    val.check_matrix(A, "A", finite=False)
    val.check_matrix(B, "B", finite=False)
    val.check_same_device(A=A, B=B)
    val.check_columns(B, A.shape[1], "B", "A")
    val.check_finite(A, "A")
    val.check_finite(B, "B")
    projector = SphereProjector.fit(A, eta, alpha, backend=backend)
    return projector.apply(B), projector.projection_matrix(), projector.U.flip(1)
