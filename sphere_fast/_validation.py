"""Argument checks shared by the public API, the Triton launchers and the CUDA wrappers.

Every check names the argument, what was expected and what came in, and runs
before any work or any write, so bad input changes nothing.
"""
from __future__ import annotations

import math

import torch

from .gram import PRECISIONS, gram_side

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


def check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = " and ".join(f"{n} {s}" for n, s in shapes.items())
        raise ValueError(f"{' and '.join(shapes)} must have the same shape, got {listed}")


def check_shape(x: torch.Tensor, name: str, shape: tuple, what: str) -> None:
    """x has ``shape``, described as ``what`` (e.g. "the fitted shape")."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have {what} {tuple(shape)}, got {tuple(x.shape)}")


def check_writable(x: torch.Tensor, name: str) -> None:
    """No element of x is shared with another (an expanded view would be written several times)."""
    for size, stride in zip(x.shape, x.stride()):
        if size > 1 and stride == 0:
            raise ValueError(f"{name} must not be an expanded (stride-0) view, got strides {x.stride()}")


def check_update(B: torch.Tensor, U: torch.Tensor, name: str = "B", *, finite: bool = True) -> None:
    """An update B (n x d, non-empty) for a basis U (d x r, fp32 or fp64, r may be 0) on B's device."""
    check_matrix(B, name, finite=False)
    check_matrix(U, "U", finite=False, dtypes=(torch.float32, torch.float64), empty_ok=True)
    check_same_device(**{name: B, "U": U})
    if U.shape[0] != B.shape[1]:
        raise ValueError(
            f"U must have {B.shape[1]} rows (as many as {name} has columns), got shape {tuple(U.shape)}"
        )
    if finite:
        check_finite(B, name)


# -- the eigensolver's arguments (the torch twin and the CUDA extension's wrapper alike) --

EIG_DTYPES = (torch.float32, torch.float64)


def check_square(x, name: str, *, dtypes=FLOAT_DTYPES, finite: bool = True) -> int:
    """A non-empty square matrix of one of ``dtypes``; returns its size."""
    check_matrix(x, name, finite=False, dtypes=dtypes)
    if x.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must be square, got shape {tuple(x.shape)}")
    if finite:
        check_finite(x, name)
    return x.shape[0]


def check_init(init, G: torch.Tensor, *, finite: bool = True) -> None:
    """A warm start for the eigensolver on G (m x m): None, or (m, k) with 1 <= k <= m on G's device."""
    if init is None:
        return
    check_matrix(init, "init", finite=False)
    check_same_device(G=G, init=init)
    m = G.shape[0]
    if init.shape[0] != m or not 1 <= init.shape[1] <= m:
        raise ValueError(f"init must have shape (m, k) with m = {m} and 1 <= k <= m, got {tuple(init.shape)}")
    if finite:
        check_finite(init, "init")


def check_eig_args(G, trace, eta, *, method, methods: tuple, init, tol, max_iter, finite: bool = True):
    """The arguments both eigensolver twins take; returns ``(trace, eta, tol)`` as floats (tol may be None).

    ``finite=False`` leaves the NaN/Inf scan of G and init to the caller (the CUDA
    extension does it on the device). Shapes and scalars are checked before any scan.
    """
    check_square(G, "G", dtypes=EIG_DTYPES, finite=False)
    check_choice(method, "method", methods)
    trace = check_positive(trace, "trace")
    eta = check_eta(eta)
    tol = None if tol is None else check_positive(tol, "tol")
    check_positive_int(max_iter, "max_iter")
    check_init(init, G, finite=False)
    if finite:
        check_finite(G, "G")
        if init is not None:
            check_finite(init, "init")
    return trace, eta, tol


def check_eta(eta, name: str = "eta") -> float:
    eta = real_number(eta, name)
    if not (0.0 < eta <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {eta}")
    return eta


def check_alpha(alpha, name: str = "alpha") -> float:
    alpha = real_number(alpha, name)
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {alpha}")
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


def check_int_range(value, name: str, low: int, high: int | None = None, *, none_ok: bool = False) -> int | None:
    """An int (a bool is not one) in [low, high) (no upper bound when high is None), or None when ``none_ok``."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value >= high):
        if high is None:
            bounds = f">= {low}"
        else:  # a large power of two reads better as one
            top = f"2**{high.bit_length() - 1}" if high > 2**16 and high & (high - 1) == 0 else str(high)
            bounds = f"in [{low}, {top})"
        raise ValueError(f"{name} must be an int {bounds}{' or None' if none_ok else ''}, got {value!r}")
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


# -- a saved SphereProjector --

PROJECTOR_STATE_FIELDS = ("U", "eigenvalues", "basis", "trace", "eta", "alpha", "side", "backend", "method", "shape")


def check_projector_state(state) -> None:
    """A ``SphereProjector.state_dict()`` whose fields agree with its ``shape`` (n, d) and ``side``: U (d, r) with
    1 <= r <= m, basis (m, r) in U's dtype (m = n on the rows side, d on the cols side), eigenvalues (r,).
    ``precision`` may be absent (states saved before it was kept were fitted in fp32)."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict (a SphereProjector.state_dict()), got {type(state).__name__}")
    missing = [k for k in PROJECTOR_STATE_FIELDS if k not in state]
    if missing:
        raise ValueError(f"state is not a SphereProjector.state_dict(): missing {missing}")
    shape = state["shape"]
    if not (isinstance(shape, (list, tuple)) and len(shape) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise ValueError(f"state['shape'] must be two positive ints (n, d), got {shape!r}")
    n, d = shape
    side = gram_side(n, d)
    if state["side"] != side:
        raise ValueError(f"state['side'] must be {side!r} for shape ({n}, {d}) (the Gram's smaller side), "
                         f"got {state['side']!r}")
    m = n if side == "rows" else d
    U = check_matrix(state["U"], "state['U']", finite=False, dtypes=EIG_DTYPES)
    r = U.shape[1]
    if U.shape[0] != d or not 1 <= r <= m:
        raise ValueError(f"state['U'] must have shape (d, r) with d = {d} and 1 <= r <= {m} for shape ({n}, {d}), "
                         f"got {tuple(U.shape)}")
    basis = check_matrix(state["basis"], "state['basis']", finite=False, dtypes=EIG_DTYPES)
    if basis.dtype != U.dtype:
        raise TypeError(f"state['basis'] must have U's dtype {U.dtype}, got {basis.dtype}")
    if tuple(basis.shape) != (m, r):
        raise ValueError(f"state['basis'] must have shape ({m}, {r}) (the {side} side's Gram size, U's rank), "
                         f"got {tuple(basis.shape)}")
    values = state["eigenvalues"]
    if not isinstance(values, torch.Tensor) or values.dtype not in EIG_DTYPES:
        got = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
        raise TypeError(f"state['eigenvalues'] must be a float32 or float64 tensor, got {got}")
    if tuple(values.shape) != (r,):
        raise ValueError(f"state['eigenvalues'] must have shape ({r},) (U's rank), got {tuple(values.shape)}")
    check_positive(state["trace"], "state['trace']")
    check_eta(state["eta"], "state['eta']")
    check_alpha(state["alpha"], "state['alpha']")
    if "precision" in state:
        check_choice(state["precision"], "state['precision']", PRECISIONS)
