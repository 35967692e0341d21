"""How close PRUNE's accumulated change comes to the restraint threshold, from a study's checkpoints.

PRUNE restrains the singular values of ``D = W - W0`` above ``sigma_max(W0)``; while ``sigma_max(D)``
stays below it, PRUNE edits exactly as MEMIT. This reads the latest checkpoint of each PRUNE run of a
study (in the cache: the machine that ran it) and writes, per edited layer, ``sigma_max(D)``,
``sigma_max(W0)``, their ratio and how many singular values of D are above the threshold::

    python bench/prune_restraint.py [--out bench/results/cpu-smollm2-methods]

Writes ``<out>/prune_restraint.json``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import benchutil  # puts the repository root on sys.path
from sphere_fast.harness.report import write_json
from sphere_fast.harness.sequential import checkpoint_weights
from sphere_fast.harness.study_spec import checkpoint_edits, latest_checkpoints


def layer_rows(ckpt: Path) -> list[dict]:
    layers = torch.load(ckpt / "editor.pt", map_location="cpu", weights_only=True)["editor"]["layers"]
    weights = checkpoint_weights(ckpt)
    rows = []
    for name, entry in layers.items():
        D = weights[name].double() - entry["W0"].double()
        s = torch.linalg.svdvals(D)
        threshold = float(entry["sigma_max"])
        rows.append({"layer": name, "sigma_max_D": float(s[0]), "sigma_max_W0": threshold,
                     "ratio": float(s[0]) / threshold, "above": int((s > threshold).sum())})
    return rows


def main(argv=None) -> int:
    out, spec, _ = benchutil.study_folder_args(__doc__.split("\n\n")[0], "bench/results/cpu-smollm2-methods", argv,
                                               only=False)
    result = {}
    prune_runs = [run.name for run in spec.runs if run.base_method == "prune"]
    for name, ckpt in latest_checkpoints(spec, out, prune_runs, log=lambda m: print(m, file=sys.stderr)).items():
        edits = checkpoint_edits(spec, ckpt)
        result[name] = {"edits": edits, "layers": layer_rows(ckpt)}
        for row in result[name]["layers"]:
            print(f"{name} at {edits} edits, {row['layer']}: sigma_max(D) {row['sigma_max_D']:.3f}, "
                  f"sigma_max(W0) {row['sigma_max_W0']:.3f}, ratio {row['ratio']:.3f}, above {row['above']}")
    if not result:
        print("no PRUNE run with a checkpoint here", file=sys.stderr)
        return 1
    write_json(out / "prune_restraint.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
