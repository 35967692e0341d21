"""Loader for the compiled CUDA extension ``sphere_fast._C``.

Importing ``sphere_fast`` never loads it; the first call that needs it does,
and a missing or broken build raises an ImportError that says what was looked
for and how to build it.
"""
from __future__ import annotations

import functools
import importlib
import os

BUILD_HINT = (
    "build it on a machine with nvcc and a CUDA build of torch: "
    "SPHERE_FAST_BUILD_CUDA=1 pip install -e . (see README, 'CUDA extension')"
)


@functools.lru_cache(maxsize=None)
def load_extension():
    """The ``sphere_fast._C`` module, or an ImportError with a diagnostic."""
    try:
        return importlib.import_module("sphere_fast._C")
    except ImportError as exc:
        here = os.path.dirname(os.path.abspath(__file__))
        raise ImportError(
            f"the CUDA extension sphere_fast._C was not found or failed to load "
            f"(looked in {here}: {exc}); {BUILD_HINT}"
        ) from exc
