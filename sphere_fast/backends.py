"""The one dispatch point that chooses an implementation for each op.

Backends, fastest first: ``cuda`` (the compiled extension ``sphere_fast._C``),
``triton`` (``sphere_fast.kernels``) and ``torch`` (complete on its own, the CPU
path and the test oracle). Each op is implemented by some of them:

    gram, energy        triton, torch
    eigensolver, apply  cuda, torch

``auto`` takes the first available implementation of the op in the order
cuda -> triton -> torch. An explicit choice (the ``backend=`` argument, else the
``SPHERE_FAST_BACKEND`` environment variable) must be available on the
tensor's device or the call raises :class:`BackendUnavailableError` saying why;
an op the chosen backend does not implement uses the next one in that order.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "SPHERE_FAST_BACKEND"
OPS = {
    "gram": ("triton", "torch"),
    "energy": ("triton", "torch"),
    "eigensolver": ("cuda", "torch"),
    "apply": ("cuda", "torch"),
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_status(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether backend ``name`` can run on ``device``, and if not, why."""
    device = torch.device(device)
    if name == "torch":
        return True, ""
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed (pip install 'sphere_fast[triton]')"
        if device.type == "cuda" or (device.type == "cpu" and _triton_interpreting()):
            return True, ""
        return False, (
            f"Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 (set before import) "
            f"for CPU tensors; got a tensor on {device}"
        )
    if name == "cuda":
        if device.type != "cuda":
            return False, f"the CUDA extension needs a CUDA tensor, got a tensor on {device}"
        from . import _cuda

        try:
            _cuda.load_extension()
        except ImportError as exc:
            return False, str(exc)
        return True, ""
    raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {name!r}")


def requested_backend(backend: str | None) -> str:
    """The backend asked for: the argument, else the environment, else ``auto``."""
    choice = backend if backend not in (None, "auto") else os.environ.get(ENV_VAR, "auto") or "auto"
    choice = choice.strip().lower()
    if choice != "auto" and choice not in BACKENDS:
        source = "backend" if backend not in (None, "auto") else ENV_VAR
        raise ValueError(f"{source} must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {choice!r}")
    return choice


def resolve_backend(op: str, backend: str | None, device: torch.device) -> str:
    """The backend that runs ``op`` for tensors on ``device``."""
    if op not in OPS:
        raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")
    choice = requested_backend(backend)
    if choice == "auto":
        chain = BACKENDS
    else:
        ok, why = backend_status(choice, device)
        if not ok:
            raise BackendUnavailableError(f"backend {choice!r} is unavailable: {why}")
        chain = BACKENDS[BACKENDS.index(choice):]
    for name in chain:
        # The Triton interpreter is a testing tool: auto never picks it for CPU tensors.
        if name == "triton" and choice == "auto" and torch.device(device).type == "cpu":
            continue
        if name in OPS[op] and backend_status(name, device)[0]:
            return name
    return "torch"


def available_backends(device: torch.device | str = "cpu") -> dict[str, str]:
    """Each backend with ``"available"`` or the reason it is not, for ``device``."""
    out = {}
    for name in BACKENDS:
        ok, why = backend_status(name, torch.device(device))
        out[name] = "available" if ok else why
    return out
