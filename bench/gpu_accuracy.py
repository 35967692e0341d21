"""The accuracy contract (docs/design.md, "Accuracy contract") at a real shape, against float64: the GPU check's step 2.

For W of shape [4096 x 14336] (Llama3-8B's down_proj; ``--shape`` changes it, ``--tiny`` is the
dry run's [64 x 224] on CPU) in three cases -- fp32 with a flat 'decaying' spectrum (the dense
eigensolver runs), fp32 with a 'steep' one (the block method runs) and bf16 'decaying' -- it checks:

* Gram: the Triton kernel against the float64 Gram, entrywise within
  ``sphere_fast.accuracy.gram_tolerance``, and exactly symmetric;
* eigensolver (the CUDA extension; its torch twin without one), cold on W and warm on
  W1 = W + a realistic per-batch change (rank 100, 3 % of ||W||_F) from the cold basis: the rank
  (or an ambiguous cut), eigenvalues (Weyl: the solver's bound plus ||G - G64||_F), residuals and
  orthogonality (``sphere_fast.accuracy.solver_bound``), captured energy, and the largest principal
  angle to the float64 subspace (Davis-Kahan: the float64 residual over the gap to lambda_{r+1});
* projection: ``SphereProjector.fit(W)`` and ``refit(W1)`` + ``apply`` of a Gaussian B against the
  float64 projection, within the contract's bound (1e-5 at a relative gap >= 1e-4, else 1e-6 / gap;
  plus the output's unit roundoff 2^-8 for bf16), U^T U = I, captured energy and ||B_proj|| <= ||B||;
* energy: the Triton kernel inside ``sphere_fast.accuracy.energy_interval``.

The float64 reference solves the small-side Gram and lifts its eigenvectors (docs/design.md, "The math"):
the same numbers as the reference algorithm's d x d solve, without a 14336^2 float64 eigh.

    python bench/gpu_accuracy.py --out accuracy.json [--shape N D] [--tiny]

Writes every value with its bound; exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil  # noqa: E402,F401  (puts the repository root on sys.path)

from sphere_fast import SphereProjector, hyperspherical_energy, normalized_gram  # noqa: E402
from sphere_fast.accuracy import (  # noqa: E402
    ORTHO_TOL,
    OUTPUT_ROUNDING,
    TOL_GAPPED,
    TOL_OVER_GAP,
    energy_interval,
    gram_tolerance,
    solver_bound,
)
from sphere_fast.backends import backend_status, load_implementation  # noqa: E402
from sphere_fast.eigensolver import DEFAULT_TOL, top_eigenpairs  # noqa: E402
from sphere_fast.gram import NormalizedGram, hyperspherical_energy_reference, normalized_gram_reference  # noqa: E402
from sphere_fast.synthetic import low_rank_change, synthetic_weight  # noqa: E402
from sphere_fast.reference import Oracle, oracle as dxd_oracle  # noqa: E402

ETA, ALPHA = 0.5, 0.5
ENERGY_S, ENERGY_EPS = 2.0, 1e-6
CHANGE_RANK, CHANGE_RELATIVE = 100, 0.03  # one editing batch: rank <= batch size, a few % of ||W||_F
REAL_SHAPE, TINY_SHAPE = (4096, 14336), (64, 224)
CASES = [("float32", "decaying"), ("float32", "steep"), ("bfloat16", "decaying")]
GAPPED = 1e-4  # the contract's relative gap above which the 1e-5 bound applies


class Checks:
    """Named values with their bounds; ``ok`` unless a value passes its bound."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, name: str, value, bound=None, *, ok: bool | None = None, note: str = "") -> None:
        value = float(value)
        if ok is None:
            ok = math.isfinite(value) and value <= bound
        self.rows.append({"name": name, "value": value, "bound": None if bound is None else float(bound),
                          "ok": bool(ok), "note": note})

    @property
    def ok(self) -> bool:
        return all(row["ok"] for row in self.rows)


def float64_reference(W: torch.Tensor, eta: float) -> tuple[Oracle, NormalizedGram, torch.Tensor]:
    """The reference algorithm in float64 on W's values: (oracle, float64 Gram, its eigenvectors).

    The oracle's eigenvectors are the lifted top columns (d x (r + 8)): enough for any rank the
    contract accepts at an ambiguous cut.
    """
    g64 = normalized_gram_reference(W, dtype=torch.float64)
    vals, vecs = torch.linalg.eigh(g64.gram)
    vals, vecs = vals.flip(0), vecs.flip(1)
    m = vals.numel()
    rank = min(int((torch.cumsum(vals, 0) / vals.sum() <= eta).sum()) + 1, m)
    k = min(m, rank + 8)
    if g64.side == "rows":
        scaled = vecs[:, :k] * g64.row_scale.unsqueeze(1)
        U = (W.double().T @ scaled) / torch.sqrt(g64.n * vals[:k].clamp_min(torch.finfo(torch.float64).tiny))
    else:
        U = vecs[:, :k]
    return Oracle(vals.cpu(), U, g64.trace, rank), g64, vecs


def solve(G: torch.Tensor, trace: float, init: torch.Tensor | None, backend: str):
    """The eigensolver of ``backend`` ("cuda": the extension; "torch": its twin): (pairs, stats)."""
    if backend == "cuda":
        pairs, stats = load_implementation("eigensolver", "cuda")(G, trace, ETA, init=init, return_stats=True)
        stats.pop("residuals", None)  # one per pair; the checks below recompute them in float64
        return pairs, stats
    pairs = top_eigenpairs(G, trace, ETA, init=init)
    return pairs, {"method": pairs.method, "iterations": pairs.iterations}


def check_eigenpairs(checks: Checks, label: str, pairs, G: torch.Tensor, oracle: Oracle, g64: NormalizedGram,
                     vecs64: torch.Tensor) -> None:
    r = pairs.values.numel()
    V = pairs.vectors.double()
    vals = pairs.values.to(V.device)
    ev64 = oracle.eigenvalues.to(V.device)
    lam1 = float(ev64[0])
    bound = solver_bound(pairs, G, DEFAULT_TOL[G.dtype])
    eps = torch.finfo(G.dtype).eps
    checks.add(f"{label}: rank", r, ok=r in oracle.acceptable_ranks(ETA), note=f"float64 rank {oracle.rank}")
    gram_err = float(torch.linalg.matrix_norm(G.double() - g64.gram))
    m = min(r, ev64.numel())
    checks.add(f"{label}: eigenvalues max|λ − λ64| / λ1", (vals[:m] - ev64[:m]).abs().max() / lam1,
               bound + gram_err / lam1, note="Weyl: solver bound + ||G − G64||_F / λ1")
    residual = torch.linalg.vector_norm(G.double() @ V - V * vals, dim=0).max() / float(vals[0])
    checks.add(f"{label}: residual max||G u − λ u|| / λ1", residual, bound + 2 * eps)
    eye = torch.eye(r, dtype=torch.float64, device=V.device)
    checks.add(f"{label}: orthogonality max|VᵀV − I|", (V.T @ V - eye).abs().max(), ORTHO_TOL[torch.float32])
    checks.add(f"{label}: captured energy / (η trace)", float(pairs.values.sum()) / (ETA * g64.trace),
               ok=float(pairs.values.sum()) >= ETA * g64.trace * (1 - 1e-12))
    # Largest principal angle to the float64 subspace of the same size, and Davis-Kahan's bound:
    # the float64 residual of the returned pairs over their distance to the rest of the spectrum.
    V64 = vecs64[:, :r]
    sin_angle = torch.linalg.matrix_norm(V - V64 @ (V64.T @ V), ord=2)
    res64 = torch.linalg.matrix_norm(g64.gram @ V - V * vals)
    separation = float(vals[-1] - ev64[r]) if r < ev64.numel() else float(vals[-1])
    dk = float(res64) / separation if separation > 0 else math.inf
    checks.add(f"{label}: sin(largest angle to float64)", sin_angle, dk,
               note=f"Davis-Kahan bound; relative gap at the cut {oracle.gap(r):.2e}")


def projection_bound(dtype: torch.dtype, gap: float) -> float:
    """The fp32 contract (16-bit input is computed in fp32), plus a 16-bit output's rounding."""
    fp32 = TOL_GAPPED[torch.float32] if gap >= GAPPED else TOL_OVER_GAP[torch.float32] / gap
    return fp32 + OUTPUT_ROUNDING.get(dtype, 0.0)


def check_projection(checks: Checks, label: str, proj: SphereProjector, B: torch.Tensor, oracle: Oracle) -> None:
    out = proj.apply(B)
    want = oracle.project(B, ALPHA, r=proj.rank)
    b_norm = float(B.double().norm())
    gap = oracle.gap(proj.rank)
    checks.add(f"{label}: rank", proj.rank, ok=proj.rank in oracle.acceptable_ranks(ETA),
               note=f"float64 rank {oracle.rank}, method {proj.method}")
    checks.add(f"{label}: ||B_proj − B_proj64|| / ||B||", float((out.double() - want).norm()) / b_norm,
               projection_bound(B.dtype, gap), note=f"relative gap {gap:.2e}")
    U = proj.U.double()
    eye = torch.eye(proj.rank, dtype=torch.float64, device=U.device)
    checks.add(f"{label}: orthogonality max|UᵀU − I|", (U.T @ U - eye).abs().max(), ORTHO_TOL[torch.float32])
    captured = float(proj.eigenvalues.sum())
    checks.add(f"{label}: captured energy / (η trace)", captured / (ETA * proj.trace),
               ok=captured >= ETA * proj.trace * (1 - 1e-12))
    unit = torch.finfo(B.dtype).eps / 2
    checks.add(f"{label}: ||B_proj|| / ||B||", float(out.double().norm()) / b_norm, 1 + 4 * unit)


def check_case(dtype_name: str, spectrum: str, shape: tuple[int, int], device: torch.device,
               gram_backend: str, eigen_backend: str) -> dict:
    t_start = time.perf_counter()
    dtype = getattr(torch, dtype_name)
    checks = Checks()
    W = synthetic_weight(*shape, spectrum=spectrum, dtype=torch.float32, device=device).to(dtype)
    W1 = W + low_rank_change(W, rank=min(CHANGE_RANK, min(shape)), relative=CHANGE_RELATIVE, seed=7)
    B = torch.randn(shape, generator=torch.Generator().manual_seed(8)).to(device=device, dtype=dtype)
    oracle, g64, vecs64 = float64_reference(W, ETA)

    # Gram (Triton where it runs)
    gram = normalized_gram(W, backend=gram_backend)
    K = shape[1] if gram.side == "rows" else shape[0]
    err = (gram.gram.double() - g64.gram).abs()
    tol = gram_tolerance(g64.gram, K, dtype, "fp32", gram.side)
    checks.add("Gram: max |G − G64| / entrywise bound", (err / tol).max(), 1.0,
               note=f"backend {gram_backend}; ||G − G64||_F / ||G64||_F = "
                    f"{float(torch.linalg.matrix_norm(gram.gram.double() - g64.gram) / torch.linalg.matrix_norm(g64.gram)):.2e}")
    checks.add("Gram: exactly symmetric", 0.0, ok=torch.equal(gram.gram, gram.gram.T))

    # Eigensolver, cold then warm after the change
    cold, cold_stats = solve(gram.gram, gram.trace, None, eigen_backend)
    check_eigenpairs(checks, "eigensolver cold", cold, gram.gram, oracle, g64, vecs64)
    oracle1, g64_1, vecs64_1 = float64_reference(W1, ETA)
    gram1 = normalized_gram(W1, backend=gram_backend)
    warm, warm_stats = solve(gram1.gram, gram1.trace, cold.vectors, eigen_backend)
    check_eigenpairs(checks, "eigensolver warm", warm, gram1.gram, oracle1, g64_1, vecs64_1)
    del vecs64, vecs64_1

    # Projection through the public API (auto backends), cold fit and warm refit
    proj = SphereProjector.fit(W, ETA, ALPHA)
    check_projection(checks, "projection fit", proj, B, oracle)
    proj.refit(W1)
    check_projection(checks, "projection refit", proj, B, oracle1)

    # Energy
    energy = float(hyperspherical_energy(W, ENERGY_S, ENERGY_EPS, backend=gram_backend))
    energy64 = float(hyperspherical_energy_reference(W, s=ENERGY_S, eps=ENERGY_EPS, dtype=torch.float64))
    lo, hi = energy_interval(W, ENERGY_S, ENERGY_EPS)
    checks.add("energy: relative error to float64", abs(energy - energy64) / energy64,
               ok=lo <= energy <= hi, note=f"inside [{lo:.10g}, {hi:.10g}]")
    return {
        "dtype": dtype_name, "spectrum": spectrum, "shape": list(shape), "rank64": oracle.rank,
        "gap": oracle.gap(oracle.rank), "cold": cold_stats | {"rank": cold.values.numel()},
        "warm": warm_stats | {"rank": warm.values.numel()}, "projection_method": proj.method,
        "seconds": time.perf_counter() - t_start, "checks": checks.rows, "ok": checks.ok,
    }


def oracle_self_check(device: torch.device) -> dict:
    """At a small shape: the small-side float64 reference equals the d x d one (sphere_fast.reference.oracle)."""
    W = synthetic_weight(48, 160, spectrum="decaying", dtype=torch.float64, device=device)
    B = torch.randn(7, 160, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    small, _, _ = float64_reference(W, ETA)
    full = dxd_oracle(W.cpu(), ETA)
    checks = Checks()
    checks.add("oracle: rank equal", small.rank, ok=small.rank == full.rank)
    checks.add("oracle: eigenvalues max diff / λ1",
               (small.eigenvalues - full.eigenvalues[:small.eigenvalues.numel()]).abs().max() / full.eigenvalues[0],
               1e-12)
    diff = small.project(B, ALPHA).cpu() - full.project(B.cpu(), ALPHA)
    checks.add("oracle: projection max diff / ||B||", diff.abs().max() / B.norm(), 1e-12)
    return {"checks": checks.rows, "ok": checks.ok}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--shape", nargs=2, type=int, metavar=("N", "D"))
    parser.add_argument("--tiny", action="store_true", help="the dry run's small CPU shape")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = tuple(args.shape) if args.shape else (TINY_SHAPE if args.tiny else REAL_SHAPE)
    gram_backend = "triton" if backend_status("triton", device)[0] else "torch"
    result = {"shape": list(shape), "eta": ETA, "alpha": ALPHA, "device": str(device),
              "eigensolver": "cuda" if backend_status("cuda", device)[0] else "torch",
              "gram_backend": gram_backend, "cases": []}
    if args.tiny:
        result["oracle"] = oracle_self_check(device)
        print("small-side float64 reference = d x d one:", "ok" if result["oracle"]["ok"] else "FAILED", flush=True)
    for dtype_name, spectrum in CASES:
        try:
            case = check_case(dtype_name, spectrum, shape, device, gram_backend, result["eigensolver"])
        except Exception as exc:  # report and go on: one failing case must not hide the others
            case = {"dtype": dtype_name, "spectrum": spectrum, "error": f"{type(exc).__name__}: {exc}", "ok": False}
        result["cases"].append(case)
        print(f"{dtype_name:9s} {spectrum:9s} {'ok' if case['ok'] else 'FAILED'}"
              + (f"  ({case['seconds']:.1f} s)" if "seconds" in case else f"  {case.get('error')}"), flush=True)
        for row in case.get("checks", []):
            bound = "" if row["bound"] is None else f" <= {row['bound']:.3g}"
            print(f"    {'ok  ' if row['ok'] else 'FAIL'} {row['name']}: {row['value']:.3g}{bound} {row['note']}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["ok"] = all(c["ok"] for c in result["cases"]) and result.get("oracle", {"ok": True})["ok"]
    args.out.write_text(json.dumps(result, indent=1))
    print("accuracy:", "all checks passed" if result["ok"] else "SOME CHECKS FAILED")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
