"""Run records on disk: JSON, a CSV row per batch, PNG plots, text tables.

Every file is written to a temporary file in the same folder and renamed into
place (:mod:`sphere_fast.files`), so a reader (or a resumed run) never sees a
half-written file.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..files import atomic_write_bytes, atomic_write_text

METRIC_COLUMNS = ("efficacy", "generalization", "specificity", "locality", "fluency")
BASE_COLUMNS = ("batch", "edits", "batch_size", "seconds_total", "seconds_stats", "seconds_sphere", "eval_requests")
ENERGY_PREFIX = "energy:"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "numel", lambda: 2)() == 1:
        return obj.item()  # 0-d tensors
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- CSV


def columns_of(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Base columns, then energy columns (sorted), then metrics, then anything else, as present."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    energy = sorted(k for k in keys if k.startswith(ENERGY_PREFIX))
    ordered = [k for k in BASE_COLUMNS if k in keys] + energy + [k for k in METRIC_COLUMNS if k in keys]
    return ordered + [k for k in keys if k not in ordered]


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    cols = columns_of(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in cols})
    atomic_write_text(path, buf.getvalue())


def _parse_cell(text: str) -> Any:
    # Integers read back as integers, so a resumed run rewrites earlier rows exactly as they were written.
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows with numbers parsed back (empty cells dropped)."""
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        for raw in csv.DictReader(fh):
            row = {k: _parse_cell(v) for k, v in raw.items() if v is not None and v != ""}
            for k in ("batch", "edits", "batch_size", "eval_requests"):
                if isinstance(row.get(k), float):  # records written as 3.0 by older versions
                    row[k] = int(row[k])
            out.append(row)
    return out


# --------------------------------------------------------------------------- summaries


def energy_columns(row: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in row if k.startswith(ENERGY_PREFIX))


def energy_drift(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Relative change E/E0 - 1 of each layer's energy from the first row to the last."""
    if not rows:
        return {}
    first, last = rows[0], rows[-1]
    return {
        k[len(ENERGY_PREFIX):]: last[k] / first[k] - 1.0
        for k in energy_columns(first) if k in last and first[k]
    }


def mean_energy_drift(row: Mapping[str, Any], first: Mapping[str, Any]) -> float | None:
    """Mean over the edited layers of the relative change in hyperspherical energy from ``first``."""
    vals = [(float(row[k]) - float(first[k])) / float(first[k]) for k in energy_columns(first)
            if row.get(k) not in (None, "") and first[k] not in (None, "") and float(first[k])]
    return sum(vals) / len(vals) if vals else None


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table; ``columns`` are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            v = row.get(key)
            line.append("-" if v is None else (format(v, spec) if spec else str(v)))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = []
    for n, r in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# --------------------------------------------------------------------------- plots


def figure(ncols: int):
    """(pyplot, figure, axes) of one row of ``ncols`` plots, on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 3.8), squeeze=False)
    return plt, fig, axes[0]


def save_png(plt, fig, path: str | Path) -> None:
    """Write ``fig`` to ``path`` as a PNG, atomically, and close it."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_run(rows: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "") -> None:
    """Metrics (left) and each edited layer's energy relative to the first row (right) against edits."""
    plt, fig, (ax_m, ax_e) = figure(2)
    evaluated = [r for r in rows if any(r.get(k) is not None for k in METRIC_COLUMNS)]
    for key in METRIC_COLUMNS:
        pts = [(r["edits"], r[key]) for r in evaluated if r.get(key) is not None]
        if pts and key != "fluency":
            ax_m.plot(*zip(*pts), marker="o", label=key)
        elif pts:  # n-gram entropy in bits: its own axis
            ax_f = ax_m.twinx()
            ax_f.plot(*zip(*pts), marker="s", linestyle="--", color="grey", label="fluency (right)")
            ax_f.set_ylabel("fluency (n-gram entropy, bits)")
            ax_m.plot([], [], marker="s", linestyle="--", color="grey", label="fluency (right)")
    ax_m.set_xlabel("edits")
    ax_m.set_ylabel("top-1 token accuracy")
    ax_m.set_ylim(-0.02, 1.02)
    ax_m.grid(alpha=0.3)
    if evaluated:
        ax_m.legend(fontsize=8)
    ax_m.set_title("metrics (on the requests edited so far)", fontsize=9)
    if rows:
        first = rows[0]
        for key in energy_columns(first):
            pts = [(r["edits"], r[key] / first[key]) for r in rows if key in r and first[key]]
            ax_e.plot(*zip(*pts), label=key[len(ENERGY_PREFIX):])
    ax_e.set_xlabel("edits")
    ax_e.set_ylabel("hyperspherical energy / initial")
    ax_e.grid(alpha=0.3)
    ax_e.legend(fontsize=7)
    ax_e.set_title("energy of the edited weights", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    save_png(plt, fig, path)


def plot_comparison(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, *, title: str = "") -> None:
    """Several runs: mean energy drift, efficacy and specificity/locality against edits."""
    plt, fig, (ax_e, ax_eff, ax_spec) = figure(3)
    for label, rows in runs.items():
        if not rows:
            continue
        first = rows[0]
        pts = [(r["edits"], mean_energy_drift(r, first)) for r in rows]
        pts = [(x, 100 * y) for x, y in pts if y is not None]
        if pts:
            ax_e.plot(*zip(*pts), label=label)
        for ax, keys in ((ax_eff, ("efficacy", "generalization")), (ax_spec, ("specificity", "locality"))):
            for key in keys:
                q = [(r["edits"], r[key]) for r in rows if r.get(key) is not None]
                if q:
                    ax.plot(*zip(*q), marker="o", linestyle="-" if key in ("efficacy", "specificity") else "--",
                            label=f"{label}: {key}")
    ax_e.set_ylabel("mean energy change (%)")
    ax_eff.set_ylabel("top-1 token accuracy")
    ax_spec.set_ylabel("top-1 token accuracy")
    for ax in (ax_e, ax_eff, ax_spec):
        ax.set_xlabel("edits")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in (ax_eff, ax_spec):
        ax.set_ylim(-0.02, 1.02)
    if title:
        fig.suptitle(title, fontsize=10)
    save_png(plt, fig, path)
