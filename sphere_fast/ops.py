"""Public ops with backend dispatch: the normalised Gram and the hyperspherical energy."""
from __future__ import annotations

import torch

from ._validation import check_matrix, check_positive
from .backends import resolve_backend
from .gram import NormalizedGram, hyperspherical_energy_reference, normalized_gram_reference

# fp32: IEEE products (the default; keeps the fp32 contract). On a GPU, Triton can use
# tensor cores: tf32 (10-bit operands), tf32x3 (operands split into two TF32 parts, three
# dots: close to fp32), bf16 (8-bit operands). 16-bit weights on the rows side always
# use tensor cores, with exact products.
PRECISIONS = ("fp32", "tf32", "tf32x3", "bf16")


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
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    name = resolve_backend("gram", backend, W.device)
    if name == "triton":
        from .kernels.normalized_gram import normalized_gram as triton_gram

        return triton_gram(W, precision=precision)
    return normalized_gram_reference(W)


def hyperspherical_energy(W: torch.Tensor, s: float = 2.0, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """Hyperspherical energy (paper Eq. 6) of W's unit-normalised rows.

    ``sum_{i != j} (||w_i - w_j||^2 + eps)^(-s/2)`` with Riesz exponent ``s > 0``,
    accumulated in float64 without holding the n x n matrix at once. Returns a
    0-d float64 tensor.
    """
    check_matrix(W, "W")
    s = check_positive(s, "s")
    eps = check_positive(eps, "eps")
    name = resolve_backend("energy", backend, W.device)
    if name == "triton":
        from .kernels.hyperspherical_energy import hyperspherical_energy as triton_energy

        return triton_energy(W, s=s, eps=eps)
    return hyperspherical_energy_reference(W, s=s, eps=eps)
