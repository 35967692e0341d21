"""Turn pytest-benchmark JSON into a Markdown table of times and ratios against the reference.

    python bench/report.py bench/results/<file>.json [more.json ...]

Each group (device, shape, spectrum) is reported with the median time of each
case and the reference's median divided by it; all from the same run.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def load(paths):
    rows = defaultdict(dict)
    meta = []
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        meta.append((path, data.get("machine_info", {}), data.get("commit_info", {}), data.get("datetime")))
        for bench in data["benchmarks"]:
            info = bench.get("extra_info", {})
            if "case" not in info:
                continue
            rows[bench["group"]][info["case"]] = (bench["stats"]["median"], info)
    return rows, meta


def table(rows) -> str:
    cases = ["reference", "sparse_projection", "fit_apply", "refit"]
    out = ["| device | shape | spectrum | r | " + " | ".join(f"{c} (s)" for c in cases)
           + " | sparse_projection × | fit+apply × | refit × |",
           "|---|---|---|---|" + "---|" * len(cases) + "---|---|---|"]
    for group in sorted(rows):
        cell = rows[group]
        any_info = next(iter(cell.values()))[1]
        ref = cell.get("reference", (None,))[0]
        times = [f"{cell[c][0]:.3f}" if c in cell else "–" for c in cases]
        ratios = [f"{ref / cell[c][0]:.1f}" if ref and c in cell else "–" for c in cases[1:]]
        rank = cell.get("fit_apply", cell.get("reference", (None, {})))[1].get("rank", "–")
        shape = "×".join(map(str, any_info["shape"]))
        out.append(f"| {any_info['device']} | {shape} | {any_info['spectrum']} | {rank} | "
                   + " | ".join(times) + " | " + " | ".join(ratios) + " |")
    return "\n".join(out)


def main(argv) -> int:
    if not argv:
        print(__doc__)
        return 2
    rows, meta = load(argv)
    for path, machine, commit, when in meta:
        cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "?"))
        print(f"<!-- {path}: {when}, commit {commit.get('id', '?')[:10]}, {cpu} -->")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
