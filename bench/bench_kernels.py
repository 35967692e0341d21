"""Benchmarks of the Triton kernels (GPU only; skipped elsewhere, with the reason).

    pytest bench/bench_kernels.py --benchmark-json bench/results/kernels.json

* ``normalized_gram`` (row norms + rows-side Gram, one triangle of tiles) and
  ``hyperspherical_energy`` at the down_proj shapes [4096 x 14336] (Llama3-8B)
  and [5120 x 27648] (Qwen2.5-32B), bf16 and fp32 weights, each precision
  that applies (bf16 weights: tensor cores, exact products; fp32 weights:
  IEEE fp32 and TF32), beside torch's unfused equivalent in the same
  precision: for the Gram ``W / norms`` then one matmul (:func:`unfused_gram`,
  which follows torch's TF32 switch, as the package's torch twin deliberately
  does not); for the energy the package's torch twin
  (``sphere_fast.gram.hyperspherical_energy_reference``) in one block of rows.

extra_info per benchmark: kind ("gram" / "energy"), case (the impl), model, dtype, precision, the FLOPs of the Gram as a full GEMM (``2 n^2 d``;
the kernels execute about half of it, one triangle) and the TFLOP/s that
gives, the compulsory bytes (W once, the output once) and GB/s, and the
device's dense peak for the precision used with the fraction reached.
"""
from __future__ import annotations

import pytest
import torch

from sphere_fast.gram import NORM_EPS, fp32_matmul, hyperspherical_energy_reference


def _why_skip() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device on this machine"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    import os

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: the kernels would run on the interpreter, not the GPU"
    return None


_SKIP = _why_skip()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

if _SKIP is None:
    from sphere_fast.kernels.hyperspherical_energy import hyperspherical_energy
    from sphere_fast.kernels.normalized_gram import normalized_gram

MODELS = {"llama3-8b": (4096, 14336), "qwen2.5-32b": (5120, 27648)}
# (weight dtype, kernel precision): bf16 weights feed the tensor cores as loaded
CASES = [("bf16", "fp32"), ("fp32", "fp32"), ("fp32", "tf32"), ("fp32", "tf32x3")]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Dense peaks in TFLOP/s by (device name fragment, math used); None where unknown.
# tf32x3 does three TF32 products per useful one: a third of the TF32 peak.
PEAKS = {
    "H200": {"bf16": 989.0, "tf32": 494.0, "tf32x3": 494.0 / 3, "fp32": 67.0},
    "H100": {"bf16": 989.0, "tf32": 494.0, "tf32x3": 494.0 / 3, "fp32": 67.0},
    "A100": {"bf16": 312.0, "tf32": 156.0, "tf32x3": 156.0 / 3, "fp32": 19.5},
}
ENERGY_S, ENERGY_EPS = 2.0, 1e-6


def math_used(dtype: str, precision: str) -> str:
    return "bf16" if dtype == "bf16" else precision


def device_peak(math: str) -> float | None:
    name = torch.cuda.get_device_name()
    for fragment, peaks in PEAKS.items():
        if fragment in name:
            return peaks[math]
    return None


def weight(n: int, d: int, dtype: torch.dtype, *, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    W = torch.randn(n, d, generator=g, device="cuda", dtype=torch.float32)
    W *= torch.rand(n, 1, generator=g, device="cuda") + 0.5  # uneven row norms
    return W.to(dtype)


def run(benchmark, fn, *, n: int, d: int, out_bytes: int, elem: int, math: str, impl: str, rounds: int = 10,
        **info):
    fn()  # compile / autotune outside the timed rounds
    torch.cuda.synchronize()

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=2)
    seconds = benchmark.stats.stats.median
    flops = 2.0 * n * n * d
    moved = n * d * elem + out_bytes
    peak = device_peak(math)
    tflops = flops / seconds / 1e12
    benchmark.extra_info.update(
        info,
        case=impl,
        impl=impl,
        shape=[n, d],
        math=math,
        device=torch.cuda.get_device_name(),
        flops_full_gemm=flops,
        tflops=tflops,
        bytes_compulsory=moved,
        gbps=moved / seconds / 1e9,
        peak_tflops=peak,
        fraction_of_peak=None if peak is None else tflops / peak,
    )


def unfused_gram(W: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's unfused Gram in ``dtype``: ``A_hat = W / (||w_i|| + 1e-8)``, then one matmul on the smaller side."""
    n, d = W.shape
    A = W.to(dtype)
    norms = torch.linalg.vector_norm(A, dim=1)
    A_hat = A / (norms + NORM_EPS).unsqueeze(1)
    G = (A_hat @ A_hat.T) if n <= d else (A_hat.T @ A_hat)
    return G / n, norms


def torch_matmul_precision(precision: str):
    """torch's fp32 matmul precision matching the kernel's: TF32 for "tf32", else IEEE fp32 (restored on exit)."""
    return fp32_matmul("tf32" if precision == "tf32" else "ieee")


@pytest.mark.parametrize("dtype,precision", CASES, ids=[f"{a}-{b}" for a, b in CASES])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gram(benchmark, impl, model, dtype, precision):
    n, d = MODELS[model]
    W = weight(n, d, DTYPES[dtype])
    benchmark.group = f"gram {model} {dtype}-{precision}"
    if impl == "triton":
        fn = lambda: normalized_gram(W, precision=precision)  # noqa: E731
    else:
        compute = torch.bfloat16 if dtype == "bf16" else torch.float32
        fn = lambda: unfused_gram(W, compute)  # noqa: E731
    with torch_matmul_precision(precision):
        run(benchmark, fn, n=n, d=d, out_bytes=4 * n * n, elem=W.element_size(),
            math=math_used(dtype, precision), impl=impl, kind="gram", model=model, dtype=dtype, precision=precision)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_energy(benchmark, impl, model, dtype):
    n, d = MODELS[model]
    W = weight(n, d, DTYPES[dtype])
    benchmark.group = f"energy {model} {dtype}"
    if impl == "triton":
        fn = lambda: hyperspherical_energy(W, s=ENERGY_S, eps=ENERGY_EPS)  # noqa: E731
    else:
        compute = torch.bfloat16 if dtype == "bf16" else torch.float32
        fn = lambda: hyperspherical_energy_reference(W, ENERGY_S, ENERGY_EPS, block_rows=n, dtype=compute)  # noqa: E731
    with torch_matmul_precision("fp32"):
        run(benchmark, fn, n=n, d=d, out_bytes=8, elem=W.element_size(),
            math=math_used(dtype, "fp32"), impl=impl, rounds=5, kind="energy", model=model, dtype=dtype,
            precision="fp32")
