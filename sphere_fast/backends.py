"""The one dispatch point: the table of implementations and the choice among them.

Backends, fastest first: ``cuda`` (the compiled extension ``sphere_fast._C``),
``triton`` (``sphere_fast.kernels``) and ``torch`` (complete on its own, the CPU
path and the test oracle). :data:`IMPLEMENTATIONS` names the function of every
(op, backend) pair as ``"module:function"``, imported on first use (importing
this module imports neither triton nor the extension); the functions of one op
take the same arguments. The ops and their backends:

    gram, energy                triton, torch
    eigensolver, apply, apply_  cuda, torch

``auto`` takes the first available implementation of the op in the order
cuda -> triton -> torch. An explicit choice (the ``backend=`` argument, else the
``SPHERE_FAST_BACKEND`` environment variable) must be available on the
tensor's device or the call raises :class:`BackendUnavailableError` saying why;
an op the chosen backend does not implement uses the next one in that order.
Callers get the function from :func:`implementation`; nothing else picks a backend.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable

import torch

BACKENDS = ("cuda", "triton", "torch")
ENV_VAR = "SPHERE_FAST_BACKEND"
IMPLEMENTATIONS = {
    "gram": {  # (W, *, precision) -> NormalizedGram
        "triton": "sphere_fast.kernels.normalized_gram:normalized_gram",
        "torch": "sphere_fast.gram:normalized_gram_reference",
    },
    "energy": {  # (W, *, s, eps) -> 0-d float64 tensor
        "triton": "sphere_fast.kernels.hyperspherical_energy:hyperspherical_energy",
        "torch": "sphere_fast.gram:hyperspherical_energy_reference",
    },
    "eigensolver": {  # (G, trace, eta, *, method, init) -> Eigenpairs
        "cuda": "sphere_fast._cuda:top_eigenpairs",
        "torch": "sphere_fast.eigensolver:top_eigenpairs",
    },
    "apply": {  # (B, U, alpha) -> B - alpha (B U) U^T in B's dtype
        "cuda": "sphere_fast._cuda:project",
        "torch": "sphere_fast.projector:project",
    },
    "apply_": {  # (W, B, U, alpha) -> W += B - alpha (B U) U^T in place, returns W
        "cuda": "sphere_fast._cuda:project_add_",
        "torch": "sphere_fast.projector:project_add_",
    },
}
# The backends of each op, in the order auto tries them.
OPS = {op: tuple(name for name in BACKENDS if name in impls) for op, impls in IMPLEMENTATIONS.items()}


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
        if importlib.util.find_spec("sphere_fast.kernels") is None:
            # kernels/ is mapped to sphere_fast.kernels by the install; a source tree on sys.path lacks it.
            return False, "sphere_fast.kernels is not importable: install the package (pip install -e .)"
        if device.type == "cuda" or (device.type == "cpu" and _triton_interpreting()):
            return True, ""
        return False, (
            f"Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 (set before import) "
            f"for CPU tensors; got a tensor on {device}"
        )
    if name == "cuda":
        if device.type != "cuda":
            return False, f"the CUDA extension needs a CUDA tensor, got a tensor on {device}"
        try:
            cuda_extension()
        except ImportError as exc:
            return False, str(exc)
        return True, ""
    raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {name!r}")


def cuda_extension():
    """The compiled extension ``sphere_fast._C``, loaded on first use; ImportError saying what was looked
    for and how to build it when it is absent."""
    from . import _cuda

    return _cuda.load_extension()


def requested_backend(backend: str | None) -> str:
    """The backend asked for: the argument, else the environment, else ``auto``."""
    given = backend if backend not in (None, "auto") else os.environ.get(ENV_VAR, "auto") or "auto"
    choice = given.strip().lower() if isinstance(given, str) else None
    if choice != "auto" and choice not in BACKENDS:
        source = "backend" if backend not in (None, "auto") else ENV_VAR
        # what came in, as given (not lower-cased; a non-str would have failed on .strip())
        raise ValueError(f"{source} must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {given!r}")
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


def load_implementation(op: str, name: str) -> Callable:
    """The function of backend ``name`` for ``op``, from :data:`IMPLEMENTATIONS` (imported now)."""
    module, _, function = IMPLEMENTATIONS[op][name].partition(":")
    return getattr(importlib.import_module(module), function)


def implementation(op: str, backend: str | None, device: torch.device) -> Callable:
    """The function that runs ``op`` for tensors on ``device`` (the backend as :func:`resolve_backend` picks it)."""
    return load_implementation(op, resolve_backend(op, backend, device))
