"""The long-horizon study: several editing runs over one request sequence, resumable, measured alike.

A study is a spec (:func:`load_spec`: a YAML/JSON file or a dict) and an output folder::

    spec.json                   the spec as run (a rerun must match it, or only lengthen its horizon)
    baseline.json               the unedited model's general abilities, shared by all runs
    runs/<name>/status.json     state (pending, running, paused, done, collapsed), edits done
    runs/<name>/edits.csv       one row per batch: energies, timings; metrics at each evaluation
    runs/<name>/metrics/        every evaluation in full (JSON)
    runs/<name>/geometry.json   the first edited layer's rows in 2-D, unedited and at the last checkpoint

Checkpoints live under the cache folder (``<cache>/study/<spec hash>-<hash of out's absolute path>/<run>``),
never in ``out``: the same study run from another checkout starts its runs again.
:func:`run_study` runs what is missing; with a time budget it stops at the next checkpoint and a
later call continues. A run whose weights turn NaN/Inf, or whose batch fails to solve, is recorded
as collapsed at that edit count and the study goes on. A spec that differs from the one in ``out``
only by a longer horizon continues it (:func:`extension_of`): the records so far are kept and the runs
edit on from their last checkpoints. :mod:`.study_report` merges the runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .._validation import check_alpha, check_eta, check_positive_int
from ..editing import paths
from ..editing.editor import EditCollapsed, Editor
from ..editing.hparams import FIELDS as HPARAM_FIELDS, load_hparams
from ..eigensolver import ConvergenceError
from ..editing.methods import METHODS as EDIT_METHODS
from .datasets import DatasetError, load_requests
from .general_tasks import TASKS, evaluate_task, load_task
from .metrics import evaluate, generate, layer_energies, neighborhood_predictions, ngram_entropy, scored_counts, \
    teacher_forced_predictions
from .report import read_csv, read_json, write_csv, write_json
from .running import choose_hparams, hparams_source
from .sequential import checkpoint_weights, latest_checkpoint, run_sequential

# Method names a spec may use: (editing method, SPHERE on).
METHODS = {f"{name}{'+sphere' if sphere else ''}": (name, sphere) for name in EDIT_METHODS for sphere in (False, True)}
GENERAL_METRICS = ("perplexity", "kl", "top1_agreement", "retention", "fluency")
# Fields that only add measures to later evaluations: they stay out of the spec's key and may be added to
# (or changed in) a study under way, whose earlier evaluations then lack them.
EVALUATION_ONLY = ("general_tasks", "general_task_samples")
EDIT_METRICS = ("efficacy", "generalization", "specificity", "locality")
# A run's own numerical failure, recorded as its collapse: NaN/Inf updates or weights, a singular solve, a
# projection fit that does not converge. Any other exception is a bug and stops the study.
COLLAPSES = (EditCollapsed, torch.linalg.LinAlgError, ConvergenceError)


class StudySpecError(ValueError):
    """A spec that cannot run: the message names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class RunSpec:
    name: str
    method: str  # a key of METHODS
    eta: float | None = None
    alpha: float | None = None
    hparams: str | None = None  # file or shipped name; None: the model's shipped settings, else sized to it

    @property
    def base_method(self) -> str:
        return METHODS[self.method][0]

    @property
    def sphere(self) -> bool:
        return METHODS[self.method][1]


@dataclasses.dataclass(frozen=True)
class StudySpec:
    model: str
    data: str
    runs: tuple[RunSpec, ...]
    horizon: int
    batch_size: int = 100
    schema: str = "auto"
    eval_every: int = 200  # edits; a multiple of batch_size
    eval_sample: int = 500  # requests scored at an evaluation (a fixed seeded sample of those edited)
    full_eval_at: tuple[int, ...] = (1000, 2000)  # edit counts where every edited request is scored
    seed: int = 0
    dtype: str = "float32"
    hparams_overrides: dict = dataclasses.field(default_factory=dict)
    # General abilities: WikiText-2 (valid) perplexity and KL/top-1 agreement with the unedited model;
    # retention of CounterFact train facts the unedited model gets right; n-gram entropy of continuations.
    general_text: str | None = None  # default: WikiText-2 valid under the data folder
    general_tokens: int = 8192
    general_seq_len: int = 256
    retention_data: str | None = None  # default: CounterFact train split
    retention_candidates: int = 1000
    retention_max: int = 200
    fluency_prompts: int = 20
    fluency_tokens: int = 32
    eval_batch_size: int = 32
    # The paper's general-ability tasks (general_tasks.TASKS) scored at every evaluation, on a fixed seeded
    # sample of general_task_samples items each, from <data folder>/general.
    general_tasks: tuple[str, ...] = ()
    general_task_samples: int = 100

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["runs"] = [dataclasses.asdict(r) for r in self.runs]
        out["full_eval_at"] = list(self.full_eval_at)
        return out

    def identity(self) -> dict:
        """What the edits and their records depend on: the spec without :data:`EVALUATION_ONLY`."""
        return identity(self.to_dict())

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


def identity(spec_dict: dict) -> dict:
    return {k: v for k, v in spec_dict.items() if k not in EVALUATION_ONLY}


_INT_FIELDS = ("horizon", "batch_size", "eval_every", "eval_sample", "general_tokens", "general_seq_len",
               "retention_candidates", "retention_max", "fluency_prompts", "fluency_tokens", "eval_batch_size",
               "general_task_samples")


def _positive_int(field: str, value: Any, name: str | None = None) -> None:
    """check_positive_int of ``value`` (called ``name``, else ``field``), failing as the spec's error for
    ``field``; the message names the field once."""
    try:
        check_positive_int(value, name or field)
    except ValueError as exc:
        raise StudySpecError(field, str(exc).removeprefix(f"{field} ")) from None


def load_spec(source: str | Path | dict, **overrides) -> StudySpec:
    """A :class:`StudySpec` from a YAML/JSON file, a shipped spec's name (``"smollm2-counterfact-methods"``)
    or a dict; ``overrides`` replace its keys.

    Every problem raises :class:`StudySpecError` naming the field, before anything is written.
    """
    if isinstance(source, dict):
        data = dict(source)
    else:
        path = spec_path(source)
        try:
            text = path.read_text()
        except OSError as exc:
            raise StudySpecError("spec", f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:  # the parsers' own errors name line and column
            reason = " ".join(str(exc).split())  # one line
            raise StudySpecError("spec", f"{str(path)!r} is not valid {path.suffix[1:] or 'YAML'}: {reason}") from None
        if not isinstance(data, dict):
            raise StudySpecError("spec", f"{str(path)!r} must hold a mapping, got {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    for name in ("data", "general_text", "retention_data"):  # "data:REL" is REL under the data folder
        if isinstance(data.get(name), str) and data[name].startswith("data:"):
            data[name] = str(paths.data_dir() / data[name][len("data:"):])
    fields = {f.name for f in dataclasses.fields(StudySpec)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise StudySpecError(unknown[0], f"unknown field (known: {', '.join(sorted(fields))})")
    for name in ("model", "data", "runs", "horizon"):
        if data.get(name) in (None, "", []):
            raise StudySpecError(name, "is required")
    for name in _INT_FIELDS:
        if name in data:
            _positive_int(name, data[name])
    if not isinstance(data.get("seed", 0), int) or isinstance(data.get("seed", 0), bool):
        raise StudySpecError("seed", f"must be an integer, got {data['seed']!r}")
    data["runs"] = tuple(_run_spec(r, i) for i, r in enumerate(_as_list(data["runs"], "runs")))
    names = [r.name for r in data["runs"]]
    if len(set(names)) != len(names):
        raise StudySpecError("runs", f"run names must be unique, got {names}")
    data["full_eval_at"] = tuple(_as_list(data.get("full_eval_at", (1000, 2000)), "full_eval_at"))
    for i, edits in enumerate(data["full_eval_at"]):
        _positive_int("full_eval_at", edits, f"full_eval_at[{i}]")
    data["general_tasks"] = tuple(_as_list(data.get("general_tasks", ()), "general_tasks"))
    for i, task in enumerate(data["general_tasks"]):
        if task not in TASKS:
            raise StudySpecError(f"general_tasks[{i}]", f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if not isinstance(data.get("hparams_overrides", {}), dict):
        raise StudySpecError("hparams_overrides", "must be a mapping of hparams keys to values")
    spec = StudySpec(**data)
    if spec.eval_every % spec.batch_size:
        raise StudySpecError("eval_every", f"must be a multiple of batch_size {spec.batch_size}, got {spec.eval_every}")
    if spec.dtype not in ("float32", "bfloat16", "float16"):
        raise StudySpecError("dtype", f"must be float32, bfloat16 or float16, got {spec.dtype!r}")
    for name in ("data", "general_text", "retention_data"):
        value = getattr(spec, name)
        if value is not None and not Path(value).is_file():
            raise StudySpecError(name, f"file not found: {value!r}")
    for name, value in (("general_text", _general_text(spec)), ("retention_data", _retention_data(spec))):
        if not value.is_file():
            raise StudySpecError(name, f"default file not found: {str(value)!r} (set SPHERE_FAST_DATA_DIR or the field)")
    _check_run_hparams(spec)
    return spec


def _check_run_hparams(spec: StudySpec) -> None:
    """Each run's settings load with the spec's overrides, as far as they can without the model (a model
    without shipped settings is sized when loaded: only the override keys are checked here)."""
    import yaml

    from .model_sources import named_model

    model_name = named_model(spec.model)
    errors = (OSError, ValueError, TypeError, yaml.YAMLError)
    for i, run in enumerate(spec.runs):
        source = hparams_source(run.base_method, sphere=run.sphere, given=run.hparams, model_name=model_name)
        try:
            base = load_hparams(source) if source is not None else None
        except errors as exc:
            raise StudySpecError(f"runs[{i}].hparams", " ".join(str(exc).split())) from None
        try:
            if base is not None:
                base.replace(**spec.hparams_overrides)
            elif set(spec.hparams_overrides) - set(HPARAM_FIELDS):
                raise ValueError(f"unknown hparam key(s) {sorted(set(spec.hparams_overrides) - set(HPARAM_FIELDS))}; "
                                 f"known: {sorted(HPARAM_FIELDS)}")
        except errors as exc:
            raise StudySpecError("hparams_overrides", " ".join(str(exc).split())) from None


def _as_list(value, field: str) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    raise StudySpecError(field, f"must be a list, got {type(value).__name__}")


def _run_spec(entry, index: int) -> RunSpec:
    field = f"runs[{index}]"
    if isinstance(entry, str):
        entry = {"method": entry}
    if not isinstance(entry, dict):
        raise StudySpecError(field, f"must be a method name or a mapping, got {entry!r}")
    known = {f.name for f in dataclasses.fields(RunSpec)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise StudySpecError(f"{field}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(known))})")
    method = str(entry.get("method", "")).lower()
    if method not in METHODS:
        raise StudySpecError(f"{field}.method", f"unknown method {entry.get('method')!r} (known: {', '.join(METHODS)})")
    for name, check in (("eta", check_eta), ("alpha", check_alpha)):
        value = entry.get(name)
        try:
            if value is not None:
                check(value)
        except (TypeError, ValueError) as exc:
            raise StudySpecError(f"{field}.{name}", str(exc).removeprefix(f"{name} ")) from None
    name = str(entry.get("name") or method)
    if not name.replace("+", "").replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise StudySpecError(f"{field}.name", f"letters, digits and + - _ . only, got {name!r}")
    return RunSpec(name=name, method=method, eta=entry.get("eta"), alpha=entry.get("alpha"),
                   hparams=entry.get("hparams"))


def _general_text(spec: StudySpec) -> Path:
    return Path(spec.general_text) if spec.general_text else paths.wikitext_path("valid")


def _retention_data(spec: StudySpec) -> Path:
    if spec.retention_data:
        return Path(spec.retention_data)
    return paths.data_dir() / "counterfact" / "easyedit_counterfact-train.json"


def spec_requests(spec: StudySpec) -> list:
    """The first ``horizon`` editable requests of the spec's data file (StudySpecError if there are fewer)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            requests = load_requests(spec.data, limit=spec.horizon, schema=spec.schema, invalid="skip")
    except (DatasetError, FileNotFoundError) as exc:
        raise StudySpecError("data", str(exc)) from None
    if len(requests) < spec.horizon:
        raise StudySpecError("horizon", f"{spec.horizon} is larger than the {len(requests)} editable requests "
                                        f"in {spec.data!r}")
    return requests


def eval_indices(spec: StudySpec, edits: int, skip: set[int] = frozenset()) -> list[int]:
    """Which edited requests an evaluation after ``edits`` requests scores (sorted indices; ``skip``:
    requests that were not edited)."""
    if edits <= spec.eval_sample or edits in spec.full_eval_at or edits == spec.horizon:
        return [i for i in range(edits) if i not in skip]
    order = list(range(spec.horizon))
    random.Random(spec.seed).shuffle(order)
    return sorted([i for i in order if i < edits and i not in skip][:spec.eval_sample])


# --------------------------------------------------------------------------- general abilities


def _text_chunks(tokenizer, text_path: Path, tokens: int, seq_len: int) -> torch.Tensor:
    # verbose=False: the text is cut into seq_len chunks below, so the tokenizer's length warning does not apply.
    ids = tokenizer(text_path.read_text()[: tokens * 12], add_special_tokens=False, verbose=False)["input_ids"][:tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise StudySpecError("general_text", f"{str(text_path)!r} holds fewer than {seq_len} tokens")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def _next_token_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=ids.to(next(model.parameters()).device)).logits[:, :-1].float(), -1)


def _perplexity(model, chunks: torch.Tensor, batch_size: int) -> float:
    nll = sum(float(-_next_token_logprobs(model, chunks[i:i + batch_size])
                    .gather(-1, chunks[i:i + batch_size, 1:].unsqueeze(-1)).sum())
              for i in range(0, len(chunks), batch_size))
    return math.exp(nll / chunks[:, 1:].numel())


class GeneralProbe:
    """The general-ability measures, with the unedited model's side computed once.

    Perplexity, KL(unedited || edited) and top-1 agreement on the same WikiText-2 text need the unedited
    model's next-token distributions: rather than storing them (tokens x vocabulary), the edited
    weights are swapped for the originals for one extra forward at each evaluation.
    """

    def __init__(self, spec: StudySpec, model, tokenizer, baseline: dict, originals: dict[str, torch.Tensor]):
        self.spec, self.model, self.tokenizer = spec, model, tokenizer
        self.chunks = _text_chunks(tokenizer, _general_text(spec), spec.general_tokens, spec.general_seq_len)
        self.baseline = baseline
        self.originals = originals
        self.tasks = {task: load_task(task, spec.general_task_samples, seed=spec.seed) for task in spec.general_tasks}

    def _swap(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return set_weights(self.model, weights)

    def measure(self) -> dict:
        spec, bs = self.spec, max(1, self.spec.eval_batch_size // 8)
        nll = kl = agree = 0.0
        for i in range(0, len(self.chunks), bs):  # a batch at a time: tokens x vocabulary is large
            chunk = self.chunks[i:i + bs]
            edited = self._swap(self.originals)
            try:
                ref = _next_token_logprobs(self.model, chunk)
            finally:
                self._swap(edited)
            new = _next_token_logprobs(self.model, chunk)
            nll += float(-new.gather(-1, chunk[:, 1:].unsqueeze(-1)).sum())
            kl += float((ref.exp() * (ref - new)).sum())
            agree += float((ref.argmax(-1) == new.argmax(-1)).sum())
        positions = self.chunks[:, 1:].numel()
        known = self.baseline["retention"]
        preds = teacher_forced_predictions(self.model, self.tokenizer, known["prompts"], known["targets"],
                                           batch_size=spec.eval_batch_size)
        retained = sum(int(p == t) for p, t in preds) / len(preds) if preds else None
        texts = generate(self.model, self.tokenizer, self.baseline["fluency_prompts"],
                         max_new_tokens=spec.fluency_tokens, batch_size=spec.eval_batch_size)
        tasks = {task: evaluate_task(self.model, self.tokenizer, task, items, batch_size=spec.eval_batch_size)["accuracy"]
                 for task, items in self.tasks.items()}
        return {"perplexity": math.exp(nll / positions), "kl": kl / positions, "top1_agreement": agree / positions,
                "retention": retained, "fluency": sum(map(ngram_entropy, texts)) / len(texts), **tasks}


def retention_pool(spec: StudySpec, requests: Sequence) -> list:
    """The facts retention may measure: the retention data's first ``retention_candidates`` requests whose
    subject none of ``requests`` edits (and that have a true target)."""
    import warnings

    edited_subjects = {r.subject for r in requests}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        candidates = load_requests(_retention_data(spec), limit=spec.retention_candidates, invalid="skip")
    return [c for c in candidates if c.subject not in edited_subjects and c.target_true]


def compute_baseline(spec: StudySpec, model, tokenizer, requests: Sequence) -> dict:
    """The unedited model's side: facts it knows (retention set), fluency prompts, its general abilities."""
    candidates = retention_pool(spec, requests)
    preds = teacher_forced_predictions(model, tokenizer, [c.text for c in candidates],
                                       [c.target_true for c in candidates], batch_size=spec.eval_batch_size)
    known = [c for c, (p, t) in zip(candidates, preds) if p == t][: spec.retention_max]
    fluency_prompts = [c.text for c in candidates[: spec.fluency_prompts]]
    perplexity_chunks = _text_chunks(tokenizer, _general_text(spec), spec.general_tokens, spec.general_seq_len)
    texts = generate(model, tokenizer, fluency_prompts, max_new_tokens=spec.fluency_tokens,
                     batch_size=spec.eval_batch_size)
    return {
        "retention": {"candidates": len(candidates), "known": len(known), "prompts": [c.text for c in known],
                      "targets": [c.target_true for c in known]},
        "fluency_prompts": fluency_prompts,
        "general": {"perplexity": _perplexity(model, perplexity_chunks, max(1, spec.eval_batch_size // 8)), "kl": 0.0, "top1_agreement": 1.0,
                    "retention": 1.0 if known else None,
                    "fluency": sum(map(ngram_entropy, texts)) / len(texts)},
        "general_tokens": int(perplexity_chunks.numel()),
    }


# --------------------------------------------------------------------------- runs


def _work_dir(spec: StudySpec, out: Path, key: str | None = None) -> Path:
    """The study's folder in the cache (checkpoints, the unedited predictions), one per spec (``key``,
    default the spec's) and output folder."""
    where = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:8]
    return paths.cache_dir() / "study" / f"{key or spec.key()}-{where}"


def checkpoint_dir(spec: StudySpec, out: Path, run_name: str) -> Path:
    """Where a run of the study keeps its checkpoints (in the cache: the machine that ran it)."""
    return _work_dir(spec, out) / run_name / "checkpoints"


def checkpoint_edits(spec: StudySpec, ckpt: Path) -> int:
    """The edits a checkpoint of the study holds."""
    return min(read_json(ckpt / "meta.json")["next_batch"] * spec.batch_size, spec.horizon)


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
    return hp.replace(**spec.hparams_overrides) if spec.hparams_overrides else hp


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
        # the run is redone from its start, and its first batch drops the rows it had past row 0.
        log(f"[{run.name}] no checkpoint in {ckpt_dir} (a new machine, a cleared cache or another --out path): "
            f"editing again from 0 edits; its records of {status.get('edits', 0)} edits are replaced as it goes")
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
        run_sequential(_SkipUnedited(editor, requests, skip), requests, batch_size=spec.batch_size, checkpoint_every=eval_batches,
                       checkpoint_dir=ckpt_dir, resume=True, keep_last=1, on_batch=on_batch, progress=False,
                       should_stop=stop)
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


def set_weights(model, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy ``weights`` (module name -> [out, in] weight) into ``model``; returns copies of what they replaced."""
    from ..editing.model_utils import get_module, oriented_weight

    old = {}
    with torch.no_grad():
        for name, w in weights.items():
            current = oriented_weight(get_module(model, name))
            old[name] = current.clone()
            current.copy_(w)
    return old


def _pooled_means(a: dict, counts_a: dict, b: dict, counts_b: dict) -> dict:
    """Per-request means over two sets of requests from each set's means and counts."""
    pooled = {}
    for k in EDIT_METRICS:
        parts = [(m[k], c[k]) for m, c in ((a, counts_a), (b, counts_b)) if m.get(k) is not None and c.get(k)]
        n = sum(c for _, c in parts)
        pooled[k] = sum(v * c for v, c in parts) / n if n else None
    return pooled


def prepare(spec: StudySpec, out: Path, requests: Sequence, load: Callable[[], tuple],
            log: Callable[[str], None] = print):
    """Model, tokenizer, baseline (computed once) and the unedited neighbourhood predictions."""
    model, tokenizer = load()
    baseline_path = out / "baseline.json"
    ref_path = _work_dir(spec, out) / "reference.json"
    if baseline_path.exists():
        # The baseline is the study's record and stays; the reference lives in the cache, which a new
        # machine lacks: it is computed again there.
        baseline = read_json(baseline_path)
        reference = read_json(ref_path) if ref_path.exists() else []
        scored = baseline.get("edit_requests", len(reference) or len(requests))  # older: the reference's length
        if scored < len(requests) or len(reference) < len(requests):  # a longer horizon, or a new machine
            log(f"[study] the unedited model on requests {min(scored, len(reference))}-{len(requests)} "
                f"({'the horizon grew' if scored < len(requests) else 'its predictions are not in this cache'})")
            reference = reference + neighborhood_predictions(model, tokenizer, requests[len(reference):],
                                                             batch_size=spec.eval_batch_size)
            if scored < len(requests):  # the baseline first: a stop before the reference is written redoes only it
                added = evaluate(model, tokenizer, requests[scored:], batch_size=spec.eval_batch_size,
                                 reference=reference[scored:])
                baseline["edit_metrics"] = _pooled_means(baseline["edit_metrics"], scored_counts(requests[:scored]),
                                                         added, added["counts"])
                baseline["edit_requests"] = len(requests)
                baseline["retention"]["candidates"] = len(retention_pool(spec, requests))
                write_json(baseline_path, baseline)
            write_json(ref_path, reference)
    else:
        log(f"[study] the unedited model: neighbourhood predictions on {len(requests)} requests, general abilities")
        t0 = time.perf_counter()
        reference = neighborhood_predictions(model, tokenizer, requests, batch_size=spec.eval_batch_size)
        t1 = time.perf_counter()
        metrics = evaluate(model, tokenizer, requests, batch_size=spec.eval_batch_size, reference=reference)
        t2 = time.perf_counter()
        baseline = compute_baseline(spec, model, tokenizer, requests)
        baseline["edit_metrics"] = {k: metrics[k] for k in EDIT_METRICS}
        baseline["edit_requests"] = len(requests)
        baseline["seconds"] = {"neighbourhood": t1 - t0, "evaluate_all": t2 - t1,
                               "evaluate_per_request": (t2 - t1) / len(requests),
                               "general": time.perf_counter() - t2}
        write_json(ref_path, reference)
        write_json(baseline_path, baseline)
    missing = [task for task in spec.general_tasks if task not in baseline["general"]]
    if missing:  # tasks added to a study under way: the unedited model's scores, once
        log(f"[study] the unedited model on {', '.join(missing)} ({spec.general_task_samples} items each)")
        for task in missing:
            items = load_task(task, spec.general_task_samples, seed=spec.seed)
            baseline["general"][task] = evaluate_task(model, tokenizer, task, items,
                                                      batch_size=spec.eval_batch_size)["accuracy"]
        write_json(baseline_path, baseline)
    return model, tokenizer, baseline, reference


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


def extension_of(old: dict, new: dict) -> int | None:
    """The horizon of study spec ``old`` (dicts as in spec.json) when ``new`` differs from it only by a
    longer horizon and by full evaluations past it, else None."""
    a, b = identity(old), identity(new)
    rest = lambda d: {k: v for k, v in d.items() if k not in ("horizon", "full_eval_at")}  # noqa: E731
    if not a or rest(a) != rest(b) or not b["horizon"] > a["horizon"]:
        return None
    return int(a["horizon"])


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


def spec_path(source: str | Path) -> Path:
    """The file behind a spec source: the path itself, or the shipped spec of that name when no such file exists."""
    path = Path(source)
    if not path.exists() and path.name == str(source) and shipped_spec(path.name).exists():
        return shipped_spec(path.name)
    return path


def shipped_spec(name: str = "smollm2-counterfact") -> Path:
    """A spec shipped with the package (``sphere_fast/configs/studies/<name>.yaml``)."""
    return Path(__file__).resolve().parents[1] / "configs" / "studies" / f"{name}.yaml"


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
