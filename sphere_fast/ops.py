"""Public ops with backend dispatch: the normalised Gram and the hyperspherical energy."""
from __future__ import annotations

import torch

from ._validation import check_matrix, check_positive, check_precision
from .backends import implementation
from .gram import PRECISIONS, NormalizedGram

__all__ = ["PRECISIONS", "hyperspherical_energy", "normalized_gram"]


def normalized_gram(W: torch.Tensor, *, backend: str = "auto", precision: str = "fp32") -> NormalizedGram:
    """Row norms, the Gram of the unit-normalised rows on the smaller side, and its trace.

    Parameters
    ----------
    W : (n, d) float tensor, any strides. Read in its stored dtype.
    backend : "auto", "triton" or "torch" (see :mod:`sphere_fast.backends`).
    precision : "fp32" (default, keeps the fp32 accuracy contract), or the
        tensor-core input precisions "tf32", "tf32x3", "bf16" (Triton on a GPU only;
        see ``PRECISIONS``).
    """
    check_matrix(W, "W")
    check_precision(precision)
    return implementation("gram", backend, W.device)(W, precision=precision)


def hyperspherical_energy(W: torch.Tensor, s: float = 2.0, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """Hyperspherical energy (paper Eq. 6) of W's unit-normalised rows.

    ``sum_{i != j} (||w_i - w_j||^2 + eps)^(-s/2)`` with Riesz exponent ``s > 0``,
    accumulated in float64 without holding the n x n matrix at once. Returns a
    0-d float64 tensor.
    """
    check_matrix(W, "W")
    s = check_positive(s, "s")
    eps = check_positive(eps, "eps")
    return implementation("energy", backend, W.device)(W, s=s, eps=eps)
