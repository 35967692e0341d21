"""What each run of a study answers on the neighbourhood prompts, from the study's checkpoints.

Specificity counts the neighbourhood target's tokens the model predicts (teacher-forced top-1), so it can
rise above the unedited model's without the edit being any more precise: this shows what moved it. For
the unedited model and the latest checkpoint of each run (in the cache: the machine that ran it) it
writes specificity, the most frequent first predicted tokens, the share of first predictions that are
the first token of some edited request's new target and, for the neighbours a run gets more right than
the unedited model, how often their true answer is itself an edit target (against every neighbour's)::

    python bench/neighbour_answers.py [--out bench/results/cpu-smollm2-methods] [--only ft ft+sphere]

Writes ``<out>/neighbour_answers.json``.
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path

import benchutil  # puts the repository root on sys.path
from sphere_fast.harness.metrics import teacher_forced_predictions, token_accuracy
from sphere_fast.harness.model_sources import load_model
from sphere_fast.harness.report import read_json, write_json
from sphere_fast.harness.sequential import checkpoint_weights
from sphere_fast.harness.study_baseline import set_weights
from sphere_fast.harness.study_spec import checkpoint_edits, latest_checkpoints, spec_requests

TOP_FIRST = 12


def neighbour_scores(model, tokenizer, prompts, targets) -> tuple[list[float], list[int]]:
    """Per neighbourhood prompt: the share of target tokens predicted, and the first predicted token."""
    preds = teacher_forced_predictions(model, tokenizer, prompts, targets, batch_size=32)
    return [token_accuracy(p, t) for p, t in preds], [p[0] for p, _ in preds]


def specificity(scores: list[float], requests) -> float:
    """The study's specificity: the mean over requests of the mean over each request's neighbours."""
    means, at = [], 0
    for r in requests:
        n = len(r.neighborhood_prompts)
        if n:
            means.append(sum(scores[at:at + n]) / n)
        at += n
    return sum(means) / len(means)


def summary(scores, first, unedited, requests, targets, target_counts, new_first_ids, tokenizer) -> dict:
    n = len(scores)
    row = {"specificity": specificity(scores, requests),
           "first_tokens": [[tokenizer.decode([t]), c] for t, c in collections.Counter(first).most_common(TOP_FIRST)],
           "first_is_an_edit_target": sum(t in new_first_ids for t in first) / n}
    if unedited is None:  # what any neighbour shows, to compare the gained ones with
        row.update({"answer_is_an_edit_target": sum(t in target_counts for t in targets) / n,
                    "answer_times_an_edit_target": sum(target_counts[t] for t in targets) / n})
    else:
        gained = [i for i in range(n) if scores[i] > unedited[i]]
        row.update({
            "gained": len(gained), "lost": sum(scores[i] < unedited[i] for i in range(n)),
            "gained_answer_is_an_edit_target": sum(targets[i] in target_counts for i in gained) / max(1, len(gained)),
            "gained_answer_times_an_edit_target": sum(target_counts[targets[i]] for i in gained) / max(1, len(gained)),
            "gained_answers": collections.Counter(targets[i] for i in gained).most_common(TOP_FIRST),
        })
    return row


def neighbour_answers(spec, out: Path, model, tokenizer, only=()) -> dict:
    """The unedited model's row and one per run with a checkpoint here (``{}`` when none has one).

    Requests some run skipped (``status.json``) are left out, as the study leaves them out of its
    evaluations; the edit targets are those of the requests the furthest run edited."""
    names = [run.name for run in spec.runs if not only or run.name in only]
    checkpoints = latest_checkpoints(spec, out, names, log=lambda m: print(m, file=sys.stderr))
    skipped = set()
    for name in checkpoints:
        status = out / "runs" / name / "status.json"
        skipped |= {int(i) for i in (read_json(status).get("skipped") or {})} if status.exists() else set()
    if not checkpoints:
        return {}
    edits = max(checkpoint_edits(spec, ckpt) for ckpt in checkpoints.values())
    requests = [r for i, r in enumerate(spec_requests(spec)[:edits]) if i not in skipped]
    target_counts = collections.Counter(r.target_new for r in requests)
    new_first_ids = {tokenizer(" " + t, add_special_tokens=False)["input_ids"][0] for t in target_counts}

    prompts = [p for r in requests for p in r.neighborhood_prompts]
    targets = [t for r in requests for t in r.neighborhood_targets]
    context = (requests, targets, target_counts, new_first_ids, tokenizer)  # what every row is summarised against

    unedited, first = neighbour_scores(model, tokenizer, prompts, targets)
    result = {"requests": len(requests), "skipped": sorted(skipped),
              "unedited": summary(unedited, first, None, *context)}
    for name, ckpt in checkpoints.items():
        original = set_weights(model, checkpoint_weights(ckpt))
        try:
            scores, first = neighbour_scores(model, tokenizer, prompts, targets)
        finally:
            set_weights(model, original)
        result[name] = {"edits": checkpoint_edits(spec, ckpt),
                        **summary(scores, first, unedited, *context)}
    return result


def main(argv=None) -> int:
    out, spec, only = benchutil.study_folder_args(__doc__.split("\n\n")[0], "bench/results/cpu-smollm2-methods", argv)
    model, tokenizer = load_model(spec.model, dtype=spec.dtype)
    result = neighbour_answers(spec, out, model, tokenizer, only)
    if not result:
        print("no run with a checkpoint here", file=sys.stderr)
        return 1
    for name in ["unedited", *[k for k in result if k not in ("requests", "skipped", "unedited")]]:
        row = result[name]
        line = (f"{name}: specificity {row['specificity']:.3f}, first token an edit target "
                f"{row['first_is_an_edit_target']:.2f}, top first tokens "
                + ", ".join(f"{t!r} {c}" for t, c in row["first_tokens"][:5]))
        if "gained" in row:
            line += (f"; {row['gained']} neighbours gained, {row['lost']} lost; gained answers are edit targets "
                     f"{row['gained_answer_is_an_edit_target']:.2f}, {row['gained_answer_times_an_edit_target']:.1f}"
                     " times on average")
        print(line)
    write_json(out / "neighbour_answers.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
