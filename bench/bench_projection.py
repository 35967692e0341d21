"""SPHERE's projection: the reference against sphere_fast, measured in one run.

Cases per (shape, spectrum), all fp32:
  reference        the README's sparse_projection (d x d Gram, full eigh, dense P)
  sparse_projection  the drop-in (also forms the dense P_soft, as the reference returns it)
  fit_apply        SphereProjector.fit + apply (what the editing layer runs)
  refit            SphereProjector.refit after a rank-100 change (||dW|| = 1e-3 ||W||),
                   warm-started from the previous fit
Weights come from sphere_fast.synthetic (gaussian, and power-law 'decaying'
spectra like trained FFN weights). bench/report.py turns the JSON into ratios.

    python -m pytest bench/bench_projection.py --benchmark-json bench/results/<name>.json
"""
from __future__ import annotations

import copy

import pytest
import torch

from sphere_fast import SphereProjector, sparse_projection
from sphere_fast.synthetic import low_rank_change, synthetic_weight
from tests.reference import sparse_projection_reference

CPU_SHAPES = [(512, 1792), (1024, 3584), (2048, 7168)]
GPU_SHAPES = [(4096, 14336), (3584, 18944), (5120, 27648)]  # Llama3-8B, Qwen2.5-7B, Qwen2.5-32B down_proj
SPECTRA = ["steep", "decaying", "gaussian"]
CASES = ["reference", "sparse_projection", "fit_apply", "refit"]


def shape_params():
    params = [pytest.param("cpu", s, id=f"cpu-{s[0]}x{s[1]}") for s in CPU_SHAPES]
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for s in GPU_SHAPES:
        marks = () if torch.cuda.is_available() else (skip,)
        params.append(pytest.param("cuda", s, id=f"cuda-{s[0]}x{s[1]}", marks=marks))
    return params


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


_inputs = {}


def inputs(device, shape, spectrum):
    key = (device, shape, spectrum)
    if key not in _inputs:
        _inputs.clear()  # hold one shape at a time
        W = synthetic_weight(*shape, spectrum=spectrum, dtype=torch.float32, device=device)
        B = low_rank_change(W, rank=100, relative=1e-3, seed=2)
        _inputs[key] = (W, B, W + low_rank_change(W, rank=100, relative=1e-3, seed=3))
    return _inputs[key]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("device, shape", shape_params())
def test_projection(benchmark, device, shape, spectrum, case):
    W, B, W_next = inputs(device, shape, spectrum)
    benchmark.group = f"{device}-{shape[0]}x{shape[1]}-{spectrum}"
    benchmark.extra_info.update(case=case, device=device, shape=list(shape), spectrum=spectrum, dtype="float32")
    rounds = 1 if case == "reference" and shape[0] * shape[1] >= 1024 * 3584 else 3

    if case in ("reference", "sparse_projection"):
        project = sparse_projection_reference if case == "reference" else sparse_projection

        def run():
            out = project(W, B, 0.5, 0.5)
            sync(device)
            return out
        # the reference is too slow to warm up at the larger shapes
        result = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=int(case != "reference"))
        benchmark.extra_info["rank"] = result[2].shape[1]
    elif case == "fit_apply":
        def run():
            projector = SphereProjector.fit(W, 0.5, 0.5)
            out = projector.apply(B)
            sync(device)
            return projector, out
        projector, _ = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
        benchmark.extra_info.update(rank=projector.rank, method=projector.method)
    else:
        fitted = SphereProjector.fit(W, 0.5, 0.5)

        def setup():
            return (copy.copy(fitted),), {}

        def run(projector):
            projector.refit(W_next)
            sync(device)
            return projector

        projector = benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)
        benchmark.extra_info.update(rank=projector.rank, method=projector.method)
