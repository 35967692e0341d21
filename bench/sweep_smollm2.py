"""Hyperparameter sweep and edit-split report for SmolLM2-135M-Instruct on a CPU.

Sweep (train split only): each configuration starts from the unedited weights,
edits the first ``--n`` requests of ``easyedit_counterfact-train.json``
sequentially in batches of ``--batch-size`` and evaluates all of them after the
last batch (top-1 token accuracy, the package's metrics)::

    python bench/sweep_smollm2.py sweep --n 20 --grid coarse
    python bench/sweep_smollm2.py sweep --method ft --n 200 --batch-size 100 --grid ft

AlphaEdit + SPHERE varies the shipped SPHERE file; FT (no shipped file yet)
varies the settings ``default_hparams`` sizes to the model.

Report (edit split): the shipped settings for AlphaEdit + SPHERE, AlphaEdit,
MEMIT and MEMIT + SPHERE, plus the unedited model::

    python bench/sweep_smollm2.py report --n 100 --runs alphaedit+sphere,alphaedit,memit,memit+sphere

Results go to ``bench/results/cpu-smollm2-{sweep,edit<n>}-<date>.{json,md}`` (device,
date, commit, per-configuration metrics and the per-batch time split), rewritten
after every configuration so an interrupted run keeps what it finished.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from sphere_fast.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
METRICS = ("efficacy", "generalization", "specificity", "locality")
TIME_KEYS = ("stats", "targets", "keys", "solve", "sphere", "apply")
RUNS = {  # label: (method, sphere, shipped hparams file)
    "alphaedit+sphere": ("alphaedit", True, "SPHERE/smollm2-135m"),
    "alphaedit": ("alphaedit", False, "AlphaEdit/smollm2-135m"),
    "memit": ("memit", False, "MEMIT/smollm2-135m"),
    "memit+sphere": ("memit", True, "MEMIT/smollm2-135m"),
}
# Overrides of the shipped SPHERE file, each run with AlphaEdit + SPHERE (eta 0.5, alpha 0.5).
GRIDS = {
    # Sized for two shared CPU cores: one change at a time from the probe's settings.
    "coarse": [
        {},  # the shipped file
        {"v_lr": 0.5},
        {"layers": [3, 4, 5]},
        {"L2": 1.0},
        {"nullspace_threshold": 5e-2},
    ],
    "llama3-8b": [{"layers": [3, 4, 5, 6, 7], "v_num_grad_steps": 25, "v_lr": 0.1, "clamp_norm_factor": 0.75}],
    # FT-L around the public Llama3-8B settings (layer 21 of 32 -> 20 of 30, 25 steps, lr 5e-4).
    "ft": [
        {},
        {"lr": 2e-3},
        {"layers": [5]},
        {"layers": [5], "lr": 2e-3},
        {"objective_optimization": "target_new"},
    ],
}


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs"


def run_config(model, tokenizer, requests, hparams, *, method: str, sphere: bool, batch_size: int, reference,
               base_weights: dict, stats_corpus, seed: int = 0) -> dict:
    """Edit ``requests`` from the unedited weights, evaluate all of them; weights are restored afterwards."""
    from sphere_fast.editing import paths
    from sphere_fast.editing.editor import Editor
    from sphere_fast.harness.metrics import evaluate

    torch.manual_seed(seed)
    editor = Editor(model, tokenizer, hparams, method=method, sphere=sphere, stats_corpus=stats_corpus,
                    cache_dir=paths.cache_dir(), seed=seed, progress=False)
    batches = []
    t0 = time.perf_counter()
    try:
        for start in range(0, len(requests), batch_size):
            info = editor.edit_batch(requests[start:start + batch_size])
            seconds = {k: round(float(info["seconds"].get(k, 0.0)), 3) for k in (*TIME_KEYS, "total")}
            batches.append({"batch": len(batches), "size": info["batch_size"], "seconds": seconds})
            print(f"    batch {len(batches)}: {seconds}", flush=True)
        edit_seconds = time.perf_counter() - t0
        after = evaluate(model, tokenizer, requests, reference=reference, batch_size=16)
        null_dims = {name: layer.get("nullspace_dim") for name, layer in info["layers"].items()}
    finally:
        with torch.no_grad():
            for name, weight in base_weights.items():
                model.get_parameter(name).copy_(weight)
    return {"after": {k: after.get(k) for k in METRICS}, "batches": batches, "edit_seconds": round(edit_seconds, 1),
            "null_dims": null_dims}


def _table(rows: list[dict], label: str) -> str:
    head = f"| {label} | " + " | ".join(METRICS) + " | edit s | targets s | keys s | solve s | SPHERE s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        tot = {k: sum(b["seconds"][k] for b in r.get("batches", [])) for k in ("targets", "keys", "solve", "sphere")}
        vals = " | ".join("—" if r["after"].get(k) is None else f"{r['after'][k]:.3f}" for k in METRICS)
        times = (f"{r['edit_seconds']:.0f} | {tot['targets']:.0f} | {tot['keys']:.1f} | {tot['solve']:.2f} | "
                 f"{tot['sphere']:.2f}" if r.get("batches") else "— | — | — | — | —")
        lines.append(f"| {r['label']} | {vals} | {times} |")
    return "\n".join(lines)


def _write(kind: str, meta: dict, rows: list[dict]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"cpu-smollm2-{kind}-{meta['date']}"
    payload = {**meta, "rows": rows}
    atomic_write_text(stem.with_suffix(".json"), json.dumps(payload, indent=1) + "\n")
    report = meta["split"] == "edit"
    title = (f"{meta['n']} edit-split requests in sequential batches, shipped settings" if report
             else f"{kind} ({meta['split']} split)")
    settings = ("settings: " + ", ".join(f"{r['label']} `{RUNS[r['label']][2]}`" for r in rows if r["label"] in RUNS)
                if report else f"base settings `{meta['base']}`")  # a report runs each label on its own file
    md = [f"# SmolLM2-135M-Instruct, {title}", "",
          f"- date {meta['date']}, commit {meta['commit']}, device: {meta['device']}",
          f"- {meta['n']} requests (first of `{meta['data']}`), batches of {meta['batch_size']}, all evaluated after "
          "the last batch; top-1 token accuracy (package metrics); locality = agreement with the unedited model's "
          "top-1 on neighbourhood prompts",
          f"- C0 from {meta['stats_lines']} lines of {meta['stats_corpus']}; {settings}",
          "- time columns: sums over batches (seconds) of target optimisation, keys, solve, SPHERE; "
          "edit s includes key statistics on the first configuration only when they were not cached", "",
          _table(rows, "run" if report else "overrides"), ""]
    if report:
        md += ["## Per-batch time split (s)", "", "| run | batch | stats | targets | keys | solve | SPHERE | apply | total |",
               "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            for b in r.get("batches", []):
                s = b["seconds"]
                md.append(f"| {r['label']} | {b['batch']} | " + " | ".join(f"{s[k]:.2f}" for k in (*TIME_KEYS, "total"))
                          + " |")
    atomic_write_text(stem.with_suffix(".md"), "\n".join(md) + "\n")
    return stem


def main(argv=None) -> int:
    from sphere_fast.editing import paths
    from sphere_fast.harness.datasets import load_requests
    from sphere_fast.editing.hparams import default_hparams, load_hparams
    from sphere_fast.harness.metrics import evaluate, neighborhood_predictions
    from sphere_fast.harness.model_sources import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("sweep", "report"))
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--grid", default="coarse", help=f"sweep grid: {sorted(GRIDS)} or a JSON list of override dicts")
    ap.add_argument("--method", default="alphaedit", choices=("alphaedit", "ft"),
                    help="sweep method: alphaedit (+ SPHERE, around the shipped SPHERE file) or ft (around "
                         "default_hparams)")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"report runs, comma-separated from {list(RUNS)}")
    ap.add_argument("--stats-lines", type=int, default=None, help="C0 corpus lines (default: the hparams file's)")
    ap.add_argument("--date", default=dt.date.today().isoformat())
    args = ap.parse_args(argv)

    split = "train" if args.kind == "sweep" else "edit"
    data = paths.data_dir() / "counterfact" / f"easyedit_counterfact-{split}.json"
    requests = load_requests(data, limit=args.n)
    model, tokenizer = load_model("smollm2")
    stats_corpus = paths.wikitext_path("test")
    base_file = RUNS["alphaedit+sphere"][2]
    stats_lines = args.stats_lines or load_hparams(base_file).mom2_n_samples
    reference = neighborhood_predictions(model, tokenizer, requests)
    before = evaluate(model, tokenizer, requests, reference=reference)
    meta = {"date": args.date, "commit": _commit(), "device": _device(), "split": split, "data": data.name,
            "n": len(requests), "batch_size": args.batch_size, "stats_lines": stats_lines,
            "stats_corpus": stats_corpus.name, "base": base_file, "torch": torch.__version__}
    rows = [{"label": "unedited", "after": {k: before.get(k) for k in METRICS}}]
    print(f"unedited: {rows[0]['after']}", flush=True)

    if args.kind == "sweep":
        grid = GRIDS[args.grid] if args.grid in GRIDS else json.loads(args.grid)
        if args.method == "ft":
            meta["base"] = "default_hparams(model, 'ft')"
            configs = [(json.dumps(o, sort_keys=True) if o else "default", "ft", False,
                        default_hparams(model, "ft").replace(**o)) for o in grid]
        else:
            configs = [(json.dumps(o, sort_keys=True) if o else "shipped", "alphaedit", True,
                        load_hparams(base_file, **o, mom2_n_samples=stats_lines)) for o in grid]
    else:
        configs = []
        for label in args.runs.split(","):
            method, sphere, file = RUNS[label]
            configs.append((label, method, sphere, load_hparams(file, mom2_n_samples=stats_lines)))
    edited = sorted({l for *_, hp in configs for l in hp.layers})
    base_weights = {f"model.layers.{l}.mlp.down_proj.weight": model.get_parameter(
        f"model.layers.{l}.mlp.down_proj.weight").detach().clone() for l in edited}
    for label, method, sphere, hp in configs:
        print(f"{label} ({method}{' + SPHERE' if sphere else ''})", flush=True)
        result = run_config(model, tokenizer, requests, hp, method=method, sphere=sphere, batch_size=args.batch_size,
                            reference=reference, base_weights=base_weights, stats_corpus=stats_corpus)
        rows.append({"label": label, "method": method, "sphere": sphere, "hparams": hp.to_dict(), **result})
        print(f"  -> {result['after']} in {result['edit_seconds']} s", flush=True)
        kind = f"edit{len(requests)}" if args.kind == "report" else ("sweep-ft" if args.method == "ft" else "sweep")
        stem = _write(kind, meta, rows)
    print(f"wrote {stem}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
