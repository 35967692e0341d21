"""A study's spec: :func:`load_spec` checks it, :func:`spec_requests` gives the requests it edits,
:func:`eval_indices` those an evaluation scores; its folder in the cache holds the runs' checkpoints.

Neither it nor what it imports loads the Editor, so :mod:`.study_report` can read a study without it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path
from typing import Any

from .._validation import check_alpha, check_eta, check_positive_int
from ..editing import paths
from ..editing.hparams import FIELDS as HPARAM_FIELDS, load_hparams
from ..editing.methods import METHODS as EDIT_METHODS
from .datasets import DatasetError, load_requests
from .general_tasks import TASKS
from .report import read_json
from .sequential import latest_checkpoint

# Method names a spec may use: (editing method, SPHERE on).
METHODS = {f"{name}{'+sphere' if sphere else ''}": (name, sphere) for name in EDIT_METHODS for sphere in (False, True)}
GENERAL_METRICS = ("perplexity", "kl", "top1_agreement", "retention", "fluency")
# Fields that only add measures to later evaluations: they stay out of the spec's key and may be added to
# (or changed in) a study under way, whose earlier evaluations then lack them.
EVALUATION_ONLY = ("general_tasks", "general_task_samples")
EDIT_METRICS = ("efficacy", "generalization", "specificity", "locality")


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
            raise StudySpecError(name, f"default file not found: {str(value)!r} "
                                       "(set SPHERE_FAST_DATA_DIR or the field)")
    _check_run_hparams(spec)
    return spec


def _check_run_hparams(spec: StudySpec) -> None:
    """Each run's settings load with the spec's overrides, as far as they can without the model (a model
    without shipped settings is sized when loaded: only the override keys are checked here)."""
    import yaml

    from .model_sources import named_model
    from .running import hparams_source  # here: running imports the Editor

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


def extension_of(old: dict, new: dict) -> int | None:
    """The horizon of study spec ``old`` (dicts as in spec.json) when ``new`` differs from it only by a
    longer horizon and by full evaluations past it, else None."""
    a, b = identity(old), identity(new)
    rest = lambda d: {k: v for k, v in d.items() if k not in ("horizon", "full_eval_at")}  # noqa: E731
    if not a or rest(a) != rest(b) or not b["horizon"] > a["horizon"]:
        return None
    return int(a["horizon"])


def spec_path(source: str | Path) -> Path:
    """The file behind a spec source: the path itself, or the shipped spec of that name when no such file exists."""
    path = Path(source)
    if not path.exists() and path.name == str(source) and shipped_spec(path.name).exists():
        return shipped_spec(path.name)
    return path


def shipped_spec(name: str = "smollm2-counterfact") -> Path:
    """A spec shipped with the package (``sphere_fast/configs/studies/<name>.yaml``)."""
    return Path(__file__).resolve().parents[1] / "configs" / "studies" / f"{name}.yaml"


# --------------------------------------------------------------------------- cache folder


def _work_dir(spec: StudySpec, out: Path, key: str | None = None) -> Path:
    """The study's folder in the cache (checkpoints, the unedited predictions), one per spec (``key``,
    default the spec's) and output folder."""
    where = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:8]
    return paths.cache_dir() / "study" / f"{key or spec.key()}-{where}"


def checkpoint_dir(spec: StudySpec, out: Path, run_name: str) -> Path:
    """Where a run of the study keeps its checkpoints (in the cache: the machine that ran it)."""
    return _work_dir(spec, out) / run_name / "checkpoints"


def latest_checkpoints(spec: StudySpec, out: Path, run_names, log) -> dict[str, Path]:
    """The latest checkpoint of each of ``run_names`` kept on this machine; ``log`` names the runs without one."""
    found = {}
    for name in run_names:
        ckpt = latest_checkpoint(checkpoint_dir(spec, out, name))
        if ckpt is None:
            log(f"{name}: no checkpoint on this machine")
        else:
            found[name] = ckpt
    return found


def checkpoint_edits(spec: StudySpec, ckpt: Path) -> int:
    """The edits a checkpoint of the study holds."""
    return min(read_json(ckpt / "meta.json")["next_batch"] * spec.batch_size, spec.horizon)
