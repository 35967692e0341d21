"""Running from a source checkout: its kernels/ folder must not hide the Hugging Face ``kernels`` package.

The Triton kernels live in ``<checkout>/kernels`` and install as ``sphere_fast.kernels``. When the
checkout root is on ``sys.path`` (``python -m`` or pytest started there), a plain ``import kernels``
finds that folder instead of the Hugging Face package of that name, which transformers imports
whenever it is installed (5.25 and later require it). Importing the real one first, from every
path but the checkout root, puts it in ``sys.modules`` where transformers will find it.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def import_hub_kernels_first() -> None:
    if "kernels" in sys.modules or not (CHECKOUT / "kernels" / "__init__.py").exists():
        return
    shadowing = [p for p in sys.path if Path(p or ".").resolve() == CHECKOUT]
    if not shadowing:
        return
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return  # not installed: transformers does not look for it either
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if p not in shadowing]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass
    finally:
        sys.path[:] = saved
