"""Shared test set-up: the Triton interpreter on machines without a GPU, and the ``device`` fixture.

TRITON_INTERPRET must be set before triton or any kernel module is imported
(``@triton.jit`` picks the interpreter when it decorates), so it is set here,
in the first module pytest loads, and nowhere else. Helpers shared by the
tests are in tests/helpers.py.

pytest puts the repository root first on sys.path, where the kernels/ folder
(installed as sphere_fast.kernels) would shadow the Hugging Face ``kernels``
package that transformers (5.25 and later) imports whenever it is installed;
that package is imported here first, from everywhere but the root.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _import_hub_kernels() -> None:
    root = Path(__file__).resolve().parents[1]
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass  # not installed: transformers does not look for it either
    finally:
        sys.path[:] = saved


_import_hub_kernels()


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """cpu always; cuda where present, else skipped with the reason."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    return torch.device(request.param)
