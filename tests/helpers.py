"""Helpers shared by the core tests: the devices Triton kernels run on, and test matrices.

The reference algorithm and its float64 oracle are in :mod:`sphere_fast.reference`,
the accuracy contract's bounds in :mod:`sphere_fast.accuracy` (the benchmarks use
them too). TRITON_INTERPRET is set in tests/conftest.py, before anything imports
triton.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def _kernels_interpreting() -> bool:
    """Whether sphere_fast.kernels run on the Triton interpreter (decided when first imported)."""
    if importlib.util.find_spec("triton") is None:
        return False
    from sphere_fast.kernels.tiles import interpreting

    return interpreting()


INTERPRETING = _kernels_interpreting()
if INTERPRETING:
    CPU_SKIP = None
elif HAS_CUDA:
    CPU_SKIP = "CUDA is available: the kernels were compiled for the GPU, not the interpreter"
else:
    CPU_SKIP = (
        "sphere_fast.kernels was imported before TRITON_INTERPRET=1 was set (or it is set to 0); "
        "run these tests with TRITON_INTERPRET=1 in the environment"
    )
CUDA_SKIP = None if HAS_CUDA and not INTERPRETING else (
    "no CUDA device" if not HAS_CUDA else "TRITON_INTERPRET=1 is set: kernels run on the interpreter only"
)


def _device_param(device: str):
    if device == "cpu":
        marks = [pytest.mark.triton_interpret] + ([pytest.mark.skip(reason=CPU_SKIP)] if CPU_SKIP else [])
    else:
        marks = [pytest.mark.cuda] + ([pytest.mark.skip(reason=CUDA_SKIP)] if CUDA_SKIP else [])
    return pytest.param(device, marks=marks, id=device)


# Devices for Triton kernel tests: CPU tensors under the interpreter, CUDA tensors on a GPU.
DEVICES = [_device_param("cpu"), _device_param("cuda")]
CUDA_DEVICES = [d for d in DEVICES if d.values[0] == "cuda"]

LAYOUTS = ("contiguous", "transposed", "col_strided", "row_strided")


def make_matrix(n: int, d: int, dtype: torch.dtype, device: str, layout: str = "contiguous", *, seed: int = 0,
                zero_rows: tuple[int, ...] = ()) -> torch.Tensor:
    """An n x d matrix with row norms spread over four decades, in the requested memory layout.

    transposed: W = M.T of a contiguous d x n M (unit stride along rows);
    col_strided: W = M[:, ::2]; row_strided: W = M[::3] (views, never copies).
    """
    g = torch.Generator().manual_seed(seed)
    rows_needed = 3 * n if layout == "row_strided" else n
    cols_needed = 2 * d if layout == "col_strided" else d
    base = torch.randn(rows_needed, cols_needed, generator=g, dtype=torch.float64)
    base *= torch.logspace(-2, 2, rows_needed, dtype=torch.float64)[torch.randperm(rows_needed, generator=g)][:, None]
    if layout == "transposed":
        W = base.T.contiguous().to(dtype).to(device).T
    else:
        W = base.to(dtype).to(device)
        if layout == "col_strided":
            W = W[:, ::2]
        elif layout == "row_strided":
            W = W[::3]
    W = W.clone() if layout == "contiguous" else W
    for i in zero_rows:
        W[i] = 0
    assert W.shape == (n, d)
    return W
