"""Argument checks shared by the public API, the Triton launchers and the CUDA wrappers.

Every check names the argument, what was expected and what came in, and runs
before any work or any write, so bad input changes nothing.
"""
from __future__ import annotations

import math

import torch

from .gram import PRECISIONS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_names(dtypes) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_matrix(x, name: str, *, finite: bool = True, dtypes=FLOAT_DTYPES, empty_ok: bool = False) -> torch.Tensor:
    """A 2-D tensor of one of ``dtypes``, non-empty unless ``empty_ok``, optionally checked for NaN/Inf."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must be {_dtype_names(dtypes)}, got {x.dtype}")
    if x.numel() == 0 and not empty_ok:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if finite:
        check_finite(x, name)
    return x


def check_cuda(x: torch.Tensor, name: str) -> None:
    if x.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor, got a tensor on {x.device}")


def all_finite(x: torch.Tensor) -> bool:
    """True when x holds no NaN or Inf."""
    # One reduction instead of an elementwise pass (no temporary the size of x,
    # one read): any NaN or Inf makes the sum non-finite. Only a sum that overflowed, or a real
    # NaN/Inf, pays for the exact check. detach: a check builds no autograd graph.
    x = x.detach()
    total = x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return math.isfinite(float(total)) or bool(torch.isfinite(x).all())


def check_finite(x: torch.Tensor, name: str) -> None:
    if not all_finite(x):
        raise ValueError(f"{name} contains NaN or Inf")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {listed}")


def check_columns(b: torch.Tensor, d: int, name: str = "B", what: str = "A") -> None:
    if b.shape[1] != d:
        raise ValueError(
            f"{name} must have {d} columns (as many as {what}), got shape {tuple(b.shape)}"
        )


def check_eta(eta) -> float:
    eta = real_number(eta, "eta")
    if not (0.0 < eta <= 1.0):
        raise ValueError(f"eta must be in (0, 1], got {eta}")
    return eta


def check_alpha(alpha) -> float:
    alpha = real_number(alpha, "alpha")
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha


def check_choice(value, name: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_precision(precision) -> None:
    """One of :data:`sphere_fast.gram.PRECISIONS`."""
    check_choice(precision, "precision", PRECISIONS)


def check_positive(value, name: str) -> float:
    value = real_number(value, name)
    if not value > 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_positive_int(value, name: str, *, none_ok: bool = False) -> int | None:
    """A positive int (a bool is not one), or None when ``none_ok``; ValueError naming ``name`` otherwise."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if none_ok else ''}, got {value!r}")
    return value


def real_number(value, name: str) -> float:
    """A finite real number (a Python number or a one-element tensor), as float."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a real number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value
