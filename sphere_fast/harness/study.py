"""The long-horizon study: several editing runs over one request sequence, resumable, measured alike.

A study is a spec (:func:`load_spec`: a YAML/JSON file or a dict) and an output folder::

    spec.json                   the spec as run (a rerun must match it, or only lengthen its horizon)
    baseline.json               the unedited model's general abilities, shared by all runs
    runs/<name>/status.json     state (pending, running, paused, done, collapsed), edits done
    runs/<name>/edits.csv       one row per batch: energies, timings; metrics at each evaluation
    runs/<name>/metrics/        every evaluation in full (JSON)
    runs/<name>/geometry.json   the first edited layer's rows in 2-D, unedited and at the last checkpoint

Checkpoints live under the cache folder (``<cache>/study/<spec hash>-<hash of out's absolute path>/<run>``),
never in ``out``: the same study run from another checkout (or machine) starts its runs again, their
records in ``out`` dropped as they start (git keeps what was committed).
:func:`run_study` runs what is missing; with a time budget it stops at the next checkpoint and a
later call continues. A run whose weights turn NaN/Inf, or whose batch fails to solve, is recorded
as collapsed at that edit count and the study goes on. A spec that differs from the one in ``out``
only by a longer horizon continues it (:func:`extension_of`): the records so far are kept and the runs
edit on from their last checkpoints. :mod:`.study_report` merges the runs.
The spec lives in :mod:`.study_spec`, the unedited model's baseline in :mod:`.study_baseline`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..editing import paths
from ..editing.editor import EditCollapsed, Editor
from ..editing.methods import method_class
from ..eigensolver import ConvergenceError
from .metrics import evaluate, layer_energies
from .report import read_csv, read_json, write_csv, write_json
from .running import choose_hparams, hparams_source
from .sequential import checkpoint_weights, latest_checkpoint, run_sequential
from .study_baseline import GeneralProbe, prepare, retention_pool, set_weights
from .study_spec import EDIT_METRICS, EVALUATION_ONLY, RunSpec, StudySpec, StudySpecError, _work_dir, checkpoint_dir, \
    checkpoint_edits, eval_indices, extension_of, identity, spec_requests

# A run's own numerical failure, recorded as its collapse: NaN/Inf updates or weights, a singular solve, a
# projection fit that does not converge. Any other exception is a bug and stops the study.
COLLAPSES = (EditCollapsed, torch.linalg.LinAlgError, ConvergenceError)


# --------------------------------------------------------------------------- runs


def _status(run_dir: Path) -> dict:
    path = run_dir / "status.json"
    return read_json(path) if path.exists() else {"state": "pending", "edits": 0}


def finished(spec: StudySpec, status: dict) -> bool:
    """Collapsed, or done up to this spec's horizon (a run done to a shorter one goes on)."""
    return status["state"] == "collapsed" or (status["state"] == "done" and status["edits"] >= spec.horizon)


def _run_hparams(spec: StudySpec, run: RunSpec, model, model_name: str | None):
    source = hparams_source(run.base_method, sphere=run.sphere, given=run.hparams, model_name=model_name)
    hp = choose_hparams(model, run.base_method, source=source)
    # The spec's overrides apply whatever the source (tests shrink the shipped settings with them).
    hp = hp.replace(**spec.hparams_overrides) if spec.hparams_overrides else hp
    # The records name the order the run's updates were applied in (the method's own unless overridden).
    order = getattr(method_class(run.base_method), "default_update_order", None)
    return hp.replace(update_order=order) if hp.update_order is None and order is not None else hp


def _geometry(weight: torch.Tensor, rows: int = 512, seed: int = 0) -> torch.Tensor:
    """Unit rows of ``weight`` (a fixed sample), for a 2-D picture of the neurons on the sphere."""
    w = weight.detach().float().cpu()
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(w.shape[0], generator=g)[: min(rows, w.shape[0])]
    return torch.nn.functional.normalize(w[pick], dim=1)


def _write_geometry(path: Path, before: torch.Tensor, after: torch.Tensor, layer: str, edits: int) -> None:
    # One projection for both, from the unedited rows' principal directions, so the pictures compare.
    centred = before - before.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    axes = v[:2].T
    cos_before, cos_after = before @ before.T, after @ after.T
    off = ~torch.eye(len(before), dtype=torch.bool)
    write_json(path, {
        "layer": layer, "rows": len(before), "edits": edits,
        "before": (before @ axes).tolist(), "after": (after @ axes).tolist(),
        "mean_abs_cos_before": float(cos_before[off].abs().mean()),
        "mean_abs_cos_after": float(cos_after[off].abs().mean()),
        "cos_hist_before": torch.histc(cos_before[off], bins=40, min=-1, max=1).tolist(),
        "cos_hist_after": torch.histc(cos_after[off], bins=40, min=-1, max=1).tolist(),
    })


def _refresh_geometry(spec: StudySpec, run: RunSpec, out: Path, model, model_name: str | None) -> None:
    """Write a paused or finished run's geometry.json from its latest checkpoint where the file is missing
    or older than the checkpoint (runs paused by versions that wrote it only at the horizon)."""
    from ..editing.model_utils import get_module, oriented_weight

    run_dir = out / "runs" / run.name
    if _status(run_dir)["state"] not in ("paused", "done"):
        return
    ckpt = latest_checkpoint(checkpoint_dir(spec, out, run.name))
    if ckpt is None:
        return
    edits = checkpoint_edits(spec, ckpt)
    path = run_dir / "geometry.json"
    if path.exists() and read_json(path).get("edits", -1) >= edits:
        return
    hp = _run_hparams(spec, run, model, model_name)
    layer = hp.rewrite_module_tmp.format(hp.layers[0])
    before = oriented_weight(get_module(model, layer)).detach()
    _write_geometry(path, _geometry(before, seed=spec.seed), _geometry(checkpoint_weights(ckpt)[layer], seed=spec.seed),
                    layer, edits)


def _drop_records(run_dir: Path) -> None:
    """Remove a run's edit records and evaluations (not its status): it edits again from the start."""
    (run_dir / "edits.csv").unlink(missing_ok=True)
    for path in (run_dir / "metrics").glob("edits_*.json"):
        path.unlink()


def run_one(spec: StudySpec, run: RunSpec, out: Path, *, model, tokenizer, model_name: str | None,
            requests: Sequence, baseline: dict, reference: list, deadline: float | None,
            log: Callable[[str], None] = print) -> dict:
    """Edit one run up to the horizon (or until ``deadline``), evaluating every ``eval_every`` edits."""
    run_dir = out / "runs" / run.name
    status = _status(run_dir)
    if finished(spec, status):
        return status
    ckpt_dir = checkpoint_dir(spec, out, run.name)
    if status["state"] in ("running", "paused", "done") and latest_checkpoint(ckpt_dir) is None:
        # The checkpoints live in the cache, which a new machine (or another --out path) does not have:
        # the run is redone from its start. Its old records go at once (git keeps them), so that a redo
        # stopped early never leaves evaluations past its last batch.
        log(f"[{run.name}] no checkpoint in {ckpt_dir} (a new machine, a cleared cache or another --out path): "
            f"editing again from 0 edits; its records of {status.get('edits', 0)} edits are dropped")
        _drop_records(run_dir)
        status = {**status, "edits": 0}
    if status["state"] == "pending" and ckpt_dir.exists():
        import shutil

        shutil.rmtree(ckpt_dir)  # left by a run whose records were removed: start afresh
    hp = _run_hparams(spec, run, model, model_name)
    torch.manual_seed(spec.seed)
    editor = Editor(model, tokenizer, hp, method=run.base_method, sphere=run.sphere, eta=run.eta, alpha=run.alpha,
                    cache_dir=paths.cache_dir(), seed=spec.seed, progress=False)
    skipped = uneditable(requests, tokenizer, hp.fact_token)
    skip = set(skipped)
    originals = {k: v.detach().clone() for k, v in editor.edited_weights().items()}
    first_layer = next(iter(originals))
    geometry_before = _geometry(originals[first_layer], seed=spec.seed)
    probe = GeneralProbe(spec, model, tokenizer, baseline, originals)
    csv_path = run_dir / "edits.csv"
    rows: dict[int, dict] = {int(r["batch"]): r for r in read_csv(csv_path)} if csv_path.exists() else {}
    if 0 not in rows:
        row0 = {"batch": 0, "edits": 0, "eval_requests": len(requests)}
        row0.update({f"energy:{k}": v for k, v in layer_energies(originals).items()})
        row0.update(baseline["edit_metrics"])
        row0.update(baseline["general"])
        rows = {0: row0}
        write_csv(csv_path, [rows[0]])
    elif any(k not in rows[0] for k in baseline["general"]) or int(rows[0]["eval_requests"]) != len(requests):
        # Tasks added under way, or a longer horizon: the unedited scores over what the study now holds.
        rows[0].update({k: v for k, v in baseline["general"].items() if k not in rows[0]})
        rows[0].update({"eval_requests": len(requests), **baseline["edit_metrics"]})
        write_csv(csv_path, [rows[k] for k in sorted(rows)])
    write_json(run_dir / "status.json", {**status, "state": "running", "run": dataclasses.asdict(run),
                                         "hparams": hp.to_dict(), "skipped": skipped})
    eval_batches = spec.eval_every // spec.batch_size

    def on_batch(index: int, batch, info: dict) -> None:
        number = index + 1
        edits = index * spec.batch_size + len(batch)
        weights = editor.edited_weights()
        seconds = info.get("seconds", {})
        row = {"batch": number, "edits": edits,
               "seconds_total": seconds.get("total"), "seconds_stats": seconds.get("stats", 0.0),
               "seconds_targets": seconds.get("targets"), "seconds_sphere": seconds.get("sphere", 0.0)}
        row.update({f"energy:{k}": v for k, v in layer_energies(weights).items()})
        row.update(layer_columns(info))
        if number % eval_batches == 0 or edits == spec.horizon:
            t0 = time.perf_counter()
            idx = eval_indices(spec, edits, skip)
            metrics = evaluate(model, tokenizer, [requests[i] for i in idx], batch_size=spec.eval_batch_size,
                               reference=[reference[i] for i in idx])
            t1 = time.perf_counter()
            general = probe.measure()
            t2 = time.perf_counter()
            row.update({"eval_requests": len(idx), "seconds_eval_edits": t1 - t0, "seconds_eval_general": t2 - t1})
            row.update({k: metrics[k] for k in EDIT_METRICS})
            row.update(general)
            write_json(run_dir / "metrics" / f"edits_{edits:05d}.json",
                       {"edits": edits, "eval_indices": "all" if len(idx) == edits else idx,
                        "metrics": metrics, "general": general})
            log(f"[{run.name}] {edits} edits: efficacy {metrics['efficacy']:.3f}, generalization "
                f"{metrics['generalization']:.3f}, specificity {metrics['specificity']:.3f}, locality "
                f"{metrics['locality']:.3f}; perplexity {general['perplexity']:.2f}, retention "
                f"{general['retention'] if general['retention'] is None else round(general['retention'], 3)} "
                f"(evaluation {t2 - t0:.0f} s)")
        for later in [k for k in rows if k >= number]:  # a batch redone after a resume replaces its rows
            del rows[later]
        rows[number] = row
        write_csv(csv_path, [rows[k] for k in sorted(rows)])

    stop = (lambda: time.time() >= deadline) if deadline is not None else None
    try:
        run_sequential(_SkipUnedited(editor, requests, skip), requests, batch_size=spec.batch_size,
                       checkpoint_every=eval_batches, checkpoint_dir=ckpt_dir, resume=True, keep_last=1,
                       on_batch=on_batch, progress=False, should_stop=stop)
    except COLLAPSES as exc:
        done = max(int(r["edits"]) for r in rows.values())
        status = {"state": "collapsed", "edits": done, "collapsed_at": done + spec.batch_size,
                  "reason": f"{type(exc).__name__}: {exc}"[:500], "run": dataclasses.asdict(run)}
        write_json(run_dir / "status.json", status)
        log(f"[{run.name}] collapsed after {done} edits: {status['reason']}")
        return status
    done = max(int(r["edits"]) for r in rows.values())
    # Rows past the last checkpoint are redone on resume; what is on disk is what counts.
    state = "done" if done >= spec.horizon else "paused"
    # The editor holds the last checkpoint's weights here (a budget stops right after one).
    _write_geometry(run_dir / "geometry.json", geometry_before,
                    _geometry(editor.edited_weights()[first_layer], seed=spec.seed), first_layer, done)
    status = {"state": state, "edits": done, "run": dataclasses.asdict(run), "hparams": hp.to_dict(),
              "skipped": skipped}
    write_json(run_dir / "status.json", status)
    return status


def layer_columns(info: dict) -> dict:
    """A batch's per-layer numbers as ``"<key>:<layer>"`` columns: the update's norm before and after the
    projection, SPHERE's rank r, and what the method reports (PRUNE's restrained singular values,
    AlphaEdit's null-space dimension)."""
    return {f"{key}:{layer}": value for layer, entry in info.get("layers", {}).items()
            for key, value in entry.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}


class _SkipUnedited:
    """The Editor, given each batch without the requests it cannot edit (their subject does not
    tokenise inside the prompt, say): the request list, and so its batches and checkpoints, stay
    those of the data file, and the skipped requests are left out of every evaluation."""

    def __init__(self, editor, requests: Sequence, skip: set[int]):
        self._editor = editor
        self._skip = {id(requests[i]) for i in skip}

    def edit_batch(self, requests):
        return self._editor.edit_batch([r for r in requests if id(r) not in self._skip])

    def __getattr__(self, name):  # checkpoints: state_dict, load_state_dict, edited_weights
        return getattr(self._editor, name)


def uneditable(requests: Sequence, tokenizer, fact_token: str) -> dict[int, str]:
    """Indices of the requests the Editor would refuse, with the reason."""
    from ..editing.compute import validate_request

    out = {}
    for i, request in enumerate(requests):
        try:
            validate_request(tokenizer, request, fact_token, f"request {i}")
        except ValueError as exc:
            out[i] = str(exc)
    return out


def run_study(spec: StudySpec, out: str | Path, *, budget_minutes: float | None = None, only: Sequence[str] = (),
              load: Callable[[], tuple] | None = None, model_name: str | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Run (or continue) every run of ``spec`` into ``out``; returns ``{run name: status}``.

    ``load()`` returns ``(model, tokenizer)`` of the unedited model (default: ``spec.model`` through
    :func:`~sphere_fast.harness.model_sources.load_model`). ``budget_minutes`` stops at the next
    checkpoint once spent; ``only`` restricts the call to the named runs.
    """
    out = Path(out)
    deadline = time.time() + 60.0 * budget_minutes if budget_minutes is not None else None
    unknown = sorted(set(only) - {r.name for r in spec.runs})
    if unknown:
        raise StudySpecError("only", f"no run named {unknown[0]!r} (runs: {', '.join(r.name for r in spec.runs)})")
    spec_path = out / "spec.json"
    current = json.loads(json.dumps(spec.to_dict()))
    grown_from = None
    if spec_path.exists():
        old = read_json(spec_path)
        grown_from = extension_of(old.get("spec") or {}, current)
        if grown_from is None and identity(old.get("spec") or {}) != identity(current):
            raise StudySpecError("spec", f"{str(out)!r} holds a study with another spec ({spec_path}); "
                                         "use another output folder")

    if load is None:
        from .model_sources import load_model, named_model

        model_name = named_model(spec.model)
        load = lambda: load_model(spec.model, dtype=spec.dtype)  # noqa: E731
    requests = spec_requests(spec)  # the spec's errors before anything is written
    if grown_from is not None:
        _grow(spec, out, old, requests, log)
    out.mkdir(parents=True, exist_ok=True)
    if not spec_path.exists():
        write_json(spec_path, {"spec": current, "key": spec.key(), "commit": _commit()})
    elif read_json(spec_path)["spec"] != current:  # evaluation-only fields: measured from the next evaluation on
        old = read_json(spec_path)
        changed = [k for k in EVALUATION_ONLY if old["spec"].get(k) != current[k]]
        log(f"[study] evaluation settings changed ({', '.join(changed)}): measured from each run's next evaluation")
        write_json(spec_path, {**old, "spec": current})
    model, tokenizer, baseline, reference = prepare(spec, out, requests, load, log)
    from ..editing.model_utils import get_module, oriented_weight

    for run in spec.runs:
        if not only or run.name in only:
            _refresh_geometry(spec, run, out, model, model_name)
    statuses = {}
    for run in spec.runs:
        if only and run.name not in only:
            continue
        if deadline is not None and time.time() >= deadline:
            statuses[run.name] = _status(out / "runs" / run.name)
            continue
        hp = _run_hparams(spec, run, model, model_name)
        names = [hp.rewrite_module_tmp.format(l) for l in hp.layers]
        pristine = {n: oriented_weight(get_module(model, n)).detach().clone() for n in names}
        try:
            statuses[run.name] = run_one(spec, run, out, model=model, tokenizer=tokenizer, model_name=model_name,
                                         requests=requests, baseline=baseline, reference=reference,
                                         deadline=deadline, log=log)
        finally:
            set_weights(model, pristine)  # the next run starts from the unedited model
    return statuses


def _grow(spec: StudySpec, out: Path, old: dict, requests: Sequence, log: Callable[[str], None]) -> None:
    """Continue the study in ``out`` to ``spec``'s longer horizon, or raise StudySpecError (naming
    ``horizon``) where its records so far would not be those of ``spec`` and nothing is changed.

    One difference stays, recorded in spec.json's ``grown``: the evaluations on a sample made before,
    drew it from the requests of the shorter horizon. ``old``: the study's spec.json."""
    old_horizon = int(old["spec"]["horizon"])
    why = None
    # Every evaluation so far must be one the longer study makes, scoring all requests where it did.
    full_before = {e for e in old["spec"]["full_eval_at"] if e <= old_horizon} | {old_horizon}
    full_now = {e for e in spec.full_eval_at if e <= old_horizon}
    if old_horizon % spec.eval_every:
        why = f"the study's horizon {old_horizon} is not a multiple of eval_every ({spec.eval_every})"
    elif {e for e in full_before if e > spec.eval_sample} != {e for e in full_now if e > spec.eval_sample}:
        why = (f"full_eval_at up to {old_horizon} must be {sorted(full_before)} as in the study so far "
               f"(its evaluation at {old_horizon} scored every request)")
    baseline_path = out / "baseline.json"
    if why is None and baseline_path.exists():
        # The retention facts and fluency prompts must stay: the added requests may not edit their subjects.
        baseline = read_json(baseline_path)
        pool = retention_pool(spec, requests)
        texts = {c.text for c in pool}
        lost = [p for p in baseline["retention"]["prompts"] if p not in texts]
        if lost or [c.text for c in pool[:spec.fluency_prompts]] != baseline["fluency_prompts"]:
            why = (f"the requests added edit the subject of {len(lost)} retention fact(s)" if lost else
                   "the requests added edit the subject of a fluency prompt")
    if why is not None:
        raise StudySpecError("horizon", f"{spec.horizon} cannot continue the study in {str(out)!r} "
                                        f"(horizon {old_horizon}): {why}; use another output folder")
    before, after = _work_dir(spec, out, old["key"]), _work_dir(spec, out)
    if before.exists() and not after.exists():
        before.rename(after)  # the checkpoints and the unedited predictions go on under the new spec's key
    log(f"[study] horizon {old_horizon} -> {spec.horizon}: the runs edit on from their last checkpoints")
    grown = old.get("grown", []) + [{"from_horizon": old_horizon, "commit": _commit(),
                                     "date": time.strftime("%Y-%m-%d")}]
    write_json(out / "spec.json", {**old, "spec": json.loads(json.dumps(spec.to_dict())), "key": spec.key(),
                                   "grown": grown})


def _commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def pending_runs(spec: StudySpec, out: str | Path, only: Sequence[str] = ()) -> list[str]:
    """The runs of ``spec`` (of ``only`` when given) not yet done or collapsed in ``out``, in spec order."""
    return [r.name for r in spec.runs if (not only or r.name in only)
            and not finished(spec, _status(Path(out) / "runs" / r.name))]


def default_jobs(pending: int, cpu_count: int | None, cuda: bool) -> int:
    """Processes for a study called without ``--jobs``.

    On a CPU, one single-threaded process per core, up to one per run left: the target
    optimisation's small matrices keep a second thread of one process busier than it helps
    (bench/study_jobs.py, bench/results/cpu-study-jobs-*). With a GPU, one process: one device,
    one copy of the model.
    """
    if cuda:
        return 1
    return max(1, min(int(pending), int(cpu_count or 1)))


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
