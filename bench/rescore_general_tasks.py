"""A study's general-ability tasks scored again, from its checkpoints, with the package's current scorer.

When a task's scoring changes (NQ-open's gold answers count only as whole words since the study's later
evaluations), this says whether the figures a study already recorded would have come out differently: for
the unedited model and the latest checkpoint of each run (in the cache: the machine that ran it) it scores
the spec's ``general_tasks`` on the same seeded items and puts the recorded accuracy beside it::

    python bench/rescore_general_tasks.py [--out bench/results/cpu-smollm2-study] [--only alphaedit ...]

Writes ``<out>/general_tasks_rescored.json`` (with the date, commit and machine).
"""
from __future__ import annotations

import sys
from pathlib import Path

import benchutil  # puts the repository root on sys.path
from sphere_fast.harness.general_tasks import evaluate_task, load_task
from sphere_fast.harness.model_sources import load_model
from sphere_fast.harness.report import read_csv, read_json, write_json
from sphere_fast.harness.sequential import checkpoint_weights
from sphere_fast.harness.study_baseline import set_weights
from sphere_fast.harness.study_spec import checkpoint_edits, latest_checkpoints


def _recorded(out: Path, run: str, edits: int, task: str):
    """The accuracy the study recorded for ``run`` after ``edits`` edits (None where it scored none)."""
    rows = [r for r in read_csv(out / "runs" / run / "edits.csv") if r["edits"] == edits]
    value = rows[-1].get(task) if rows else None
    return None if value in (None, "") else float(value)


def rescore(spec, out: Path, model, tokenizer, only=()) -> dict:
    """``{task: {"unedited" | run: {"edits", "recorded", "now"}}}`` for the runs with a checkpoint here."""
    baseline = read_json(out / "baseline.json")["general"]
    items = {task: load_task(task, spec.general_task_samples, seed=spec.seed) for task in spec.general_tasks}
    score = lambda task: evaluate_task(model, tokenizer, task, items[task],  # noqa: E731
                                       batch_size=spec.eval_batch_size)["accuracy"]
    result = {task: {"unedited": {"edits": 0, "recorded": baseline.get(task), "now": score(task)}}
              for task in spec.general_tasks}
    names = [run.name for run in spec.runs if not only or run.name in only]
    for name, ckpt in latest_checkpoints(spec, out, names, log=lambda m: print(m, file=sys.stderr)).items():
        edits = checkpoint_edits(spec, ckpt)
        original = set_weights(model, checkpoint_weights(ckpt))
        try:
            for task in spec.general_tasks:
                result[task][name] = {"edits": edits, "recorded": _recorded(out, name, edits, task),
                                      "now": score(task)}
        finally:
            set_weights(model, original)
    return result


def main(argv=None) -> int:
    out, spec, only = benchutil.study_folder_args(__doc__.split("\n\n")[0], "bench/results/cpu-smollm2-study", argv)
    if not spec.general_tasks:
        print(f"{out / 'spec.json'} scores no general-ability task", file=sys.stderr)
        return 1
    model, tokenizer = load_model(spec.model, dtype=spec.dtype)
    result = rescore(spec, out, model, tokenizer, only)
    for task, rows in result.items():
        for name, row in rows.items():
            recorded = "-" if row["recorded"] is None else f"{row['recorded']:.3f}"
            print(f"{task} {name} at {row['edits']} edits: recorded {recorded}, now {row['now']:.3f}")
    write_json(out / "general_tasks_rescored.json", {"environment": benchutil.environment(), **result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
