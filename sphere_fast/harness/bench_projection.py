"""``sphere-fast bench-projection``: the reference projection against sphere_fast on one synthetic layer.

:func:`bench_projection` times :func:`sphere_fast.sparse_projection` (after a
warm-up call) and the fit alone, optionally the reference (a d x d
eigendecomposition) and the error against a float64 projector fitted on the
small Gram side, and returns the numbers; the command line prints them.
"""
from __future__ import annotations

import sys
import threading
import time

CPU_SHAPE = (2048, 7168)
GPU_SHAPE = (4096, 14336)


def bench_projection(
    *,
    shape: tuple[int, int] | None = None,
    spectrum: str = "decaying",
    dtype: str = "float32",
    eta: float = 0.5,
    alpha: float = 0.5,
    device=None,
    seed: int = 0,
    reference: bool = True,
    error: bool = True,
    log=print,
) -> dict:
    """Time one projection of a synthetic ``shape`` weight (default :data:`GPU_SHAPE` on CUDA, else
    :data:`CPU_SHAPE`) and return ``seconds``, ``fit_seconds`` and ``rank``; with ``reference``, also
    ``reference_seconds`` and ``reference_rank``; with ``error``, ``float64_rank``, ``float64_trace`` and
    ``error`` (‖B_proj − B_proj_fp64‖ / ‖B‖). ``log`` gets the set-up line before anything runs."""
    import torch

    from .. import SphereProjector, sparse_projection
    from ..reference import sparse_projection_reference
    from ..synthetic import synthetic_weight

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n, d = shape or (GPU_SHAPE if device.type == "cuda" else CPU_SHAPE)
    log(f"sphere-fast bench-projection: W [{n} x {d}] {dtype}, {spectrum} spectrum, "
        f"eta={eta} alpha={alpha}, device {device}")
    torch_dtype = getattr(torch, dtype)
    W = synthetic_weight(n, d, spectrum=spectrum, dtype=torch_dtype, device=device, seed=seed)
    B = 1e-3 * synthetic_weight(n, d, spectrum="gaussian", dtype=torch_dtype, device=device, seed=seed + 1)

    sparse_projection(W, B, eta, alpha)  # warm-up: first-call allocations and thread start-up
    fast, seconds = _timed("sphere_fast fit + apply", lambda: sparse_projection(W, B, eta, alpha), spinner=False)
    fit_seconds = _timed("fit", lambda: SphereProjector.fit(W, eta, alpha), spinner=False)[1]
    result = {"shape": [n, d], "device": str(device), "seconds": seconds, "fit_seconds": fit_seconds,
              "rank": fast[2].shape[1]}
    if reference:
        ref, ref_seconds = _timed(f"reference (d x d eigh, d={d})",
                                  lambda: sparse_projection_reference(W.float(), B.float(), eta, alpha), spinner=True)
        result.update(reference_seconds=ref_seconds, reference_rank=ref[2].shape[1])
    if error:
        # float64 ground truth on the small Gram side (exact in exact arithmetic).
        P = SphereProjector.fit(W.double(), eta, alpha, backend="torch", method="dense")
        err = float((fast[0].double() - P.apply(B.double())).norm() / B.double().norm())
        result.update(float64_rank=P.rank, float64_trace=P.trace, error=err)
    return result


def _progress(label: str, stop: threading.Event) -> None:
    """A spinner with elapsed seconds on stderr while a long call runs."""
    start = time.perf_counter()
    marks = "|/-\\"
    i = 0
    while not stop.wait(0.5):
        sys.stderr.write(f"\r  {label} {marks[i % 4]} {time.perf_counter() - start:6.1f} s")
        sys.stderr.flush()
        i += 1
    sys.stderr.write("\r" + " " * (len(label) + 20) + "\r")


def _timed(label: str, fn, *, spinner: bool):
    """``(fn(), seconds)``, the device synchronised before the clock stops."""
    import torch

    stop = threading.Event()
    thread = None
    if spinner and sys.stderr.isatty():
        thread = threading.Thread(target=_progress, args=(label, stop), daemon=True)
        thread.start()
    elif spinner:
        print(f"  running {label} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out, time.perf_counter() - start
    finally:
        stop.set()
        if thread:
            thread.join()
