"""One sequential editing run with evaluation and records on disk: :func:`run_edit`.

:func:`run_edit` writes into ``out``::

    metrics/batch_NNNNN.json      metrics, energies and the batch info at each evaluation
    edits.csv                     one row per batch (row 0: before editing)
    edits.png                     metrics and energy against the number of edits
    summary.json                  final metrics, energy drift, timings
    checkpoints/                  run_sequential's checkpoints (every ``eval_every`` batches)

``sphere-fast edit`` adds ``run.json`` (its settings, written and checked on
``--resume`` by :func:`record_run`) and, with ``--save-model``, the edited model.
:func:`hparams_source` and :func:`choose_hparams` choose a run's hyperparameters.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from ..editing import paths
from ..editing.editor import Editor
from ..editing.hparams import EditHparams, default_hparams, load_hparams, shipped_for_model
from .metrics import evaluate, layer_energies, neighborhood_predictions
from .report import METRIC_COLUMNS as METRICS
from .report import energy_drift, plot_run, read_csv, read_json, write_csv, write_json
from .sequential import run_sequential

# The settings a resumed run must share with the run recorded in its folder's run.json.
RUN_KEYS = ("model", "data", "method", "sphere", "eta", "alpha", "edits", "batch_size", "hparams", "seed", "schema",
            "stats_corpus", "dtype")


def hparams_source(method: str, *, sphere: bool, given: str | Path | None = None,
                   model_name: str | None = None) -> str | None:
    """Where a run's hyperparameters come from: ``given`` (a YAML/JSON file or shipped name), else the
    shipped settings of the named model ``model_name`` for ``method`` and ``sphere``, else None (sized to
    the model by :func:`choose_hparams`)."""
    if given is not None:
        return str(given)
    return shipped_for_model(model_name, method, sphere=sphere)


def choose_hparams(model, method: str, *, source: str | Path | None = None,
                   default_overrides: dict | None = None) -> EditHparams:
    """The hyperparameters loaded from ``source`` (see :func:`hparams_source`), or when it is None,
    :func:`~sphere_fast.editing.hparams.default_hparams` for ``model`` with ``default_overrides``."""
    if source is not None:
        return load_hparams(source)
    hparams = default_hparams(model, method)
    return hparams.replace(**default_overrides) if default_overrides else hparams


def record_run(out: str | Path, settings: dict, *, resume: bool, log=print) -> None:
    """Write the run's ``settings`` to ``out/run.json``. With ``resume``, a run.json already there must
    agree on :data:`RUN_KEYS` (ValueError naming each difference); a folder with neither it nor checkpoints
    starts a new run, and ``log`` says so."""
    out = Path(out)
    path = out / "run.json"
    if resume and path.exists():
        old = read_json(path)
        diff = [k for k in RUN_KEYS if k in old and old[k] != settings.get(k)]  # absent: not recorded then
        if diff:
            details = "; ".join(f"{k}: was {old.get(k)!r}, now {settings.get(k)!r}" for k in diff)
            raise ValueError(f"{out} holds a different run ({details})")
    elif resume and not (out / "checkpoints").exists():
        log(f"nothing to resume in {out}, starting a new run")
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)


def run_edit(
    *,
    model,
    tokenizer,
    requests: Sequence,
    method: str,
    sphere: bool,
    out: str | Path,
    batch_size: int,
    eval_every: int = 1,
    hparams=None,
    eta: float | None = None,
    alpha: float | None = None,
    stats_corpus: str | Path | None = None,
    overlap_sphere_fit: bool = False,
    resume: bool = False,
    keep_checkpoints: int | None = None,
    seed: int = 0,
    eval_batch_size: int = 16,
    fluency: bool = False,
    progress: bool = True,
    run_info: dict | None = None,
    title: str = "",
    log=print,
) -> dict:
    """Edit ``requests`` sequentially, evaluating/checkpointing every ``eval_every`` batches.

    Writes the files listed in the module docstring into ``out`` and returns the
    summary (also ``out/summary.json``). ``model`` must be the *unedited* model:
    with ``resume`` the editor's checkpoint is loaded by ``run_sequential``; the
    unedited model's neighbourhood predictions (for ``locality``) are taken first.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    requests = list(requests)
    n_batches = -(-len(requests) // batch_size)
    csv_path, png_path = out / "edits.csv", out / "edits.png"
    if hparams is None:
        hparams = choose_hparams(model, method)

    t_start = time.perf_counter()
    # The Editor first: it checks the settings against the model before minutes of predictions.
    editor = Editor(model, tokenizer, hparams, method=method, sphere=sphere, eta=eta, alpha=alpha,
                    stats_corpus=stats_corpus, cache_dir=paths.cache_dir(), seed=seed, progress=progress,
                    overlap_sphere_fit=overlap_sphere_fit)
    log(f"[{title or method}] neighbourhood predictions of the unedited model ({len(requests)} requests)")
    reference = neighborhood_predictions(model, tokenizer, requests, batch_size=eval_batch_size, progress=progress)

    rows: dict[int, dict[str, Any]] = {}
    if resume and csv_path.exists():
        rows = {int(r["batch"]): r for r in read_csv(csv_path)}
    if 0 not in rows:
        log(f"[{title or method}] evaluating the unedited model on all {len(requests)} requests")
        base = evaluate(model, tokenizer, requests, batch_size=eval_batch_size, fluency=fluency,
                        reference=reference, seed=seed, progress=progress)
        energies0 = layer_energies(editor.edited_weights())
        row0 = {"batch": 0, "edits": 0, "batch_size": 0, "eval_requests": len(requests)}
        row0.update({f"energy:{k}": v for k, v in energies0.items()})
        row0.update(metric_cells(base))
        rows = {0: row0}
        write_json(out / "metrics" / "batch_00000.json", {"batch": 0, "edits": 0, "metrics": base, "energy": energies0})
        write_csv(csv_path, [rows[k] for k in sorted(rows)])

    evaluations: dict[int, dict] = {}

    def on_batch(batch_index: int, batch_requests, info: dict) -> None:
        number = batch_index + 1
        edits = batch_index * batch_size + len(batch_requests)
        energies = layer_energies(editor.edited_weights())
        seconds = info.get("seconds", {})
        row = {"batch": number, "edits": edits, "batch_size": len(batch_requests),
               "seconds_total": seconds.get("total"), "seconds_stats": seconds.get("stats", 0.0),
               "seconds_sphere": seconds.get("sphere", 0.0 if not sphere else None)}
        row.update({f"energy:{k}": v for k, v in energies.items()})
        if number % eval_every == 0 or number == n_batches:
            done = requests[:edits]
            metrics = evaluate(model, tokenizer, done, batch_size=eval_batch_size, fluency=fluency,
                               reference=reference[:edits], seed=seed, progress=progress)
            row["eval_requests"] = len(done)
            row.update(metric_cells(metrics))
            evaluations[number] = metrics
            write_json(out / "metrics" / f"batch_{number:05d}.json",
                       {"batch": number, "edits": edits, "metrics": metrics, "energy": energies, "info": info})
            log(f"[{title or method}] batch {number}/{n_batches}, {edits} edits: " + metric_line(metrics))
        # A batch redone after a resume replaces its row and any later ones.
        for later in [k for k in rows if k >= number]:
            del rows[later]
        rows[number] = row
        ordered = [rows[k] for k in sorted(rows)]
        write_csv(csv_path, ordered)
        if number in evaluations:
            plot_run(ordered, png_path, title=title)

    infos = run_sequential(editor, requests, batch_size=batch_size, checkpoint_every=eval_every,
                           checkpoint_dir=out / "checkpoints", resume=resume, keep_last=keep_checkpoints,
                           on_batch=on_batch, progress=progress)
    ordered = [rows[k] for k in sorted(rows)]
    plot_run(ordered, png_path, title=title)

    final_eval = evaluations.get(n_batches)
    if final_eval is None:  # every batch was already done before a resume
        final_eval = evaluate(model, tokenizer, requests, batch_size=eval_batch_size, fluency=fluency,
                              reference=reference, seed=seed, progress=progress)
    timed = [r for r in ordered if r.get("seconds_total") is not None]
    # Key statistics (C0) are computed once and cached; like the paper, leave them out of edit time.
    total = sum(r["seconds_total"] - (r.get("seconds_stats") or 0.0) for r in timed)
    stats_s = sum(r.get("seconds_stats") or 0.0 for r in timed)
    sphere_s = sum(r.get("seconds_sphere") or 0.0 for r in timed)
    summary = {
        **(run_info or {}),
        "method": method,
        "sphere": sphere,
        "edits": len(requests),
        "batches": n_batches,
        "batch_size": batch_size,
        "hparams": hparams.to_dict(),
        "before": {k: rows[0].get(k) for k in METRICS},
        "after": {k: final_eval.get(k) for k in METRICS},
        "final_metrics": final_eval,
        "energy_initial": {k[len("energy:"):]: v for k, v in rows[0].items() if k.startswith("energy:")},
        "energy_final": {k[len("energy:"):]: v for k, v in ordered[-1].items() if k.startswith("energy:")},
        "energy_drift": energy_drift(ordered),
        "edit_seconds": total,
        "stats_seconds": stats_s,
        "sphere_seconds": sphere_s,
        "sphere_share": (sphere_s / total) if total else None,
        "batches_this_run": len(infos),
        "wall_seconds_this_run": time.perf_counter() - t_start,
    }
    write_json(out / "summary.json", summary)
    return summary


def metric_cells(metrics: dict) -> dict:
    """The metrics that were measured, by name."""
    return {k: metrics[k] for k in METRICS if metrics.get(k) is not None}


def metric_line(metrics: dict) -> str:
    """``"efficacy 0.250, generalization ..."`` for the metrics that were measured."""
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in METRICS if metrics.get(k) is not None)
