"""Two one-thread processes against one two-thread process for ``sphere-fast study`` (``--jobs``).

Runs the same short study twice, each into a fresh folder: ``--jobs 2 --threads 1`` (the two runs
side by side) and ``--jobs 1 --threads 2`` (one after the other), and compares the edits per second
of the runs' editing and evaluation (from each run's ``edits.csv``) and the wall time of each call.
The study: SmolLM2-135M, MEMIT and MEMIT + SPHERE, the first requests of CounterFact's *train*
split, one evaluation at the end (general abilities on less text than the shipped study's). Key
statistics come from the cache (the first call fills it).
It also times the shared baseline alone (the unedited model scored on ``--baseline-requests``
requests, what ``--jobs`` runs before starting its workers) on one thread and on every core.
Run it on an otherwise idle machine::

    python bench/study_jobs.py [--edits 40] [--batch-size 20] [--baseline-requests 200]

Writes ``bench/results/cpu-study-jobs-<date>.{json,md}``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import ROOT, environment

from sphere_fast.files import atomic_write_text
from sphere_fast.harness.report import read_csv

CONFIGS = {"2 processes x 1 thread": (2, 1), "1 process x 2 threads": (1, 2)}


def spec_text(edits: int, batch_size: int) -> str:
    return json.dumps({
        "model": "smollm2", "data": "data:counterfact/easyedit_counterfact-train.json", "horizon": edits,
        "batch_size": batch_size, "eval_every": edits, "eval_sample": edits, "full_eval_at": [edits], "seed": 0,
        # General abilities on less text than the shipped study: the editing is what is compared.
        "general_tokens": 2048, "retention_candidates": 100, "fluency_prompts": 5,
        "runs": [{"name": "memit", "method": "memit"}, {"name": "memit+sphere", "method": "memit+sphere", "alpha": 0.8}],
    })


def run_seconds(csv_path: Path) -> tuple[int, float]:
    """Edits made and seconds spent by one run: its batches (key statistics excluded) and its evaluations."""
    rows = [r for r in read_csv(csv_path) if r["edits"] > 0]
    seconds = sum(r.get("seconds_total", 0.0) - r.get("seconds_stats", 0.0) + r.get("seconds_eval_edits", 0.0)
                  + r.get("seconds_eval_general", 0.0) for r in rows)
    return (rows[-1]["edits"] if rows else 0), seconds


def throughput(out: Path, jobs: int) -> dict:
    """Edits per second of a study's runs: side by side (jobs > 1) the slowest run sets the time."""
    per_run = {p.name: run_seconds(p / "edits.csv") for p in sorted((out / "runs").iterdir())}
    edits = sum(e for e, _ in per_run.values())
    seconds = [s for _, s in per_run.values()]
    busy = max(seconds) if jobs > 1 else sum(seconds)
    return {"runs": {k: {"edits": e, "seconds": s} for k, (e, s) in per_run.items()}, "edits": edits,
            "seconds": busy, "edits_per_s": edits / busy if busy else None}


def baseline_seconds(spec: Path, out: Path, threads: int) -> float:
    """Wall time of a baseline-only call (``--budget-minutes 0``) into a fresh folder, model loading included."""
    cmd = [sys.executable, "-m", "sphere_fast.cli", "study", "--spec", str(spec), "--out", str(out),
           "--budget-minutes", "0", "--jobs", "1", "--threads", str(threads)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--baseline-requests", type=int, default=200)
    args = ap.parse_args(argv)
    results, baseline = {}, {}
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(spec_text(args.edits, args.batch_size))
        for label, (jobs, threads) in CONFIGS.items():
            out = Path(tmp) / f"jobs{jobs}"
            cmd = [sys.executable, "-m", "sphere_fast.cli", "study", "--spec", str(spec), "--out", str(out),
                   "--jobs", str(jobs), "--threads", str(threads)]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            results[label] = dict(throughput(out, jobs), wall_s=time.perf_counter() - start, jobs=jobs,
                                  threads=threads)
            print(f"{label}: {results[label]['edits_per_s']:.3f} edits/s, call {results[label]['wall_s']:.0f} s")
        spec = Path(tmp) / "baseline.json"
        spec.write_text(spec_text(args.baseline_requests, args.baseline_requests))
        for threads in sorted({1, cores}):
            baseline[threads] = baseline_seconds(spec, Path(tmp) / f"baseline{threads}", threads)
            print(f"baseline on {threads} thread(s): {baseline[threads]:.0f} s")
    env = environment()
    record = {"environment": env, "edits_per_run": args.edits, "batch_size": args.batch_size, "results": results,
              "baseline_requests": args.baseline_requests, "baseline_seconds_by_threads": baseline}
    lines = [f"# `sphere-fast study --jobs`: processes against threads ({env['date'][:10]})", "",
             f"- commit {env['commit']['id']}, {env['cpu_count']} CPUs, torch {env['torch']}",
             f"- SmolLM2-135M, MEMIT and MEMIT + SPHERE, {args.edits} CounterFact train requests each in batches of "
             f"{args.batch_size}, one evaluation at the end; key statistics cached", "",
             "| configuration | edits | runs' seconds | edits/s | whole call (s) |", "|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['edits']} | {r['seconds']:.1f} | {r['edits_per_s']:.3f} | {r['wall_s']:.0f} |")
    (a, b) = (results[k]["edits_per_s"] for k in CONFIGS)
    lines += ["", f"Two one-thread processes / one two-thread process: {a / b:.2f}x the edits per second.", "",
              f"The shared baseline alone ({args.baseline_requests} requests scored, model loading included):", "",
              "| threads | seconds |", "|---|---|"]
    lines += [f"| {t} | {sec:.0f} |" for t, sec in baseline.items()]
    stem = ROOT / "bench" / "results" / f"cpu-study-jobs-{datetime.date.today().isoformat()}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    atomic_write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
