"""SPHERE's projection on real weights: the 30 down_proj matrices of SmolLM2-135M ([576 x 1536]).

The same cases as bench_projection.py (reference once per layer, sparse_projection left out),
per layer, fp32, with the change a batch of 20 edits makes on this model: rank 20, 5 % of ||W||_F
(measured: update norms 4.9-15 against ||W||_F ~ 175). Real weights are flat (r is 22-32 % of 576),
so the eigensolver's auto rule takes the dense path, cold and warm; extra_info records the method.

The model comes from the cache of converted models (``sphere_fast.harness.model_sources.cached_model``,
``sphere-fast`` fetches and converts it); the module skips, saying why, when it is not there.
``SPHERE_FAST_BENCH_SHAPES=tiny`` runs three layers only.

    python -m pytest bench/bench_real_weights.py --benchmark-json bench/results/<name>.json
"""
from __future__ import annotations

import functools

import pytest
import torch

from bench_projection import ALPHA, ETA, run_case
from benchutil import shape_set
from sphere_fast.synthetic import low_rank_change

MODEL = "smollm2"
LAYERS = 30
TINY_LAYERS = (0, 15, 29)
CASES = ["reference", "fit_apply", "refit_apply", "fit_apply_next"]
BATCH_RANK, CHANGE_RELATIVE, UPDATE_RELATIVE = 20, 0.05, 0.05


def model_dir():
    """(directory, None) or (None, why it is not available)."""
    try:
        from sphere_fast.harness.model_sources import cached_model
    except ImportError as exc:
        return None, f"sphere_fast.harness.model_sources is not available ({exc})"
    path = cached_model(MODEL)
    if path is None:
        return None, f"model {MODEL!r} is not in the cache of converted models (sphere_fast.harness.model_sources)"
    return path, None


_DIR, _WHY = model_dir()
pytestmark = pytest.mark.skipif(_DIR is None, reason=_WHY or "")


@functools.lru_cache(maxsize=1)
def down_proj_weights() -> dict[int, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(_DIR / "model.safetensors"), framework="pt") as fh:
        return {i: fh.get_tensor(f"model.layers.{i}.mlp.down_proj.weight").float() for i in range(LAYERS)}


def layers():
    return TINY_LAYERS if shape_set() == "tiny" else range(LAYERS)


_inputs = {}


def inputs(layer: int, device: str):
    if layer not in _inputs:
        _inputs.clear()
        W = down_proj_weights()[layer].to(device)
        B = low_rank_change(W, rank=BATCH_RANK, relative=UPDATE_RELATIVE, seed=1000 + layer)
        W_next = W + low_rank_change(W, rank=BATCH_RANK, relative=CHANGE_RELATIVE, seed=layer)
        _inputs[layer] = (W, B, W_next)
    return _inputs[layer]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layer", list(layers()), ids=lambda i: f"layer{i:02d}")
def test_real_weights(benchmark, layer, case):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    W, B, W_next = inputs(layer, device)
    benchmark.group = f"real-{MODEL}-layer{layer:02d}"
    benchmark.extra_info.update(kind="real_weights", case=case, device=device, shape=list(W.shape), model=MODEL,
                                layer=layer, spectrum="real", dtype="float32")
    rounds = 1 if case == "reference" else 3
    benchmark.extra_info.update(run_case(benchmark, case, W, B, W_next, device, rounds=rounds, eta=ETA, alpha=ALPHA))
