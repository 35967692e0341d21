"""Benchmarks run with pytest-benchmark: python -m pytest bench/ --benchmark-json=OUT.json"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
