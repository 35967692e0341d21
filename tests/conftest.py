"""Shared test set-up: devices, and the Triton interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton or any kernel module is imported,
so it is set here, in the first module pytest loads.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_params():
    """cpu always; cuda where present, else a skipped parameter that says why."""
    params = [pytest.param("cpu", id="cpu")]
    if torch.cuda.is_available():
        params.append(pytest.param("cuda", id="cuda"))
    else:
        params.append(pytest.param("cuda", id="cuda", marks=pytest.mark.skip(reason="no CUDA device on this machine")))
    return params


@pytest.fixture(params=device_params())
def device(request):
    return torch.device(request.param)
