"""SPHERE's projection: the reference against sphere_fast, measured in one run.

Cases per (device, shape, spectrum), all fp32; B is the update being projected (rank 100,
1e-3 ||W||_F) and W_next = W + a realistic per-batch change (rank 100 = the batch size, 3 % of
||W||_F):
  reference          the README's sparse_projection (d x d Gram, full eigh, dense P), on the
                     'decaying' spectrum only: its cost is the d x d eigh, whatever the spectrum;
                     run once per shape at the large shapes, never as a warm-up
  sparse_projection  the drop-in (also forms the dense P_soft, as the reference returns it)
  fit_apply          SphereProjector.fit(W) + apply(B): what the editing layer runs on its first batch
  refit_apply        refit(W_next) + apply(B), warm-started from the fit of W: every later batch
  fit_apply_next     fit(W_next) + apply(B): a cold fit of the same changed weight, the baseline a
                     warm refit must beat (target: refit_apply <= 1.1 x fit_apply_next)
Shapes (``SPHERE_FAST_BENCH_SHAPES``): "gpu" (default with a CUDA device: the down_proj shapes of
Llama3-8B, Qwen2.5-7B, Qwen2.5-32B), "cpu" (default otherwise), "tiny" (the GPU check's dry run).
Weights come from sphere_fast.synthetic. On CUDA each case records the peak memory it needed,
measured in its timed rounds. bench/report.py turns the JSON into ratios.

    python -m pytest bench/bench_projection.py --benchmark-json bench/results/<name>.json
"""
from __future__ import annotations

import copy

import pytest
import torch

from benchutil import PeakMemory, shape_set, sync
from sphere_fast import SphereProjector, sparse_projection
from sphere_fast.synthetic import low_rank_change, synthetic_weight
from sphere_fast.reference import sparse_projection_reference

SHAPES = {
    "tiny": [("cpu", (64, 224))],
    "cpu": [("cpu", s) for s in [(512, 1792), (1024, 3584), (2048, 7168)]],
    # Llama3-8B, Qwen2.5-7B, Qwen2.5-32B down_proj
    "gpu": [("cuda", s) for s in [(4096, 14336), (3584, 18944), (5120, 27648)]],
}
# On a GPU: the flat spectrum real weights have (dense solve) and a steep one (block method).
SPECTRA = {"tiny": ["decaying", "steep", "gaussian"], "cpu": ["decaying", "steep", "gaussian"],
           "gpu": ["decaying", "steep"]}
REFERENCE_SPECTRUM = "decaying"
CASES = ["reference", "sparse_projection", "fit_apply", "refit_apply", "fit_apply_next"]
BATCH_RANK, UPDATE_RELATIVE, CHANGE_RELATIVE = 100, 1e-3, 0.03
ETA, ALPHA = 0.5, 0.5


def params():
    chosen = shape_set()
    for device, shape in SHAPES[chosen]:
        for spectrum in SPECTRA[chosen]:
            for case in CASES:
                if case == "reference" and spectrum != REFERENCE_SPECTRUM:
                    continue
                yield pytest.param(device, shape, spectrum, case,
                                   id=f"{device}-{shape[0]}x{shape[1]}-{spectrum}-{case}")


_inputs = {}


def inputs(device, shape, spectrum):
    key = (device, shape, spectrum)
    if key not in _inputs:
        _inputs.clear()  # hold one shape at a time
        if device == "cuda":
            torch.cuda.empty_cache()
        W = synthetic_weight(*shape, spectrum=spectrum, dtype=torch.float32, device=device)
        rank = min(BATCH_RANK, *shape)
        B = low_rank_change(W, rank=rank, relative=UPDATE_RELATIVE, seed=2)
        _inputs[key] = (W, B, W + low_rank_change(W, rank=rank, relative=CHANGE_RELATIVE, seed=3))
    return _inputs[key]


def run_case(benchmark, case, W, B, W_next, device, *, rounds, eta=ETA, alpha=ALPHA) -> dict:
    """Time one case with pytest-benchmark; returns the extra_info it adds (rank, method, memory)."""
    info = {}
    if case in ("reference", "sparse_projection"):
        project = sparse_projection_reference if case == "reference" else sparse_projection

        def run():
            out = project(W, B, eta, alpha)
            sync(device)
            return out

        # The reference's d x d eigh is what is measured: never spent on a warm-up.
        with PeakMemory(device) as peak:
            result = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=int(case != "reference"))
        info["rank"] = result[2].shape[1]
    elif case in ("fit_apply", "fit_apply_next"):
        target = W if case == "fit_apply" else W_next

        def run():
            projector = SphereProjector.fit(target, eta, alpha)
            out = projector.apply(B)
            sync(device)
            return projector, out

        with PeakMemory(device) as peak:
            projector, _ = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
        info.update(rank=projector.rank, method=projector.method)
    elif case == "refit_apply":
        fitted = SphereProjector.fit(W, eta, alpha)

        def setup():
            return (copy.copy(fitted),), {}

        def run(projector):
            projector.refit(W_next)
            out = projector.apply(B)
            sync(device)
            return projector, out

        with PeakMemory(device) as peak:
            projector, _ = benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)
        info.update(rank=projector.rank, method=projector.method, method_before=fitted.method)
    else:
        raise ValueError(f"unknown case {case!r}")
    if peak.bytes is not None:
        info["peak_extra_bytes"] = peak.bytes
    return info


@pytest.mark.parametrize("device, shape, spectrum, case", list(params()))
def test_projection(benchmark, device, shape, spectrum, case):
    W, B, W_next = inputs(device, shape, spectrum)
    benchmark.group = f"{device}-{shape[0]}x{shape[1]}-{spectrum}"
    benchmark.extra_info.update(kind="projection", case=case, device=device, shape=list(shape), spectrum=spectrum,
                                dtype="float32", reference_spectrum=REFERENCE_SPECTRUM)
    large = shape[0] * shape[1] >= 1024 * 3584
    rounds = 1 if case == "reference" and large else 3
    benchmark.extra_info.update(run_case(benchmark, case, W, B, W_next, device, rounds=rounds))
