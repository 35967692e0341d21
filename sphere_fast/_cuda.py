"""The CUDA extension ``sphere_fast._C``: loader and torch-facing wrappers.

Importing ``sphere_fast`` never loads it; the first call that needs it does,
and a missing or broken build raises an ImportError that says what was looked
for and how to build it.

The extension does not link libtorch (bitsandbytes style): these wrappers
check the tensors, allocate outputs and workspaces with torch on the tensors'
device, and pass raw pointers, sizes, strides, dtype codes and the current
torch stream (``torch.cuda.current_stream().cuda_stream``). The eigensolver's
internal workspace, whose size grows with the block, is taken by the extension
itself with ``cudaMallocAsync`` on that stream (the device's default memory
pool, outside torch's caching allocator) and is returned before the call ends.

Public functions:

* :func:`top_eigenpairs` -- the CUDA twin of :func:`sphere_fast.eigensolver.top_eigenpairs`;
* :func:`project` -- ``B - alpha (B U) U^T`` in B's dtype;
* :func:`project_add_` -- ``W += B - alpha (B U) U^T`` in place, W written once.
"""
from __future__ import annotations

import functools
import glob
import importlib
import importlib.machinery
import os

import torch

from . import _validation as val
from .eigensolver import (
    COLD_BLOCK,
    COLD_OVERSAMPLE,
    DEFAULT_TOL,
    FULL_ENERGY_SLACK,
    ITERATION_COST,
    METHODS,
    Eigenpairs,
    plan_auto,
    warm_oversample,
)
from .gram import work_dtype

EXTENSION_MODULE = "sphere_fast._C"
SPLIT_ALIGN = 8  # elements per row of the fp16/bf16 halves of U: a multiple of 8 is 16 bytes
# (B U) U^T on tensor cores for fp16/bf16 B from this rank on. That path moves 8 more bytes
# per output element (its fp32 chunk C, written and read) and saves the FMA kernel's 2r fp32
# flops per element, so it wins once r is large enough. The switch point is a roofline
# estimate, not yet measured: retune it from bench/bench_cuda.py's apply cases on a GPU.
TENSOR_CORE_MIN_RANK = 64
TENSOR_CORE_CHUNK_BYTES = 64 << 20  # the fp32 chunk C of T U^T: rows per GEMM are sized to this
BUILD_HINT = (
    "build it on a machine with nvcc (CUDA >= 12) and the cuBLAS/cuSOLVER headers and libraries "
    "(a CUDA build of torch installs them as the nvidia-cublas / nvidia-cusolver wheels): "
    "SPHERE_FAST_BUILD_CUDA=1 pip install -e . (CMake builds csrc/ into sphere_fast/_C; "
    "see README, 'CUDA extension')"
)

# dtype codes shared with csrc/sphere_fast.h (enum DType).
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _import_extension(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        here = os.path.dirname(os.path.abspath(__file__))
        stem = module_name.rpartition(".")[2]
        found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(here, stem + "*")))
        suffixes = ", ".join(importlib.machinery.EXTENSION_SUFFIXES)
        what = (
            f"found {', '.join(found)} there, which failed to load"
            if found
            else f"no {stem}<suffix> file there (suffixes tried: {suffixes})"
        )
        raise ImportError(
            f"the CUDA extension {module_name} is not available: looked for module {module_name} "
            f"in {here}; {what}; the import error was: {exc}. To get it, {BUILD_HINT}"
        ) from exc


@functools.lru_cache(maxsize=None)
def load_extension():
    """The ``sphere_fast._C`` module, or an ImportError with a diagnostic."""
    return _import_extension(EXTENSION_MODULE)


# -- layout and stream -----------------------------------------------------------


def _row_major(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x with unit column stride and its row stride (>= the column count)."""
    rows, cols = x.shape
    if x.stride(1) != 1 or (rows > 1 and x.stride(0) < cols):
        x = x.contiguous()
    ld = x.stride(0) if rows > 1 else cols
    return x, max(ld, cols)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# -- eigensolver -----------------------------------------------------------------


def top_eigenpairs(
    G: torch.Tensor,
    trace: float,
    eta: float,
    *,
    method: str = "auto",
    init: torch.Tensor | None = None,
    tol: float | None = None,
    max_iter: int = 200,
    tf32: bool = True,
    oversample: int | None = None,
    seed: int = 0,
    return_stats: bool = False,
):
    """The top-r eigenpairs of the symmetric PSD CUDA matrix G, r by the cumulative rule.

    Same algorithm, arguments and result as :func:`sphere_fast.eigensolver.top_eigenpairs`
    (values float64 descending, vectors m x r in G's dtype with orthonormal columns).

    Parameters
    ----------
    G : (m, m) float32 or float64 CUDA tensor, symmetric (only its values are read;
        a transposed view is accepted as is).
    trace : trace(G), known from the row norms.
    eta : cumulative energy ratio in (0, 1].
    method : "auto", "dense" (cuSOLVER Xsyevd) or "block" (subspace iteration).
    init : (m, k0) warm start with orthonormal columns (the previous basis).
    tol : residual tolerance relative to theta_1 (default: 2e-6 fp32, 1e-11 fp64).
    max_iter : block iterations before :class:`sphere_fast.ConvergenceError`.
    tf32 : for fp32 G, run the early block iterations' G @ X on TF32 tensor cores
        (accepted pairs always come from a full-fp32 iteration).
    oversample : guard vectors p (default: the torch twin's, 8 cold,
        :func:`sphere_fast.eigensolver.warm_oversample` warm).
    seed : seed of the random start / growth columns.
    return_stats : also return a dict (iterations, tf32_iterations, residuals, ...).
    """
    # NaN/Inf in G and init are found by the extension, on the device.
    trace, eta, tol = val.check_eig_args(G, trace, eta, method=method, methods=METHODS, init=init, tol=tol,
                                         max_iter=max_iter, finite=False)
    val.check_int_range(oversample, "oversample", 0, none_ok=True)
    val.check_int_range(seed, "seed", 0, 2**64)
    val.check_cuda(G, "G")
    m = G.shape[0]
    tol = DEFAULT_TOL[G.dtype] if tol is None else tol

    # G is symmetric: a column-major view is the same matrix.
    if G.stride(1) == 1 and (m == 1 or G.stride(0) >= m):
        ldg = max(G.stride(0), m)
    elif G.stride(0) == 1 and G.stride(1) >= m:
        ldg = G.stride(1)
    else:
        G = G.contiguous()
        ldg = m

    init_ptr, k0, s0, s1 = 0, 0, 0, 0
    if init is not None:
        if init.dtype != G.dtype:
            init = init.to(G.dtype)
        init_ptr, k0, s0, s1 = init.data_ptr(), init.shape[1], init.stride(0), init.stride(1)

    # The twin's rules, decided here, not in csrc/: auto's plan, the guard vectors.
    budget, max_block = 0.0, 0
    if method == "auto":
        plan = plan_auto(G, trace, init_columns=None if init is None else k0, oversample=oversample)
        method, budget, max_block = plan.method, plan.budget or 0.0, plan.max_block or 0
    p = warm_oversample(k0, oversample) if init is not None else (COLD_OVERSAMPLE if oversample is None else oversample)

    ext = load_extension()
    with torch.cuda.device(G.device):
        stream = _stream(G.device)
        res = _with_memory_retry(lambda: ext.eigensolve(
            G=G.data_ptr(), m=m, ldg=ldg, dtype=_DTYPE_CODES[G.dtype], trace=trace, eta=eta, method=method,
            init=init_ptr, k0=k0, init_s0=s0, init_s1=s1, tol=tol, max_iter=max_iter, tf32=bool(tf32),
            seed=int(seed), oversample=p, min_guards=min(p, COLD_OVERSAMPLE), budget=budget, max_block=max_block,
            iteration_cost=ITERATION_COST, full_energy_slack=FULL_ENERGY_SLACK, cold_block=COLD_BLOCK, stream=stream,
        ))
        # Free the solver's device memory (cudaFreeAsync on `stream`) while G's device
        # is current, also on error: stream 0 names the current device's null stream.
        try:
            values = torch.empty(res.rank, dtype=torch.float64, device=G.device)
            vectors = torch.empty(m, res.rank, dtype=G.dtype, device=G.device)
            res.copy_out(values=values.data_ptr(), vectors=vectors.data_ptr(), ld=max(res.rank, 1), stream=stream)
            pairs = Eigenpairs(values, vectors, res.method, res.iterations, res.block_size)
            stats = {
                "method": res.method,
                "iterations": res.iterations,
                "tf32_iterations": res.tf32_iterations,
                "block_size": res.block_size,
                "residuals": list(res.residuals),
            }
        finally:
            del res
    return (pairs, stats) if return_stats else pairs


def _with_memory_retry(call):
    """Run an extension call; if it fails on a device allocation, empty torch's cache and run it once more.

    The extension takes its memory (the eigensolver's workspace, cuBLAS's workspace
    and handles) outside torch's caching allocator, which during editing often holds
    most of the free memory; ``torch.cuda.empty_cache`` returns torch's unused cached
    blocks to the device. The extension clears CUDA's last-error state when an
    allocation fails, so the second call starts clean and really allocates again
    rather than reporting the first failure. Nothing the caller sees has been written
    when an allocation fails (the eigensolver's results are copied out by a later
    call; the projection allocates before its output pass), so the second call runs on
    unchanged inputs. A second allocation failure raises torch.cuda.OutOfMemoryError;
    any other error is raised as it is, without a retry.
    """
    try:
        return call()
    except RuntimeError as exc:
        if "cudaErrorMemoryAllocation" not in str(exc):
            raise
    torch.cuda.empty_cache()
    try:
        return call()
    except RuntimeError as exc:
        if "cudaErrorMemoryAllocation" in str(exc):
            raise torch.cuda.OutOfMemoryError(f"{exc} (also after torch.cuda.empty_cache())") from exc
        raise


# -- projection -------------------------------------------------------------------


def _aligned_row(k: int) -> int:
    """k rounded up to a multiple of SPLIT_ALIGN: 16-byte aligned rows of a 16-bit GEMM operand."""
    return -(-k // SPLIT_ALIGN) * SPLIT_ALIGN


def tensor_core_plan(n: int, d: int, r: int, b_dtype: torch.dtype) -> tuple[int, int] | None:
    """``(ld3, c_rows)`` of the tensor-core second product for an (n, d) B and rank r, or None for the FMA kernel.

    ld3 holds the three bf16 column blocks of the split operands (>= 3r, 16-byte rows);
    c_rows is how many output rows one GEMM fills (a multiple of 128 unless it is all n)
    so that the fp32 chunk C stays within TENSOR_CORE_CHUNK_BYTES.
    """
    if b_dtype not in (torch.float16, torch.bfloat16) or r < TENSOR_CORE_MIN_RANK:
        return None
    ld3 = _aligned_row(3 * r)
    rows = max(128, TENSOR_CORE_CHUNK_BYTES // (4 * d) // 128 * 128)
    return ld3, min(n, rows)


def _project_call(out: torch.Tensor, W: torch.Tensor | None, B: torch.Tensor, U: torch.Tensor, alpha: float):
    n, d = B.shape
    r = U.shape[1]
    acc = work_dtype(B.dtype)
    if out.untyped_storage().data_ptr() == B.untyped_storage().data_ptr() and (
        out.data_ptr() != B.data_ptr() or out.stride() != B.stride()
    ):
        # The output pass reads B while other threads write out: only an exact alias is safe.
        B = B.clone()
    B, ldb = _row_major(B)
    Uc, ldu = _row_major(U.to(acc) if U.dtype != acc else U)
    ext = load_extension()
    with torch.cuda.device(B.device):
        T = torch.empty(n, r, dtype=acc, device=B.device)
        half = B.dtype in (torch.float16, torch.bfloat16)
        ldh = _aligned_row(r)  # for the tensor-core GEMMs of B U
        u_hi = torch.empty(d, ldh, dtype=B.dtype, device=B.device) if half and r else None
        u_lo = torch.empty(d, ldh, dtype=B.dtype, device=B.device) if half and r else None
        plan = tensor_core_plan(n, d, r, B.dtype)
        ld3, c_rows = plan or (0, 0)
        t3 = torch.empty(n, ld3, dtype=torch.bfloat16, device=B.device) if plan else None
        u3 = torch.empty(d, ld3, dtype=torch.bfloat16, device=B.device) if plan else None
        C = torch.empty(c_rows, d, dtype=torch.float32, device=B.device) if plan else None
        _with_memory_retry(lambda: ext.project(
            out=out.data_ptr(), out_dtype=_DTYPE_CODES[out.dtype], os0=out.stride(0), os1=out.stride(1),
            W=0 if W is None else W.data_ptr(), ws0=0 if W is None else W.stride(0),
            ws1=1 if W is None else W.stride(1),
            B=B.data_ptr(), b_dtype=_DTYPE_CODES[B.dtype], ldb=ldb, U=Uc.data_ptr() if r else 0, ldu=ldu,
            n=n, d=d, r=r, alpha=alpha, T=T.data_ptr() if r else 0,
            u_hi=0 if u_hi is None else u_hi.data_ptr(), u_lo=0 if u_lo is None else u_lo.data_ptr(), ldh=ldh,
            t3=0 if t3 is None else t3.data_ptr(), u3=0 if u3 is None else u3.data_ptr(), ld3=ld3,
            C=0 if C is None else C.data_ptr(), c_rows=c_rows,
            stream=_stream(B.device),
        ))
    return out


def _check_project_args(B, U, alpha) -> float:
    # Values are not scanned here: the public entries (SphereProjector.apply / apply_) do that.
    val.check_matrix(B, "B", finite=False)
    val.check_cuda(B, "B")  # before U's device is compared with B's: the message then says what is wrong
    val.check_update(B, U, finite=False)
    return val.real_number(alpha, "alpha")


def project(B: torch.Tensor, U: torch.Tensor, alpha: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``B - alpha (B U) U^T`` in B's dtype, with fp32 accumulation (fp64 for fp64 B).

    fp16/bf16 B runs both products on tensor cores with split operands
    (:func:`tensor_core_plan`; below TENSOR_CORE_MIN_RANK the second runs as fp32 FMA).

    Parameters
    ----------
    B : (n, d) CUDA tensor, float16, bfloat16, float32 or float64.
    U : (d, r) float32 or float64 CUDA tensor (orthonormal columns).
    alpha : suppression strength.
    out : optional (n, d) tensor of B's dtype on B's device to write into.
    """
    alpha = _check_project_args(B, U, alpha)
    if out is None:
        out = torch.empty(B.shape, dtype=B.dtype, device=B.device)
    else:
        val.check_matrix(out, "out", finite=False, dtypes=(B.dtype,))
        val.check_same_shape(out=out, B=B)
        val.check_same_device(out=out, B=B)
        val.check_writable(out, "out")
    return _project_call(out, None, B, U, alpha)


def project_add_(W: torch.Tensor, B: torch.Tensor, U: torch.Tensor, alpha: float) -> torch.Tensor:
    """``W += B - alpha (B U) U^T`` in place, in W's dtype with fp32 accumulation; returns W.

    W is read and written once (one rounding to W's dtype). All checks run
    before W is touched.
    """
    alpha = _check_project_args(B, U, alpha)
    val.check_matrix(W, "W", finite=False)
    val.check_same_shape(W=W, B=B)
    val.check_same_device(W=W, B=B)
    val.check_writable(W, "W")
    return _project_call(W, W, B, U, alpha)

