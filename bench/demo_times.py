"""Per-batch time split of a ``sphere-fast demo`` (or ``edit``) output folder, as a Markdown table.

Reads ``<out>/<run>/metrics/batch_*.json`` (each batch's ``info["seconds"]``, written by the
harness) for every run folder under ``out`` and prints one row per batch::

    python bench/demo_times.py out/demo
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

PARTS = ("stats", "targets", "keys", "solve", "sphere", "apply", "cache", "total")


def batch_rows(out: Path) -> list[tuple[str, int, dict]]:
    rows = []
    for run in sorted(p for p in out.iterdir() if (p / "metrics").is_dir()):
        for path in sorted((run / "metrics").glob("batch_*.json")):
            record = json.loads(path.read_text())
            seconds = (record.get("info") or {}).get("seconds")
            if seconds:  # batch 0 is the unedited evaluation
                rows.append((run.name, record["batch"], seconds))
    return rows


def markdown(rows: list[tuple[str, int, dict]]) -> str:
    lines = ["| run | batch | " + " | ".join(PARTS) + " |", "|---|---|" + "---|" * len(PARTS)]
    for run, batch, seconds in rows:
        lines.append(f"| {run} | {batch} | " + " | ".join(f"{seconds.get(p, 0.0):.2f}" for p in PARTS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print(__doc__, file=sys.stderr)
        return 2
    rows = batch_rows(Path(args[0]))
    if not rows:
        print(f"no metrics/batch_*.json with timings under {args[0]}", file=sys.stderr)
        return 1
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
