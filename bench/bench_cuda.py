"""Benchmarks of the CUDA extension (GPU only; skipped elsewhere, with the reason).

    pytest bench/bench_cuda.py --benchmark-json bench/results/cuda.json

* eigensolver: ``sphere_fast._cuda.top_eigenpairs`` on m x m Grams with decaying
  spectra (m = 3584, 4096, 5120: the Gram side of Qwen2.5-7B, Llama3-8B and
  Qwen2.5-32B down_proj), cold and warm (after a rank-8 edit), against
  ``torch.linalg.eigh`` of the same Gram;
* fit + apply and warm refit + apply of ``SphereProjector`` on the CUDA backend
  against the reference ``sparse_projection`` (tests/reference.py) at the
  down_proj shapes [4096 x 14336], [3584 x 18944], [5120 x 27648].

Each benchmark records in extra_info the rank, the path taken and the peak GPU
memory it needed beyond its inputs: torch's allocator peak plus the extension's
cudaMallocAsync pool peak.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sphere_fast import SphereProjector, _cuda  # noqa: E402
from sphere_fast.gram import normalized_gram_reference  # noqa: E402
from tests.reference import sparse_projection_reference  # noqa: E402
from tests.test_cuda_ext import extension_status  # noqa: E402


_SKIP = extension_status()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

ETA, ALPHA = 0.5, 0.8
GRAM_SIZES = {3584: 18944, 4096: 14336, 5120: 27648}  # m -> d of the model it stands for
MODELS = {"llama3-8b": (4096, 14336), "qwen2.5-7b": (3584, 18944), "qwen2.5-32b": (5120, 27648)}


def realistic_weight(n: int, d: int, *, seed: int = 0) -> torch.Tensor:
    """fp32 weight on the GPU: a power-law spectrum over a noise bulk, like trained FFN weights."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = 512
    left = torch.randn(n, k, generator=g, device="cuda")
    right = torch.randn(k, d, generator=g, device="cuda")
    scale = torch.arange(1, k + 1, device="cuda", dtype=torch.float32) ** -0.75
    W = (left * scale) @ right / math.sqrt(k)
    W += 0.05 * torch.randn(n, d, generator=g, device="cuda")
    return W


def edit(W: torch.Tensor, *, rank: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(W.shape[0], rank, generator=g, device="cuda")
    b = torch.randn(rank, W.shape[1], generator=g, device="cuda")
    return W + 0.01 * (a @ b) / math.sqrt(W.shape[1])


def peak_extra_bytes(fn) -> int:
    """Peak GPU memory fn needs beyond what is allocated before it runs."""
    ext = _cuda.load_extension()
    device = torch.cuda.current_device()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ext.mempool_used(device, True)
    result = fn()
    torch.cuda.synchronize()
    torch_peak = torch.cuda.max_memory_allocated() - base
    pool_peak = ext.mempool_used(device, False)[1]
    del result
    return int(torch_peak + pool_peak)


def timed(benchmark, fn, *, rounds: int):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)


# -- eigensolver ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(GRAM_SIZES), ids=lambda m: f"m{m}")
def grams(request):
    m = request.param
    W0 = realistic_weight(m, GRAM_SIZES[m])
    g0 = normalized_gram_reference(W0)
    g1 = normalized_gram_reference(edit(W0))
    del W0
    yield m, g0, g1
    torch.cuda.empty_cache()


@pytest.mark.parametrize("start", ["cold", "warm"])
def test_eigensolver_cuda(benchmark, grams, start):
    m, g0, g1 = grams
    init = None
    if start == "warm":
        init = _cuda.top_eigenpairs(g0.gram, g0.trace, ETA).vectors
    solve = lambda: _cuda.top_eigenpairs(g1.gram, g1.trace, ETA, init=init, return_stats=True)  # noqa: E731
    pairs, stats = timed(benchmark, solve, rounds=5)
    benchmark.extra_info.update(
        m=m, start=start, rank=pairs.values.numel(), method=stats["method"], iterations=stats["iterations"],
        tf32_iterations=stats["tf32_iterations"], block_size=stats["block_size"],
        captured=float(pairs.values.sum()) / g1.trace, peak_extra_bytes=peak_extra_bytes(solve),
    )


def test_eigensolver_torch_eigh(benchmark, grams):
    m, _, g1 = grams
    timed(benchmark, lambda: torch.linalg.eigh(g1.gram), rounds=3)
    benchmark.extra_info.update(m=m, peak_extra_bytes=peak_extra_bytes(lambda: torch.linalg.eigh(g1.gram)))


# -- fit + apply, refit ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(MODELS), ids=str)
def model_weight(request):
    n, d = MODELS[request.param]
    W = realistic_weight(n, d, seed=2)
    B = 1e-3 * torch.randn(n, d, generator=torch.Generator(device="cuda").manual_seed(3), device="cuda")
    yield request.param, W, B
    torch.cuda.empty_cache()


def test_fit_apply_cuda(benchmark, model_weight):
    name, W, B = model_weight

    def fit_apply():
        proj = SphereProjector.fit(W, ETA, ALPHA, backend="cuda")
        return proj, proj.apply(B)

    proj, _ = timed(benchmark, fit_apply, rounds=3)
    n, d = W.shape
    benchmark.extra_info.update(
        model=name, shape=[n, d], rank=proj.rank, method=proj.method,
        apply_gflop=4.0 * n * d * proj.rank / 1e9, peak_extra_bytes=peak_extra_bytes(fit_apply),
    )


def test_refit_apply_cuda(benchmark, model_weight):
    name, W, B = model_weight
    proj = SphereProjector.fit(W, ETA, ALPHA, backend="cuda")
    W1 = edit(W)

    def refit_apply():
        proj.refit(W1)
        return proj.apply(B)

    timed(benchmark, refit_apply, rounds=3)
    benchmark.extra_info.update(
        model=name, rank=proj.rank, method=proj.method, peak_extra_bytes=peak_extra_bytes(refit_apply)
    )


def test_fit_apply_reference(benchmark, model_weight):
    name, W, B = model_weight
    run = lambda: sparse_projection_reference(W, B, ETA, ALPHA)  # noqa: E731
    _, _, U = timed(benchmark, run, rounds=1)
    benchmark.extra_info.update(model=name, rank=U.shape[1], peak_extra_bytes=peak_extra_bytes(run))
