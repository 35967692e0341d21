"""The study's report: every run merged into tables and figures, from whatever is finished.

``write_report(out)`` writes ``out/report/``: ``study.md`` and ``study.json`` (tables at fixed edit
counts, Spearman correlations of energy change with each metric, time per 100 edits) and the
figures: ``metrics.png`` (editing metrics against edits), ``energy.png`` (energy per edited layer),
``energy_vs_accuracy.png`` (change in energy against change in accuracy between evaluations,
pooled, with a fitted line), ``general.png`` (general abilities), ``geometry.png`` (the first
edited layer's rows, unedited and at the last checkpoint) and ``sphere_gain.png`` (each method with and
without SPHERE at the last edit count both reached, as the paper's Fig. 7). One colour per run in every
figure but the last, which has one per metric.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from .report import atomic_write_bytes, format_table, mean_energy_drift, read_csv, read_json, write_json
from .study_spec import EDIT_METRICS, GENERAL_METRICS

GAIN_METRICS = ("efficacy", "generalization", "specificity")  # the paper's Fig. 7


def sphere_gains(spec: dict, runs: dict[str, dict]) -> list[dict]:
    """For each method run both without and with SPHERE: the metrics of both at the largest edit count
    both have evaluated, and SPHERE's relative gain in percent (the paper's Fig. 7)."""
    by_method = {r["method"]: r["name"] for r in spec["runs"]}
    gains = []
    for method, plain in by_method.items():
        projected = by_method.get(f"{method}+sphere")
        if method.endswith("+sphere") or projected is None:
            continue
        evals = {name: {int(r["edits"]): r for r in runs[name]["evals"]} for name in (plain, projected)}
        common = sorted((set(evals[plain]) & set(evals[projected])) - {0})
        if not common:
            continue
        edits = common[-1]
        row = {"method": method, "without": plain, "with": projected, "edits": edits}
        for m in GAIN_METRICS:
            a, b = evals[plain][edits].get(m), evals[projected][edits].get(m)
            row[m] = {"without": a, "with": b,
                      "gain_percent": 100.0 * (b - a) / a if a not in (None, "") and b not in (None, "") and a else None}
        gains.append(row)
    return gains


TABLE_AT = (500, 1000, 2000)
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


# Measures that grow by orders of magnitude once an editor collapses: on a linear axis their
# collapse flattens every other run's curve.
LOG_SCALE_METRICS = ("perplexity",)


def general_metrics(spec: dict) -> tuple[str, ...]:
    """The general-ability measures of a study (``spec``: spec.json's "spec"), its tasks included."""
    return GENERAL_METRICS + tuple(spec.get("general_tasks") or ())


def load_runs(out: Path) -> dict[str, dict]:
    """``{run name: {"status", "rows" (every batch), "evals" (rows with metrics)}}`` in spec order."""
    spec = read_json(out / "spec.json")["spec"]
    runs = {}
    for run in spec["runs"]:
        folder = out / "runs" / run["name"]
        rows = read_csv(folder / "edits.csv") if (folder / "edits.csv").exists() else []
        status = read_json(folder / "status.json") if (folder / "status.json").exists() else {"state": "pending",
                                                                                              "edits": 0}
        runs[run["name"]] = {"status": status, "rows": rows,
                             "evals": [r for r in rows if r.get("efficacy") not in (None, "")]}
    return runs


def accuracy(row: dict) -> float:
    """Mean of efficacy, generalization and specificity (the paper's Fig. 3 'accuracy')."""
    return sum(float(row[k]) for k in ("efficacy", "generalization", "specificity")) / 3


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(x) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else None


def _at(evals: list[dict], edits: int) -> dict | None:
    return next((r for r in evals if int(r["edits"]) == edits), None)


def summarise(out: Path) -> dict:
    runs = load_runs(out)
    baseline = read_json(out / "baseline.json") if (out / "baseline.json").exists() else {}
    spec = read_json(out / "spec.json")
    general = general_metrics(spec["spec"])
    table, correlations, times, states = [], {}, {}, {}
    points = []  # (run, delta energy, delta accuracy)
    for name, run in runs.items():
        done = max((int(r["edits"]) for r in run["rows"]), default=0)  # status.json is written at checkpoints
        states[name] = {**run["status"], "edits": max(done, int(run["status"].get("edits") or 0))}
        if states[name]["state"] == "done" and states[name]["edits"] < spec["spec"]["horizon"]:
            states[name]["state"] = "paused"  # done to a shorter horizon the study has since grown from
        evals = run["evals"]
        if not evals:
            continue
        first = evals[0]
        # The first evaluation at or after each of TABLE_AT (500 falls between evaluations every 200), and
        # every evaluation that scored all the requests edited so far (full_eval_at).
        marks = {0, int(evals[-1]["edits"])}
        marks |= {next(int(r["edits"]) for r in evals if int(r["edits"]) >= t) for t in TABLE_AT
                  if int(evals[-1]["edits"]) >= t}
        marks |= {int(t) for t in spec["spec"].get("full_eval_at") or ()}
        for edits in sorted(marks):
            row = _at(evals, edits)
            if row is not None:
                table.append({"run": name, "edits": edits, "eval_requests": row.get("eval_requests"),
                              **{k: row.get(k) for k in EDIT_METRICS + general},
                              "energy_change": mean_energy_drift(row, first)})
        drift = [mean_energy_drift(r, first) for r in evals]
        correlations[name] = {m: spearman(drift, [float(r[m]) for r in evals])
                              for m in EDIT_METRICS + general if all(r.get(m) not in (None, "") for r in evals)}
        for a, b in zip(evals, evals[1:]):
            points.append((name, mean_energy_drift(b, first) - mean_energy_drift(a, first), accuracy(b) - accuracy(a)))
        timed = [r for r in run["rows"] if r.get("seconds_total") not in (None, "")]
        if timed:
            per_edit = lambda key: sum(float(r.get(key) or 0.0) for r in timed) / sum(  # noqa: E731
                int(r["edits"]) - int(p["edits"]) for p, r in zip(run["rows"], run["rows"][1:]) if r in timed)
            total = per_edit("seconds_total") - per_edit("seconds_stats")
            times[name] = {"edit_s_per_100": 100 * total, "targets_s_per_100": 100 * per_edit("seconds_targets"),
                           "sphere_s_per_100": 100 * per_edit("seconds_sphere"),
                           "eval_s": [float(r.get("seconds_eval_edits") or 0) + float(r.get("seconds_eval_general")
                                                                                      or 0) for r in evals[1:]],
                           "eval_s_per_request": _eval_per_request(evals[1:]),
                           "batches_timed": len(timed)}
    fit = None
    if len(points) >= 3:
        xs, ys = [p[1] for p in points], [p[2] for p in points]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        if sxx:
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
            fit = {"slope": slope, "intercept": my - slope * mx, "points": len(points),
                   "pearson": _pearson(xs, ys)}
    geometry = {}
    for name in runs:
        path = out / "runs" / name / "geometry.json"
        if path.exists():
            g = read_json(path)
            geometry[name] = {"layer": g["layer"], "edits": g.get("edits"), "rows": g["rows"],
                              "mean_abs_cos_before": g["mean_abs_cos_before"],
                              "mean_abs_cos_after": g["mean_abs_cos_after"]}
    return {"spec": spec, "states": states, "geometry": geometry, "sphere_gains": sphere_gains(spec["spec"], runs),
            "baseline": {k: baseline.get(k) for k in ("general", "edit_metrics",
                                                                                      "seconds")},
            "retention_set": (baseline.get("retention") or {}).get("known"),
            "table": table, "spearman_energy_change": correlations, "energy_accuracy_fit": fit,
            "energy_accuracy_points": points, "times": times}


def _pearson(xs, ys) -> float | None:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else None


def _markdown(summary: dict) -> str:
    f = lambda v, d=3: "–" if v in (None, "") else (f"{float(v):.{d}f}")  # noqa: E731
    lines = ["# Long-horizon study", ""]
    spec = summary["spec"]["spec"]
    lines.append(f"Model {spec['model']}, data {Path(spec['data']).name}, horizon {spec['horizon']}, batches of "
                 f"{spec['batch_size']}, evaluation every {spec['eval_every']} edits on a fixed sample of "
                 f"{spec['eval_sample']} edited requests (all of them at {', '.join(map(str, spec['full_eval_at']))} "
                 f"edits and at the horizon); commit {str(summary['spec'].get('commit'))[:10]}.")
    for grown in summary["spec"].get("grown", []):
        lines.append(f"The horizon grew from {grown['from_horizon']} on {grown['date']} (commit "
                     f"{str(grown['commit'])[:10]}): the sampled evaluations up to it drew from the first "
                     f"{grown['from_horizon']} requests.")
    lines.append("")
    lines.append("| run | state | edits done | note |")
    lines.append("|---|---|---|---|")
    for name, st in summary["states"].items():
        lines.append(f"| {name} | {st.get('state')} | {st.get('edits')} | {st.get('reason', '')} |")
    lines.append("")
    lines.append("## Metrics (edits so far; general abilities against the unedited model)")
    lines.append("")
    cols = [("run", "run", ""), ("edits", "edits", ""), ("eval_requests", "scored", "")]
    cols += [(m, m, ".3f") for m in EDIT_METRICS] + [("perplexity", "perplexity", ".2f"), ("kl", "KL", ".4f"),
                                                      ("top1_agreement", "top-1 agree", ".3f"),
                                                      ("retention", "retention", ".3f"), ("fluency", "fluency", ".2f"),
                                                      *[(t, t, ".3f") for t in spec.get("general_tasks") or ()],
                                                      ("energy_change", "energy change", ".2e")]
    lines.append("```")
    lines.append(format_table(summary["table"], cols))
    lines.append("```")
    lines.append("")
    lines.append("## Spearman correlation of the energy change with each metric (per run, over evaluations)")
    lines.append("")
    metrics = EDIT_METRICS + general_metrics(spec)
    lines.append("| run | " + " | ".join(metrics) + " |")
    lines.append("|---|" + "---|" * len(metrics))
    for name, corr in summary["spearman_energy_change"].items():
        lines.append(f"| {name} | " + " | ".join(f(corr.get(m), 2) for m in metrics) + " |")
    fit = summary["energy_accuracy_fit"]
    if fit:
        lines += ["", f"Change in accuracy against change in energy between consecutive evaluations, pooled over "
                      f"runs ({fit['points']} points): slope {fit['slope']:.3g}, Pearson r {f(fit['pearson'], 2)}."]
    if summary.get("sphere_gains"):
        lines += ["", "## SPHERE as a plug-in (the paper's Fig. 7): without -> with, relative gain", "",
                  "| method | edits | " + " | ".join(GAIN_METRICS) + " |", "|---|---|" + "---|" * len(GAIN_METRICS)]
        for g in summary["sphere_gains"]:
            cells = [f"{f(g[m]['without'])} -> {f(g[m]['with'])} ({f(g[m]['gain_percent'], 1)} %)" for m in GAIN_METRICS]
            lines.append(f"| {g['method']} | {g['edits']} | " + " | ".join(cells) + " |")
    if summary.get("geometry"):
        lines += ["", "## Neuron geometry of the first edited layer (mean |cos| between distinct unit rows)", "",
                  "| run | layer | edits | rows | unedited | edited |", "|---|---|---|---|---|---|"]
        for name, g in summary["geometry"].items():
            lines.append(f"| {name} | {g['layer']} | {g['edits'] if g['edits'] is not None else '–'} | {g['rows']} | "
                         f"{g['mean_abs_cos_before']:.4f} | {g['mean_abs_cos_after']:.4f} |")
    if summary["times"]:
        lines += ["", "## Time per 100 edits on this machine (key statistics excluded; see the spec's commit)", "",
                  "| run | edit (s) | target optimisation (s) | SPHERE (s) | mean evaluation (s) "
                  "| editing metrics per scored request (s) | batches timed |",
                  "|---|---|---|---|---|---|---|"]
        for name, t in summary["times"].items():
            ev = sum(t["eval_s"]) / len(t["eval_s"]) if t["eval_s"] else None
            lines.append(f"| {name} | {f(t['edit_s_per_100'], 1)} | {f(t['targets_s_per_100'], 1)} | "
                         f"{f(t['sphere_s_per_100'], 2)} | {f(ev, 1)} | {f(t.get('eval_s_per_request'), 3)} | "
                         f"{t['batches_timed']} |")
    return "\n".join(lines) + "\n"


def _eval_per_request(evals) -> float | None:
    """Seconds of the editing metrics per scored request (three prompts and the neighbours), over evaluations."""
    timed = [r for r in evals if r.get("seconds_eval_edits") not in (None, "") and r.get("eval_requests")]
    requests = sum(int(r["eval_requests"]) for r in timed)
    return sum(float(r["seconds_eval_edits"]) for r in timed) / requests if requests else None


def _colours(names) -> dict[str, str]:
    return {n: COLOURS[i % len(COLOURS)] for i, n in enumerate(names)}


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _plots(out: Path, runs: dict, summary: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = _colours(runs)
    folder = out / "report"
    written = []

    def panels(metrics, name):
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
        for ax, m in zip(axes[0], metrics):
            for run, data in runs.items():
                pts = [(int(r["edits"]), float(r[m])) for r in data["evals"] if r.get(m) not in (None, "")]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, color=colour[run], label=run)
            log = m in LOG_SCALE_METRICS
            ax.set_title(m + (" (log scale)" if log else ""))
            ax.set_yscale("log" if log else "linear")
            ax.set_xlabel("edits")
            ax.grid(alpha=0.3)
        if axes[0][0].get_legend_handles_labels()[0]:
            axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, folder / name))
        plt.close(fig)

    panels(EDIT_METRICS, "metrics.png")
    panels(general_metrics(summary["spec"]["spec"]), "general.png")

    layers = sorted({k for d in runs.values() for r in d["rows"][:1] for k in r if k.startswith("energy:")})
    if layers:
        fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers), 3.2), squeeze=False)
        for ax, layer in zip(axes[0], layers):
            for run, data in runs.items():
                rows = [r for r in data["rows"] if r.get(layer) not in (None, "")]
                if rows:  # relative to the unedited layer: the changes are small next to the energy
                    base = float(rows[0][layer])
                    ax.plot([int(r["edits"]) for r in rows], [float(r[layer]) / base - 1 for r in rows],
                            color=colour[run], label=run)
            ax.set_title(layer[len("energy:"):].replace("model.layers.", "L"), fontsize=8)
            ax.set_xlabel("edits")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("hyperspherical energy, E / E0 - 1")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, folder / "energy.png"))
        plt.close(fig)

    if summary["energy_accuracy_points"]:
        fig, ax = plt.subplots(figsize=(4.5, 3.6))
        for run in runs:
            pts = [(x, y) for r, x, y in summary["energy_accuracy_points"] if r == run]
            if pts:
                ax.scatter(*zip(*pts), color=colour[run], label=run, s=14)
        fit = summary["energy_accuracy_fit"]
        if fit:
            xs = [p[1] for p in summary["energy_accuracy_points"]]
            lo, hi = min(xs), max(xs)
            ax.plot([lo, hi], [fit["intercept"] + fit["slope"] * lo, fit["intercept"] + fit["slope"] * hi], "k--",
                    lw=1, label=f"fit, slope {fit['slope']:.3g}")
        ax.set_xlabel("change in mean relative energy")
        ax.set_ylabel("change in accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, folder / "energy_vs_accuracy.png"))
        plt.close(fig)

    geometries = {run: read_json(out / "runs" / run / "geometry.json") for run in runs
                  if (out / "runs" / run / "geometry.json").exists()}
    if geometries:
        fig, axes = plt.subplots(1, len(geometries) + 1, figsize=(3.4 * (len(geometries) + 1), 3.4), squeeze=False)
        first = next(iter(geometries.values()))
        axes[0][0].scatter(*zip(*first["before"]), s=3, color="grey")
        axes[0][0].set_title(f"unedited\nmean |cos| {first['mean_abs_cos_before']:.4f}", fontsize=8)
        for ax, (run, g) in zip(axes[0][1:], geometries.items()):
            ax.scatter(*zip(*g["after"]), s=3, color=colour[run])
            at = f" at {g['edits']:,} edits" if "edits" in g else ""
            ax.set_title(f"{run}{at}\nmean |cos| {g['mean_abs_cos_after']:.4f}", fontsize=8)
        for ax in axes[0]:
            ax.set_aspect("equal", adjustable="datalim")
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"{first['layer']}: {first['rows']} unit rows on the unedited rows' first two principal axes",
                     fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, folder / "geometry.png"))
        plt.close(fig)

    gains = summary.get("sphere_gains") or []
    if gains:
        fig, ax = plt.subplots(figsize=(2.2 + 1.9 * len(gains), 3.4))
        width = 0.4 / len(GAIN_METRICS)
        for k, m in enumerate(GAIN_METRICS):
            for i, g in enumerate(gains):
                x = i + (k - (len(GAIN_METRICS) - 1) / 2) * 2 * width
                without, with_ = (float(g[m][side] or 0.0) for side in ("without", "with"))
                ax.bar(x - width / 2, without, width, color=COLOURS[k], alpha=0.35,
                       label=f"{m}, without" if i == 0 else None)
                ax.bar(x + width / 2, with_, width, color=COLOURS[k], label=f"{m}, + SPHERE" if i == 0 else None)
        ax.set_xticks(range(len(gains)), [f"{g['method']}\n({g['edits']} edits)" for g in gains])
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, ncol=len(GAIN_METRICS), loc="upper center", bbox_to_anchor=(0.5, -0.22))
        fig.tight_layout()
        written.append(_save(fig, folder / "sphere_gain.png"))
        plt.close(fig)
    return written


def write_report(out: str | Path) -> list[Path]:
    """Write ``out/report/`` (see the module docstring); returns the files written."""
    out = Path(out)
    summary = summarise(out)
    folder = out / "report"
    write_json(folder / "study.json", summary)
    md = folder / "study.md"
    atomic_write_bytes(md, _markdown(summary).encode())
    return [folder / "study.json", md, *_plots(out, load_runs(out), summary)]
