"""Markdown tables from benchmark JSON, and the GPU check's results files.

    python bench/report.py FILE.json [FILE.json ...]
        Tables for whatever the files hold: pytest-benchmark JSON of bench_projection.py,
        bench_real_weights.py, bench_cuda.py and bench_kernels.py (told apart by the ``kind`` in each
        benchmark's extra_info; older projection files without it by their ``case``), or the GPU
        check's combined JSON (accuracy, benchmarks, end-to-end batches). Every ratio divides the
        reference's median by a median measured in the same run.

    python bench/report.py --gpu-check WORK --out PREFIX [--mode MODE] [--dry-run]
        Gathers what scripts/gpu_check.sh left in WORK (steps.tsv, probe.json, accuracy.json,
        bench-*.json, e2e.json) into PREFIX.json and PREFIX.md, written atomically.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

# Last on the path: the installed package wins, and the GPU check's report is still written where its install failed.
sys.path.append(str(Path(__file__).resolve().parents[1]))
from sphere_fast.files import atomic_write_text  # noqa: E402

FORMAT = "sphere_fast-gpu-check/1"
PROJECTION_CASES = ["reference", "sparse_projection", "fit_apply", "refit_apply", "fit_apply_next", "refit"]
CASE_LABELS = {"reference": "reference", "sparse_projection": "sparse_projection", "fit_apply": "fit+apply",
               "refit_apply": "refit+apply", "fit_apply_next": "cold fit+apply of the changed W",
               "refit": "refit (legacy)"}
# pytest-benchmark files of the GPU check's steps, by suite (a suite may be split into one file per shape)
BENCH_FILES = {"kernels": "bench-kernels*.json", "cuda": "bench-cuda*.json", "projection": "bench-projection*.json",
               "real_weights": "bench-real*.json"}


# --------------------------------------------------------------------------- loading


def benchmark_kind(bench: dict) -> str | None:
    info = bench.get("extra_info", {})
    if "kind" in info:
        return info["kind"]
    return "projection" if "case" in info else None


def collect(data: dict) -> list[dict]:
    """Benchmarks of a pytest-benchmark JSON, or of every suite in a GPU-check JSON."""
    if data.get("format") == FORMAT:
        return [b for suite in data.get("benchmarks", {}).values() if suite for b in suite.get("benchmarks", [])]
    return data.get("benchmarks", [])


def median(bench: dict) -> float:
    return bench["stats"]["median"]


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != 0 and (abs(x) < 10 ** -digits or abs(x) >= 1e5):
            return f"{x:.2e}"
        return f"{x:.{digits}f}"
    return str(x)


def _cell(value) -> str:
    text = value if isinstance(value, str) else _fmt(value)
    return text.replace("|", "\\|")  # a bar inside a cell would end it


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- benchmark tables


def projection_table(benches: list[dict]) -> str:
    """One row per (device, shape, spectrum); the reference of the same shape when the group has none (†)."""
    groups: dict[tuple, dict] = defaultdict(dict)
    for b in benches:
        info = b["extra_info"]
        groups[(info["device"], tuple(info["shape"]), info["spectrum"])][info["case"]] = b
    references = {(dev, shape): cases["reference"] for (dev, shape, _), cases in groups.items() if "reference" in cases}
    present = [c for c in PROJECTION_CASES if any(c in cases for cases in groups.values())]
    shown = [c for c in present if c != "reference"]
    header = ["device", "shape", "spectrum", "r", "method (fit / refit)"] + [f"{CASE_LABELS[c]} (s)" for c in present]
    header += [f"{CASE_LABELS[c]} ×" for c in shown if c != "fit_apply_next"]
    if "refit_apply" in present and "fit_apply_next" in present:
        header.append("refit / cold fit of the same W")
    rows = []
    for (device, shape, spectrum), cases in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1][0] * kv[0][1][1], kv[0][2])):
        ref = cases.get("reference")
        mark = ""
        if ref is None and (device, shape) in references:
            ref, mark = references[(device, shape)], " †"
        any_info = next(iter(cases.values()))["extra_info"]
        rank = next((cases[c]["extra_info"].get("rank") for c in ("fit_apply", "reference", "refit_apply", "refit")
                     if c in cases), None)
        methods = " / ".join(cases[c]["extra_info"].get("method", "–") for c in ("fit_apply", "refit_apply")
                             if c in cases)
        row = [device, "×".join(map(str, shape)), spectrum, rank, methods or "–"]
        row += [median(cases[c]) if c in cases else (f"{median(ref):.3f}{mark}" if c == "reference" and ref else None)
                for c in present]
        for c in shown:
            if c == "fit_apply_next":
                continue
            row.append(f"{median(ref) / median(cases[c]):.1f}{mark}" if ref and c in cases else "–")
        if "refit_apply" in present and "fit_apply_next" in present:
            ok = "refit_apply" in cases and "fit_apply_next" in cases
            row.append(f"{median(cases['refit_apply']) / median(cases['fit_apply_next']):.2f}" if ok else "–")
        rows.append(row)
    note = ("\n\n† the reference of the same shape, measured on the 'decaying' spectrum (its cost is the d × d "
            "eigh, whatever the spectrum)." if any(groups[g].get("reference") is None for g in groups) else "")
    return _table(header, rows) + note


def real_weights_table(benches: list[dict]) -> str:
    layers: dict[int, dict] = defaultdict(dict)
    for b in benches:
        layers[b["extra_info"]["layer"]][b["extra_info"]["case"]] = b
    info = benches[0]["extra_info"]
    ranks = [c["fit_apply"]["extra_info"]["rank"] for c in layers.values() if "fit_apply" in c]
    methods = sorted({c[k]["extra_info"].get("method") for c in layers.values() for k in ("fit_apply", "refit_apply")
                      if k in c})
    med = lambda case: statistics.median(median(c[case]) for c in layers.values() if case in c)  # noqa: E731
    ratio = lambda a, b: [median(c[a]) / median(c[b]) for c in layers.values() if a in c and b in c]  # noqa: E731
    fit_x, refit_x, same = ratio("reference", "fit_apply"), ratio("reference", "refit_apply"), \
        ratio("refit_apply", "fit_apply_next")
    summary = _table(
        ["model", "device", "layers", "shape", "r (min–max of m)", "method", "reference (s, median)",
         "fit+apply (s)", "refit+apply (s)", "fit+apply × (median)", "refit+apply × (median)",
         "refit / cold fit of the same W (median, max)"],
        [[info["model"], info["device"], str(len(layers)), "×".join(map(str, info["shape"])),
          f"{min(ranks)}–{max(ranks)} of {min(info['shape'])}" if ranks else "–", ", ".join(m for m in methods if m),
          med("reference"), med("fit_apply"), med("refit_apply"), f"{statistics.median(fit_x):.1f}" if fit_x else "–",
          f"{statistics.median(refit_x):.1f}" if refit_x else "–",
          f"{statistics.median(same):.2f}, {max(same):.2f}" if same else "–"]],
    )
    per_layer = _table(
        ["layer", "r", "method", "reference (s)", "fit+apply (s)", "refit+apply (s)", "cold fit of the changed W (s)"],
        [[str(i), c.get("fit_apply", {}).get("extra_info", {}).get("rank"),
          c.get("fit_apply", {}).get("extra_info", {}).get("method", "–")]
         + [median(c[k]) if k in c else None for k in ("reference", "fit_apply", "refit_apply", "fit_apply_next")]
         for i, c in sorted(layers.items())],
    )
    return summary + "\n\n<details><summary>per layer</summary>\n\n" + per_layer + "\n\n</details>"


def eigensolver_table(benches: list[dict]) -> str:
    groups: dict[tuple, dict] = defaultdict(dict)
    for b in benches:
        info = b["extra_info"]
        groups[(info["m"], info["spectrum"])][info["case"]] = b
    rows = []
    for (m, spectrum), cases in sorted(groups.items()):
        eigh = cases.get("torch_eigh")

        def path(case):
            i = cases[case]["extra_info"] if case in cases else {}
            return f"{i.get('method', '–')}, {i.get('iterations', '–')} it ({i.get('tf32_iterations', '–')} TF32)"

        rows.append([str(m), spectrum, cases.get("cold", {}).get("extra_info", {}).get("rank"),
                     median(cases["cold"]) if "cold" in cases else None, path("cold"),
                     median(cases["warm"]) if "warm" in cases else None, path("warm"),
                     median(eigh) if eigh else None,
                     f"{median(eigh) / median(cases['cold']):.1f}" if eigh and "cold" in cases else "–",
                     f"{median(eigh) / median(cases['warm']):.1f}" if eigh and "warm" in cases else "–",
                     _mib(cases.get("warm"))])
    return _table(["m", "spectrum", "r", "cold (s)", "cold path", "warm (s)", "warm path", "torch eigh (s)",
                   "cold ×", "warm ×", "warm peak MiB"], rows)


def apply_table(benches: list[dict]) -> str:
    groups: dict[tuple, dict] = defaultdict(dict)
    for b in benches:
        info = b["extra_info"]
        groups[(info["model"], info["dtype"], info["r"])][info["case"]] = b
    rows = []
    for (model, dtype, r), cases in sorted(groups.items()):
        ext, ref = cases.get("cuda"), cases.get("torch")
        info = (ext or ref)["extra_info"]
        rows.append([model, "×".join(map(str, info["shape"])), dtype, str(r),
                     1e3 * median(ext) if ext else None, 1e3 * median(ref) if ref else None,
                     f"{median(ref) / median(ext):.2f}" if ext and ref else "–", _mib(ext)])
    return _table(["model", "shape", "dtype", "r", "cuda (ms)", "torch (ms)", "×", "cuda peak MiB"], rows)


def _mib(bench) -> str:
    value = bench["extra_info"].get("peak_extra_bytes") if bench else None
    return "–" if value is None else f"{value / 2**20:.0f}"


def kernels_table(benches: list[dict]) -> str:
    groups: dict[tuple, dict] = defaultdict(dict)
    for b in benches:
        info = b["extra_info"]
        groups[(info["kind"], info["model"], info["dtype"], info["precision"])][info["case"]] = b
    rows = []
    for (kind, model, dtype, precision), cases in sorted(groups.items()):
        tri, ref = cases.get("triton"), cases.get("torch")
        ti = tri["extra_info"] if tri else {}
        frac = ti.get("fraction_of_peak")
        rows.append([kind, model, "×".join(map(str, ti.get("shape", []))) or "–", f"{dtype}-{precision}",
                     1e3 * median(tri) if tri else None, 1e3 * median(ref) if ref else None,
                     f"{median(ref) / median(tri):.2f}" if tri and ref else "–",
                     ti.get("tflops"), "–" if frac is None else f"{100 * frac:.0f} %", ti.get("gbps")])
    return _table(["op", "model", "shape", "dtype-precision", "triton (ms)", "torch unfused (ms)", "×",
                   "TFLOP/s (as full GEMM)", "of dense peak", "GB/s"], rows)


def benchmark_sections(benches: list[dict]) -> list[str]:
    by_kind: dict[str, list] = defaultdict(list)
    for b in benches:
        kind = benchmark_kind(b)
        if kind:
            by_kind[kind].append(b)
    titles = [("projection", "Projection: reference vs sphere_fast", projection_table),
              ("real_weights", "Projection on real weights", real_weights_table),
              ("eigensolver", "CUDA eigensolver vs torch.linalg.eigh", eigensolver_table),
              ("apply", "Fused update W += B − α (B U) Uᵀ: CUDA vs torch", apply_table),
              ("gram", "Triton normalised Gram", kernels_table),
              ("energy", "Triton hyperspherical energy", kernels_table)]
    return [f"### {title}\n\n{fn(by_kind[kind])}" for kind, title, fn in titles if by_kind.get(kind)]


# --------------------------------------------------------------------------- accuracy and end-to-end


def accuracy_markdown(acc: dict) -> str:
    head = (f"Shape {'×'.join(map(str, acc['shape']))}, η = {acc['eta']}, α = {acc['alpha']}, device {acc['device']}, "
            f"Gram backend {acc['gram_backend']}, eigensolver {acc['eigensolver']}: "
            f"**{'all checks passed' if acc['ok'] else 'SOME CHECKS FAILED'}**.")
    parts = [head]
    if "oracle" in acc:
        parts.append(f"Small-side float64 reference equals the d × d one: {'yes' if acc['oracle']['ok'] else 'NO'}.")
    for case in acc["cases"]:
        title = f"**{case['dtype']} {case['spectrum']}**"
        if "error" in case:
            parts.append(f"{title}: error {case['error']}")
            continue
        parts.append(f"{title} (float64 r = {case['rank64']}, relative gap {case['gap']:.2e}; cold {case['cold']['method']}, "
                     f"warm {case['warm']['method']}; {case['seconds']:.1f} s)\n\n"
                     + _table(["check", "value", "bound", "ok", "note"],
                              [[r["name"], f"{r['value']:.3g}", "–" if r["bound"] is None else f"{r['bound']:.3g}",
                                "ok" if r["ok"] else "**FAIL**", r["note"] or ""] for r in case["checks"]]))
    return "\n\n".join(parts)


def e2e_markdown(result: dict) -> str:
    m, hp, s = result["model"], result["hparams"], result.get("summary")
    head = (f"{'Reduced configuration (dry run)' if result.get('tiny') else 'Llama3-8B configuration'}: "
            f"{m['num_hidden_layers']} layers, hidden {m['hidden_size']}, intermediate {m['intermediate_size']}, "
            f"vocabulary {m['vocab_size']}, {result['parameters'] / 1e9:.2f} B random {result['dtype']} parameters on "
            f"{result['environment']['device']}; AlphaEdit + SPHERE ({hp['source']}: layers {hp['layers']}, "
            f"{hp['v_num_grad_steps']} steps, η {hp['eta']}, α {hp['alpha']}, C0 from {hp['mom2_n_samples']} corpus lines), "
            f"{result['requests_per_batch']} requests per batch, one batch per projection path.")
    rows = []
    for b in result["batches"]:
        c = b["components"]
        rows.append([b["path"], b["batch"]] + [c[k] for k in ("targets", "keys", "solve", "sphere", "update", "other")]
                    + [b["sphere_split"]["fit"], b["sphere_split"]["apply"], f"{100 * b['sphere_share']:.2f} %",
                       ", ".join(b["methods"]), b["one_time_stats"]])
    table = _table(["path", "batch (s)", "targets", "keys", "AlphaEdit solve", "SPHERE", "update (cache_c)", "other",
                    "SPHERE fit/refit", "SPHERE apply", "SPHERE share", "method", "one-time stats (s)"], rows)
    if s is None:  # a run stopped before its last batch
        return "\n\n".join([head, table, f"Incomplete: only {len(result['batches'])} batches ran."])
    verdict = (
        f"SPHERE's share of the batch: {100 * s['sphere_share_refit']:.2f} % with warm refit "
        f"(target ≤ {100 * s['share_target']:.1f} %: {'met' if s['share_target_met'] else 'NOT met'}), "
        f"{100 * s['sphere_share_fit']:.2f} % with a cold fit, {100 * s['sphere_share_reference']:.2f} % with the "
        f"reference (the paper: {100 * s['paper_share']:.1f} %). Projection time saved against the reference: "
        f"{s['projection_saved_seconds']:.2f} s; batch time saved: {s['batch_saved_seconds']:.2f} s "
        f"({'at least' if s['batch_saving_covers_projection_saving'] else 'LESS than'} the projection's saving). "
        f"Costs of a refit batch, largest first: {', '.join(s['cost_ranking_refit'])}; "
        f"the largest after target optimisation: {s['next_largest_after_targets']}.")
    if s.get("overlap"):
        o = s["overlap"]
        verdict += (f" With the refits overlapping target optimisation (overlap_sphere_fit; its timers are not "
                    f"synchronised, its batch time is): batch {o['batch_seconds']:.3f} s against the refit batch's "
                    f"{o['batch_seconds'] + o['batch_saved_vs_refit']:.3f} s; SPHERE's share estimated at "
                    f"{100 * o['sphere_share_estimate']:.2f} % (the overlapped batch less the refit batch's other work).")
    parts = [head, table, verdict]
    dd = result.get("alphaedit_dd")
    if dd:
        rows = [["null-space projector, torch.linalg.eigh (the editing layer's nullspace_projector)", dd["nullspace_eigh"]["seconds"],
                 f"null-space dim {dd['nullspace_eigh']['null_dim']} of {dd['d']}"]]
        pkg = dd.get("nullspace_package")
        if pkg:
            at = dd.get("compared_at")
            where = f"; compared at threshold {at['threshold']:.3g} ({at['why']})" if at else ""
            rows.append(["null-space projector, package eigensolver (pairs above the threshold)", pkg["seconds"],
                         f"{pkg['method']}, {pkg['rank']} pairs, ‖P − P_eigh‖/‖P_eigh‖ = "
                         f"{pkg['relative_difference']:.1e}{where}"])
        sol = dd["solve"]
        rows += [["per-batch solve (alphaedit_update)", sol["seconds"], ""],
                 ["  of which P (K Kᵀ + cache_c), d³", sol["dd_product_seconds"], ""],
                 ["  of which torch.linalg.solve", sol["linalg_solve_seconds"], ""]]
        parts.append(f"AlphaEdit's d × d work on {dd['layer']} (d = {dd['d']}, {dd['dtype']}):\n\n"
                     + _table(["step", "seconds", "note"], rows))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- the GPU check's files


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _suite(paths: list[Path]) -> dict | None:
    """pytest-benchmark files of one suite, merged, without the per-round data: what the tables
    need, and the machine."""
    raws = [raw for raw in map(_read_json, paths) if raw]
    if not raws:
        return None
    keep = ("min", "max", "mean", "median", "stddev", "rounds", "iqr")
    return {
        "files": [p.name for p in paths], "datetime": raws[0].get("datetime"),
        "machine_info": raws[0].get("machine_info"), "commit_info": raws[0].get("commit_info"),
        "benchmarks": [{"name": b["name"], "group": b.get("group"), "extra_info": b.get("extra_info", {}),
                        "stats": {k: b["stats"][k] for k in keep if k in b["stats"]}}
                       for raw in raws for b in raw.get("benchmarks", [])],
    }


def read_steps(path: Path) -> list[dict]:
    steps = []
    if path.exists():
        for line in path.read_text().splitlines():
            name, status, rc, seconds, limit, note = (line.split("\t") + [""] * 6)[:6]
            steps.append({"name": name, "status": status, "rc": int(rc) if rc.lstrip("-").isdigit() else None,
                          "seconds": int(seconds) if seconds.isdigit() else None,
                          "timeout": int(limit) if limit.isdigit() else None,
                          "note": note})
    return steps


def gpu_check_result(work: Path, *, mode: str, dry_run: bool) -> dict:
    return {
        "format": FORMAT, "mode": mode, "dry_run": dry_run,
        "environment": _read_json(work / "probe.json"),
        "steps": read_steps(work / "steps.tsv"),
        "accuracy": _read_json(work / "accuracy.json"),
        "benchmarks": {name: suite for name, pattern in BENCH_FILES.items()
                       if (suite := _suite(sorted(work.glob(pattern)))) is not None},
        "e2e": _read_json(work / "e2e.json"),
    }


def gpu_check_markdown(result: dict) -> str:
    env = result.get("environment") or {}
    commit = (env.get("commit") or {}).get("id") or "?"
    dirty = " (uncommitted changes)" if (env.get("commit") or {}).get("dirty") else ""
    lines = [f"# GPU check{' (dry run)' if result['dry_run'] else ''}: {env.get('device', '?')}, {result['mode']}", "",
             f"Date {env.get('date', '?')}, commit {commit[:10]}{dirty}; torch {env.get('torch')} (CUDA "
             f"{env.get('torch_cuda')}), triton {env.get('triton')}, transformers {env.get('transformers')}, nvcc "
             f"{env.get('nvcc')}, driver {env.get('driver', '–')}, Python {env.get('python')}.", "", "## Steps", "",
             _table(["step", "status", "seconds", "timeout", "note"],
                    [[s["name"], s["status"], s["seconds"], s["timeout"], s["note"]] for s in result["steps"]])]
    if result.get("accuracy"):
        lines += ["", "## Accuracy against float64", "", accuracy_markdown(result["accuracy"])]
    benches = collect(result)
    if benches:
        lines += ["", "## Benchmarks (medians; ratios against the reference measured in the same run)", ""]
        lines += ["\n\n".join(benchmark_sections(benches))]
    if result.get("e2e"):
        lines += ["", "## End-to-end batches", "", e2e_markdown(result["e2e"])]
    return "\n".join(lines) + "\n"


def write_gpu_check(work: Path, prefix: Path, *, mode: str, dry_run: bool) -> dict:
    result = gpu_check_result(work, mode=mode, dry_run=dry_run)
    atomic_write_text(prefix.with_name(prefix.name + ".json"), json.dumps(result, indent=1))
    atomic_write_text(prefix.with_name(prefix.name + ".md"), gpu_check_markdown(result))
    return result


# --------------------------------------------------------------------------- command line


def describe(path: str, data: dict) -> str:
    if data.get("format") == FORMAT:
        env = data.get("environment") or {}
        return f"<!-- {path}: {env.get('date')}, commit {((env.get('commit') or {}).get('id') or '?')[:10]}, {env.get('device')} -->"
    machine, commit = data.get("machine_info", {}), data.get("commit_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "?"))
    return f"<!-- {path}: {data.get('datetime')}, commit {(commit.get('id') or '?')[:10]}, {cpu} -->"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="pytest-benchmark or GPU-check JSON files")
    parser.add_argument("--gpu-check", type=Path, metavar="WORK", help="gather a GPU check's work folder")
    parser.add_argument("--out", type=Path, metavar="PREFIX", help="with --gpu-check: write PREFIX.json and PREFIX.md")
    parser.add_argument("--mode", default="all")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.gpu_check:
        if args.out is None:
            parser.error("--gpu-check needs --out PREFIX")
        result = write_gpu_check(args.gpu_check, args.out, mode=args.mode, dry_run=args.dry_run)
        print(f"wrote {args.out}.json and {args.out}.md ({len(collect(result))} benchmarks)")
        return 0
    if not args.files:
        parser.print_help()
        return 2
    benches, sections = [], []
    for path in args.files:
        with open(path) as fh:
            data = json.load(fh)
        print(describe(path, data))
        benches += collect(data)
        if data.get("format") == FORMAT:
            if data.get("accuracy"):
                sections.append("### Accuracy against float64\n\n" + accuracy_markdown(data["accuracy"]))
            if data.get("e2e"):
                sections.append("### End-to-end batches\n\n" + e2e_markdown(data["e2e"]))
        elif "batches" in data and "summary" in data:
            sections.append("### End-to-end batches\n\n" + e2e_markdown(data))
    print("\n\n".join(benchmark_sections(benches) + sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
