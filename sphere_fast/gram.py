"""The normalised Gram of a weight matrix and its hyperspherical energy: torch twins.

These are the CPU path and the oracles the Triton kernels are tested against.
Rows are normalised as in the reference ``sparse_projection``:
``a_hat_i = a_i / (||a_i|| + 1e-8)`` (a zero row stays zero).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

NORM_EPS = 1e-8  # the reference's guard against zero rows

# Input precisions of the Gram's products. fp32: IEEE products (the default; keeps the
# fp32 contract). On a GPU, Triton can use tensor cores: tf32 (10-bit operands), tf32x3
# (operands split into two TF32 parts, three dots: close to fp32), bf16 (8-bit operands).
# 16-bit weights on the rows side always use tensor cores, with exact products. The
# torch backend always computes IEEE products.
PRECISIONS = ("fp32", "tf32", "tf32x3", "bf16")


@dataclass(frozen=True)
class NormalizedGram:
    """Gram of the unit-normalised rows of W (n x d), on the smaller side.

    side == "rows": ``gram = A_hat A_hat^T / n`` (n x n), used when n <= d;
    side == "cols": ``gram = A_hat^T A_hat / n`` (d x d), used when n > d.
    Both have the same non-zero eigenvalues, and ``trace`` (from the row
    norms, no eigensolve) is their sum.
    """

    gram: torch.Tensor  # fp32 (fp64 for fp64 input), symmetric, m x m
    row_norms: torch.Tensor  # ||a_i||, fp32 (fp64 for fp64 input), shape (n,)
    trace: float
    side: str
    n: int
    d: int

    @property
    def row_scale(self) -> torch.Tensor:
        """The diagonal D with A_hat = D A."""
        return 1.0 / (self.row_norms + NORM_EPS)


def gram_side(n: int, d: int) -> str:
    return "rows" if n <= d else "cols"


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; fp32, bf16 and fp16 are computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ieee_fp32_matmul():
    """fp32 matrix products inside run in full IEEE fp32, whatever the caller set.

    ``torch.backends.cuda.matmul.allow_tf32`` / ``set_float32_matmul_precision("high")``
    would otherwise put them on TF32 on a GPU (10 explicit mantissa bits: unit roundoff
    2^-11, about 4.9e-4, per product), and "medium" on bf16 in oneDNN on a CPU, against
    the 1e-5 fp32 contract. The caller's settings are restored when the last window
    closes (:func:`fp32_matmul`). Also a decorator.
    """
    return fp32_matmul("ieee")


_LEGACY_PRECISION = {"ieee": "highest", "tf32": "high"}
# torch's switches are process-wide, and the editor fits projectors on a background thread
# while the main thread refits and applies: windows from any thread are counted, the first
# to open saves the caller's settings and the last to close restores them.
_windows_lock = threading.Lock()
_open_windows = {"ieee": 0, "tf32": 0}
_callers_settings: dict[str, str] = {}


def _per_backend_switches() -> dict:
    """The per-backend fp32 matmul switches (torch >= 2.9); empty where only the legacy one exists."""
    found = {name: b.matmul for name, b in (("cuda", torch.backends.cuda), ("mkldnn", torch.backends.mkldnn))}
    return {name: m for name, m in found.items() if hasattr(m, "fp32_precision")}


def _read_settings() -> dict[str, str]:
    switches = _per_backend_switches()
    if not switches:
        return {"legacy": torch.get_float32_matmul_precision()}
    return {name: m.fp32_precision for name, m in switches.items()}


def _mode_settings(mode: str) -> dict[str, str]:
    """What ``mode`` sets: "ieee" on cuBLAS and oneDNN, "tf32" on cuBLAS only."""
    switches = _per_backend_switches()
    if not switches:
        return {"legacy": _LEGACY_PRECISION[mode]}
    names = ("cuda", "mkldnn") if mode == "ieee" else ("cuda",)
    return {name: mode for name in names if name in switches}


def _write_settings(settings: dict[str, str]) -> None:
    switches = _per_backend_switches()
    for name, value in settings.items():
        if name == "legacy":
            torch.set_float32_matmul_precision(value)
        else:
            switches[name].fp32_precision = value


def _settings_for_open_windows() -> dict[str, str]:
    """The caller's settings, overridden by the open modes; "ieee" outranks "tf32" (the contract
    outranks a benchmark's TF32 baseline)."""
    settings = dict(_callers_settings)
    for mode in ("tf32", "ieee"):
        if _open_windows[mode]:
            settings.update(_mode_settings(mode))
    return settings


@contextlib.contextmanager
def fp32_matmul(mode: str):
    """torch's fp32 matmul precision set to ``mode`` inside; the caller's is back once no window is open.

    "ieee": full fp32 on cuBLAS and oneDNN; "tf32": TF32 tensor cores on cuBLAS
    (the benchmarks' unfused baseline). torch < 2.9 has only the legacy switch.
    Windows may nest and overlap across threads: while any "ieee" window is open,
    fp32 products run in IEEE fp32 on every thread. A setting the caller changes
    while a window is open is replaced by the one saved when the first opened.
    """
    if mode not in _LEGACY_PRECISION:
        raise ValueError(f"mode must be one of {sorted(_LEGACY_PRECISION)}, got {mode!r}")
    with _windows_lock:
        if not any(_open_windows.values()):
            _callers_settings.clear()
            _callers_settings.update(_read_settings())
        _open_windows[mode] += 1
    try:
        with _windows_lock:
            _write_settings(_settings_for_open_windows())
        yield
    finally:
        with _windows_lock:
            _open_windows[mode] -= 1
            _write_settings(_settings_for_open_windows())
            if not any(_open_windows.values()):
                _callers_settings.clear()


def trace_from_norms(row_norms: torch.Tensor) -> float:
    """trace(G) = sum_i ||a_hat_i||^2 / n, known without any eigensolve."""
    norms = row_norms.double()
    return float(((norms / (norms + NORM_EPS)) ** 2).sum() / norms.numel())


@ieee_fp32_matmul()
def normalized_gram_reference(
    W: torch.Tensor, *, precision: str = "fp32", dtype: torch.dtype | None = None
) -> NormalizedGram:
    """Torch twin of the fused Gram kernel, and the torch backend of :func:`sphere_fast.normalized_gram`.

    Its products are always IEEE (fp64 for fp64 W): ``precision`` chooses among the
    Triton kernel's tensor-core modes and is accepted so that every backend takes
    the same arguments. ``dtype`` overrides the working precision.
    """
    dtype = dtype or work_dtype(W.dtype)
    n, d = W.shape
    A = W.to(dtype)
    norms = torch.linalg.vector_norm(A, dim=1)
    A_hat = A / (norms + NORM_EPS).unsqueeze(1)
    side = gram_side(n, d)
    G = symmetric_product(A_hat if side == "rows" else A_hat.T).div_(n)
    return NormalizedGram(G, norms, trace_from_norms(norms), side, n, d)


def symmetric_product(X: torch.Tensor, block: int = 256) -> torch.Tensor:
    """X X^T from its upper block rows only, mirrored: exactly symmetric, ~9/16 of the flops at 8 blocks.

    The block size trades the two costs: smaller blocks waste fewer flops below
    the diagonal, larger ones run GEMM better (256 suits CPU BLAS).
    """
    m = X.shape[0]
    G = torch.empty(m, m, dtype=X.dtype, device=X.device)
    for i in range(0, m, block):
        G[i:i + block, i:] = X[i:i + block] @ X[i:].T
    return torch.triu(G).add_(torch.triu(G, 1).T)


@ieee_fp32_matmul()
def hyperspherical_energy_reference(
    W: torch.Tensor, s: float = 2.0, eps: float = 1e-6, *, block_rows: int = 1024, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Eq. 6 of the paper: sum over i != j of (2 - 2 cos theta_ij + eps)^(-s/2).

    Row blocks of ``block_rows`` keep memory at block_rows x n; the sum is
    accumulated in float64. Returns a 0-d float64 tensor on W's device.
    """
    dtype = dtype or work_dtype(W.dtype)
    n = W.shape[0]
    A = W.to(dtype)
    A_hat = A / (torch.linalg.vector_norm(A, dim=1) + NORM_EPS).unsqueeze(1)
    total = torch.zeros((), dtype=torch.float64, device=W.device)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        cos = A_hat[start:stop] @ A_hat.T
        dist2 = (2.0 - 2.0 * cos).clamp_min_(0.0)
        terms = (dist2 + eps).pow_(-s / 2.0)
        rows = torch.arange(start, stop, device=W.device)
        terms[rows - start, rows] = 0.0
        total += terms.sum(dtype=torch.float64)
    return total
