"""One run of a study edited twice (two machines, say): how far its two records drift apart.

Sequential editing accumulates rounding: the same requests, settings and seed on another machine
(another CPU, BLAS or thread count) give the same first evaluations and then slowly different ones.
This puts two records of one run side by side at every evaluation both have and gives the largest
difference of each metric: a measured floor under which a difference between two methods is not
evidence. ::

    python bench/compare_runs.py bench/results/cpu-smollm2-study/rerun/memit-first-machine \
        bench/results/cpu-smollm2-study/runs/memit --out bench/results/cpu-smollm2-study/rerun/memit

RUN_A and RUN_B are run folders (each with its ``edits.csv``); writes OUT.json and OUT.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchutil import environment

from sphere_fast.files import atomic_write_text
from sphere_fast.harness.report import read_csv

METRICS = ("efficacy", "generalization", "specificity", "locality", "perplexity", "kl", "retention", "nq")


def evaluations(run: Path) -> dict[int, dict]:
    """The run's evaluated rows by edit count."""
    path = run / "edits.csv"
    if not path.is_file():
        raise SystemExit(f"{run}: no edits.csv (not a study run folder)")
    return {row["edits"]: row for row in read_csv(path) if "eval_requests" in row}  # read_csv parses edits as int


def compare(a: dict[int, dict], b: dict[int, dict]) -> dict:
    rows, largest = [], {}
    for edits in sorted(set(a) & set(b)):
        row = {"edits": edits, "scored": [a[edits]["eval_requests"], b[edits]["eval_requests"]]}
        for metric in METRICS:
            va, vb = a[edits].get(metric), b[edits].get(metric)
            if va is None or vb is None:
                continue
            row[metric] = [va, vb]
            diff = abs(vb - va)
            if diff > largest.get(metric, {}).get("difference", -1.0):
                largest[metric] = {"difference": diff, "edits": edits}
        rows.append(row)
    return {"rows": rows, "largest": largest}


def markdown(result: dict, run_a: Path, run_b: Path, env: dict) -> str:
    lines = [f"# One run edited twice: {run_a.name} ({env['date'][:10]})", "",
             f"- A: `{run_a}`", f"- B: `{run_b}`", f"- written at commit {env['commit']['id']}", "",
             "Each cell is A / B at an evaluation both records have.", "",
             "| edits | scored | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for row in result["rows"]:
        cells = [f"{row[m][0]:.3f} / {row[m][1]:.3f}" if m in row else "–" for m in METRICS]
        lines.append(f"| {row['edits']} | {row['scored'][0]} / {row['scored'][1]} | " + " | ".join(cells) + " |")
    lines += ["", "Largest difference |B − A| of each metric:", ""]
    lines += [f"- {m}: {v['difference']:.3f} (at {v['edits']} edits)" for m, v in result["largest"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="path stem of the .json and .md written")
    args = ap.parse_args(argv)
    result = compare(evaluations(args.run_a), evaluations(args.run_b))
    if not result["rows"]:
        raise SystemExit("the two runs have no evaluation at a common edit count")
    env = environment()
    record = {"environment": env, "run_a": str(args.run_a), "run_b": str(args.run_b), **result}
    text = markdown(result, args.run_a, args.run_b, env)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
