"""Benchmarks of the CUDA extension's eigensolver and fused update (GPU only; skipped elsewhere, with the reason).

    pytest bench/bench_cuda.py --benchmark-json bench/results/cuda.json

The ``cuda`` backend's ``top_eigenpairs`` on the m x m normalised Gram of a synthetic weight
(m = 3584, 4096, 5120: the Gram side of Qwen2.5-7B, Llama3-8B and Qwen2.5-32B down_proj), for a
flat 'decaying' spectrum (what real weights look like: the dense path) and a 'steep' one (the
block method), in three cases measured in one run:
  cold        auto method, no start
  warm        auto method, started from the cold basis of W, on W + a realistic per-batch change
              (rank 100, 3 % of ||W||_F)
  torch_eigh  ``torch.linalg.eigh`` of the same changed Gram: the baseline the ratios use
Each records in extra_info the rank, the path taken (method, iterations, TF32 iterations, block)
and the peak GPU memory its timed rounds needed beyond their inputs (torch's allocator peak plus
the extension's cudaMallocAsync pool peak).

The fused update ``W += B - alpha (B U) U^T`` (``apply_``) at the down_proj shapes of Llama3-8B and
Qwen2.5-32B, for bf16 and fp32 weights and ranks on both sides of the tensor-core switch
(bf16 from r = 64 on; fp32 always runs FMA), in two cases measured in one run: ``cuda`` (the
extension) and ``torch`` (the torch backend, the baseline the ratios use; fp32 products).

The whole projection (Gram, solve, lift, apply) against the reference is measured in
bench_projection.py, with the reference run once per shape.
"""
from __future__ import annotations

import pytest
import torch

from benchutil import PeakMemory, cuda_extension_skip_reason, sync
from sphere_fast.backends import load_implementation
from sphere_fast.ops import normalized_gram
from sphere_fast.synthetic import low_rank_change, synthetic_weight

_SKIP = cuda_extension_skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

ETA = 0.5
GRAM_SIZES = {3584: 18944, 4096: 14336, 5120: 27648}  # m -> d of the model it stands for
SPECTRA = ["decaying", "steep"]
CASES = ["cold", "warm", "torch_eigh"]
BATCH_RANK, CHANGE_RELATIVE = 100, 0.03


# The extension's eigensolver whatever SPHERE_FAST_BACKEND says (it also takes return_stats); importing it
# loads no extension.
cuda_top_eigenpairs = load_implementation("eigensolver", "cuda")
APPLY_SHAPES = {"llama3-8b": (4096, 14336), "qwen2.5-32b": (5120, 27648)}  # down_proj, n x d
APPLY_RANKS = (12, 64, 778)  # a steep spectrum's r, the tensor-core switch, the decaying Llama3-8B r
APPLY_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
APPLY_ALPHA = 0.5


@pytest.fixture(scope="module", params=[(m, s) for m in sorted(GRAM_SIZES) for s in SPECTRA],
                ids=lambda p: f"m{p[0]}-{p[1]}")
def grams(request):
    m, spectrum = request.param
    W0 = synthetic_weight(m, GRAM_SIZES[m], spectrum=spectrum, dtype=torch.float32, device="cuda")
    W1 = W0 + low_rank_change(W0, rank=BATCH_RANK, relative=CHANGE_RELATIVE, seed=3)
    g0, g1 = normalized_gram(W0), normalized_gram(W1)
    del W0, W1
    start = cuda_top_eigenpairs(g0.gram, g0.trace, ETA).vectors
    yield m, spectrum, g1, start
    torch.cuda.empty_cache()


@pytest.mark.parametrize("case", CASES)
def test_eigensolver(benchmark, grams, case):
    m, spectrum, g1, start = grams
    benchmark.group = f"eigensolver m{m} {spectrum}"
    if case == "torch_eigh":
        solve = lambda: (torch.linalg.eigh(g1.gram), None)  # noqa: E731
    else:
        init = start if case == "warm" else None
        solve = lambda: cuda_top_eigenpairs(g1.gram, g1.trace, ETA, init=init, return_stats=True)  # noqa: E731

    def run():
        out = solve()
        sync("cuda")
        return out

    with PeakMemory("cuda") as peak:
        pairs, stats = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(kind="eigensolver", case=case, m=m, d=GRAM_SIZES[m], spectrum=spectrum,
                                peak_extra_bytes=peak.bytes)
    if stats is not None:
        benchmark.extra_info.update(
            rank=pairs.values.numel(), method=stats["method"], iterations=stats["iterations"],
            tf32_iterations=stats["tf32_iterations"], block_size=stats["block_size"],
            captured=float(pairs.values.sum()) / g1.trace,
        )


@pytest.fixture(scope="module", params=list(APPLY_SHAPES))
def apply_operands(request):
    n, d = APPLY_SHAPES[request.param]
    g = torch.Generator(device="cuda").manual_seed(0)
    B = torch.randn(n, d, generator=g, device="cuda")
    W = torch.randn(n, d, generator=g, device="cuda")
    U = torch.linalg.qr(torch.randn(d, max(APPLY_RANKS), generator=g, device="cuda"))[0]
    yield request.param, W, B, U
    del W, B, U
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", list(APPLY_DTYPES))
@pytest.mark.parametrize("r", APPLY_RANKS)
@pytest.mark.parametrize("case", ["cuda", "torch"])
def test_apply(benchmark, apply_operands, dtype, r, case):
    model, W32, B32, U_all = apply_operands
    W, B, U = W32.to(APPLY_DTYPES[dtype]), B32.to(APPLY_DTYPES[dtype]), U_all[:, :r].contiguous()
    apply_ = load_implementation("apply_", case)
    benchmark.group = f"apply {model} {dtype} r{r}"

    def run():
        apply_(W, B, U, APPLY_ALPHA)  # W drifts over the rounds; the cost does not depend on its values
        sync("cuda")

    with PeakMemory("cuda") as peak:
        benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(kind="apply", case=case, model=model, shape=list(W.shape), dtype=dtype, r=r,
                                peak_extra_bytes=peak.bytes)
