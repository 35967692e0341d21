"""Benchmarks run with pytest-benchmark: python -m pytest bench/ --benchmark-json=OUT.json

Puts bench/ and the repository root on sys.path (for ``benchutil``) and, without a GPU, sets
TRITON_INTERPRET before any kernel module is imported. Benchmarks import nothing from tests/:
what both need lives in the package (sphere_fast.reference, sphere_fast.accuracy, sphere_fast.synthetic).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
