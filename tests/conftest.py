"""Shared test set-up: the Triton interpreter on machines without a GPU, and the ``device``,
``one_thread``, ``tok`` and ``stats_cache`` fixtures.

TRITON_INTERPRET must be set before triton or any kernel module is imported
(``@triton.jit`` picks the interpreter when it decorates), so it is set here,
in the first module pytest loads, and nowhere else. Helpers shared by the
tests are in tests/helpers.py.

Importing sphere_fast next keeps the checkout's kernels/ folder from hiding the Hugging Face
``kernels`` package that transformers imports (sphere_fast._checkout).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sphere_fast  # noqa: E402,F401  (before transformers: see the module docstring)


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """cpu always; cuda where present, else skipped with the reason."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests (the test machines' cores are shared; two contended threads
    are several times slower than one). Modules ask for it with ``pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    """The tiny tokenizer of tests/editing/fixtures.py with a Llama-style BOS (targets must not pick it up),
    one per module."""
    from tests.editing.fixtures import tiny_tokenizer

    return tiny_tokenizer(bos=True)


@pytest.fixture(scope="module")
def stats_cache(tmp_path_factory):
    """A folder for the Editor's C0 statistics (``cache_dir``), shared by a module's tests so each is computed
    once."""
    return tmp_path_factory.mktemp("stats")
