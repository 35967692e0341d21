"""Editing datasets as :class:`~sphere_fast.editing.requests.EditRequest` lists.

Three record layouts are read, from a JSON list (``.json``) or one record per
line (``.jsonl``):

``counterfact``  the ROME/MEMIT CounterFact schema::

        {"case_id", "requested_rewrite": {"prompt": "... {} ...", "subject",
         "target_new": {"str"}, "target_true": {"str"}},
         "paraphrase_prompts": [...], "neighborhood_prompts": [...], ...}

    Neighbourhood prompts name other subjects that share the *true* attribute,
    so their expected continuation is ``target_true`` (as in ROME/MEMIT).
    ``attribute_prompts`` and ``generation_prompts`` are not edit inputs and
    are not read.

``easyedit``     EasyEdit's flat schema (CounterFact and ZsRE alike)::

        {"prompt": "<prompt with the subject spelled out>", "subject",
         "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
         "locality_ground_truth", "case_id"?}

    The prompt becomes a template by replacing the subject's first occurrence
    (exact match first, then case-insensitive) with ``{}``. The rephrase and
    locality fields may be a string or a list.

``zsre``         the MEND/MEMIT ZsRE schema::

        {"subject", "src", "alt", "answers": [...], "rephrase", "loc",
         "loc_ans", "pred"?, "cond"?}

    The edit rewrites ``src`` (subject replaced by ``{}``) to ``alt``;
    ``answers[0]`` is the true answer. ``loc`` is a Natural Questions prompt
    that starts with ``"nq question: "``; as in MEMIT's ZsRE evaluation a
    ``"?"`` is appended and ``loc_ans`` is its expected continuation.

:func:`load_requests` detects the layout from the first record and reports a
bad record by file, record index and field.
"""
from __future__ import annotations

import json
import random
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

from .._validation import check_positive_int
from ..editing.requests import EditRequest

SCHEMAS = ("auto", "counterfact", "easyedit", "zsre")


class DatasetError(ValueError):
    """A data file that cannot be read as edit requests; the message names file, record and field."""


# --------------------------------------------------------------------------- reading


def _read_records(path: Path) -> list[Any]:
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.is_dir():
        raise DatasetError(f"{path}: expected a JSON file of edit records, got a directory")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}: line {lineno} is not valid JSON: {exc.msg}") from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if isinstance(data, dict):
        # Some dumps wrap the list: {"data": [...]} or a single record.
        for key in ("data", "records", "requests"):
            if isinstance(data.get(key), list):
                return data[key]
        return [data]
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def detect_schema(record: Any) -> str:
    """The schema name of one record, or raise DatasetError listing what was expected."""
    if not isinstance(record, dict):
        raise DatasetError(f"expected a JSON object per record, got {type(record).__name__}")
    if "requested_rewrite" in record:
        return "counterfact"
    if "src" in record and ("alt" in record or "answers" in record):
        return "zsre"
    if "prompt" in record and "target_new" in record:
        return "easyedit"
    raise DatasetError(
        "cannot tell the schema: expected 'requested_rewrite' (CounterFact, MEMIT schema), "
        "'src' + 'alt' (ZsRE, MEND schema) or 'prompt' + 'target_new' (EasyEdit flat schema); "
        f"the record has keys {sorted(record)}"
    )


class _Record:
    """Field access that names the file, record and field on failure."""

    def __init__(self, record: Any, where: str):
        if not isinstance(record, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
        self.record = record
        self.where = where

    def fail(self, msg: str) -> DatasetError:
        return DatasetError(f"{self.where}: {msg}")

    def get(self, *keys: str, required: bool = True, default: Any = None) -> Any:
        value: Any = self.record
        for depth, key in enumerate(keys):
            if not isinstance(value, dict) or key not in value:
                if required:
                    name = ".".join(keys[: depth + 1])
                    raise self.fail(f"missing field '{name}'")
                return default
            value = value[key]
        return value

    def string(self, *keys: str, required: bool = True) -> str | None:
        value = self.get(*keys, required=required)
        if value is None and not required:
            return None
        while isinstance(value, list) and value:  # EasyEdit sometimes wraps answers in lists
            value = value[0]
        if not isinstance(value, str):
            raise self.fail(f"field '{'.'.join(keys)}' must be a string, got {type(value).__name__}")
        return value

    def strings(self, *keys: str) -> tuple[str, ...]:
        value = self.get(*keys, required=False, default=None)
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(f"field '{'.'.join(keys)}' must be a string or a list of strings")
        return tuple(value)


def subject_template(prompt: str, subject: str) -> str | None:
    """``prompt`` with the first occurrence of ``subject`` replaced by ``{}``, or None if absent."""
    start = prompt.find(subject)
    if start < 0:
        match = re.search(re.escape(subject), prompt, flags=re.IGNORECASE)
        if match is None:
            return None
        start = match.start()
    return prompt[:start] + "{}" + prompt[start + len(subject):]


def _template(rec: _Record, field: str, prompt: str, subject: str) -> str:
    if "{" in prompt.replace("{}", "") or "}" in prompt.replace("{}", ""):
        raise rec.fail(f"field '{field}' contains braces other than the subject placeholder: {prompt!r}")
    if "{}" in prompt:
        return prompt
    template = subject_template(prompt, subject)
    if template is None:
        raise rec.fail(f"subject {subject!r} does not occur in field '{field}' ({prompt!r})")
    return template


def _counterfact(rec: _Record, index: int) -> EditRequest:
    prompt = rec.string("requested_rewrite", "prompt")
    subject = rec.string("requested_rewrite", "subject")
    target_new = rec.string("requested_rewrite", "target_new", "str")
    target_true = rec.string("requested_rewrite", "target_true", "str", required=False)
    neighborhood = rec.strings("neighborhood_prompts")
    if neighborhood and target_true is None:
        raise rec.fail("missing field 'requested_rewrite.target_true.str' (the neighbourhood prompts' target)")
    return EditRequest(
        prompt=_template(rec, "requested_rewrite.prompt", prompt, subject),
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        rephrase_prompts=rec.strings("paraphrase_prompts"),
        neighborhood_prompts=neighborhood,
        neighborhood_targets=tuple(target_true for _ in neighborhood),
        case_id=rec.get("case_id", required=False, default=index),
    )


def _easyedit(rec: _Record, index: int) -> EditRequest:
    subject = rec.string("subject")
    prompt = rec.string("prompt")
    locality = rec.strings("locality_prompt")
    targets: tuple[str, ...] = ()
    if locality:
        raw = rec.get("locality_ground_truth")
        if isinstance(raw, list) and len(raw) == len(locality) and len(locality) > 1:
            targets = tuple(_first_string(rec, v, "locality_ground_truth") for v in raw)
        else:
            one = rec.string("locality_ground_truth")
            targets = tuple(one for _ in locality)
    return EditRequest(
        prompt=_template(rec, "prompt", prompt, subject),
        subject=subject,
        target_new=rec.string("target_new"),
        target_true=rec.string("ground_truth", required=False),
        rephrase_prompts=rec.strings("rephrase_prompt"),
        neighborhood_prompts=locality,
        neighborhood_targets=targets,
        case_id=rec.get("case_id", required=False, default=index),
    )


def _first_string(rec: _Record, value: Any, field: str) -> str:
    while isinstance(value, list) and value:
        value = value[0]
    if not isinstance(value, str):
        raise rec.fail(f"field '{field}' must hold strings, got {type(value).__name__}")
    return value


def _zsre(rec: _Record, index: int) -> EditRequest:
    subject = rec.string("subject")
    answers = rec.get("answers", required=False, default=None)
    target_true = _first_string(rec, answers, "answers") if answers else None
    loc = rec.string("loc", required=False)
    neighborhood: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    if loc is not None:
        neighborhood = (loc if loc.rstrip().endswith("?") else loc + "?",)
        targets = (rec.string("loc_ans"),)
    return EditRequest(
        prompt=_template(rec, "src", rec.string("src"), subject),
        subject=subject,
        target_new=rec.string("alt"),
        target_true=target_true,
        rephrase_prompts=rec.strings("rephrase"),
        neighborhood_prompts=neighborhood,
        neighborhood_targets=targets,
        case_id=rec.get("case_id", required=False, default=index),
    )


_PARSERS = {"counterfact": _counterfact, "easyedit": _easyedit, "zsre": _zsre}


def parse_records(
    records: Sequence[Any],
    *,
    schema: str = "auto",
    source: str = "<records>",
    limit: int | None = None,
    invalid: str = "raise",
) -> list[EditRequest]:
    """Turn already-loaded records into EditRequests (see :func:`load_requests`)."""
    if schema not in SCHEMAS:
        raise ValueError(f"schema must be one of {SCHEMAS}, got {schema!r}")
    if invalid not in ("raise", "skip"):
        raise ValueError(f"invalid must be 'raise' or 'skip', got {invalid!r}")
    if not records:
        raise DatasetError(f"{source}: no records")
    if schema == "auto":
        try:
            schema = detect_schema(records[0])
        except DatasetError as exc:
            raise DatasetError(f"{source}: record 0: {exc}") from None
    parse = _PARSERS[schema]
    out: list[EditRequest] = []
    skipped: list[str] = []
    for i, raw in enumerate(records):
        if limit is not None and len(out) >= limit:
            break
        rec = _Record(raw, f"{source}: record {i} ({schema} schema)")
        request = parse(rec, i)  # structural problems (missing fields, wrong types) always raise
        try:
            request.validate()
        except ValueError as exc:
            if invalid == "raise":
                raise DatasetError(f"{rec.where}: {exc}") from None
            skipped.append(f"record {i}: {exc}")
            continue
        out.append(request)
    if skipped:
        warnings.warn(
            f"{source}: skipped {len(skipped)} record(s) that cannot be edited, e.g. {skipped[0]}",
            stacklevel=3,
        )
    if not out:
        raise DatasetError(f"{source}: no editable records")
    return out


def load_requests(
    path: str | Path, *, limit: int | None = None, schema: str = "auto", invalid: str = "raise"
) -> list[EditRequest]:
    """Read edit requests from a CounterFact, EasyEdit-flat or ZsRE (MEND) file.

    Parameters
    ----------
    path : a ``.json`` list of records or a ``.jsonl`` file.
    limit : keep the first ``limit`` requests (all when None).
    schema : "auto" (detected from the first record), "counterfact", "easyedit" or "zsre".
    invalid : "raise" (default) or "skip" for records that parse but cannot be
        edited (e.g. an empty ``alt`` in ZsRE: two of the 1,000 records in
        ``zsre_mend_train-1k.json``); skipped records are reported in a warning.

    Raises FileNotFoundError for a missing file and :class:`DatasetError`
    naming the file, record index and field for a malformed one.
    """
    check_positive_int(limit, "limit", none_ok=True)
    path = Path(path)
    records = _read_records(path)
    return parse_records(records, schema=schema, source=str(path), limit=limit, invalid=invalid)


# --------------------------------------------------------------------------- synthetic

_SYLLABLES = ("ka", "lo", "mir", "ten", "su", "bar", "vel", "do", "ran", "zi", "por", "len", "ta", "mo", "gri", "nel")

# relation: (rewrite template, rephrase templates, candidate answers)
_RELATIONS = {
    "language": (
        "The mother tongue of {} is",
        ("{} speaks the language", "The native language of {} is"),
        ("English", "French", "German", "Spanish", "Italian", "Russian", "Dutch", "Latin", "Greek", "Japanese"),
    ),
    "city": (
        "{} was born in the city of",
        ("The birthplace of {} is the city of", "{} comes from the city of"),
        ("London", "Paris", "Berlin", "Rome", "Madrid", "Moscow", "Vienna", "Dublin", "Chicago", "Boston"),
    ),
    "sport": (
        "{} plays the sport of",
        ("The sport {} is known for is", "{} is a professional player of"),
        ("football", "cricket", "tennis", "baseball", "hockey", "basketball", "golf", "rugby", "boxing"),
    ),
    "job": (
        "The profession of {} is",
        ("{} works as a", "By profession, {} is a"),
        ("actor", "writer", "singer", "lawyer", "teacher", "doctor", "painter", "soldier", "poet", "politician"),
    ),
}


def _single_token_words(tokenizer, words: Iterable[str]) -> list[str]:
    if tokenizer is None:
        return list(words)
    keep = [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    return keep if len(keep) >= 2 else list(words)


def synthetic_requests(tokenizer, n: int, seed: int = 0) -> list[EditRequest]:
    """``n`` CounterFact-like requests about invented subjects, for runs without the data folder.

    Subjects are made-up names (so no model knows them); targets are drawn from
    per-relation answer lists, preferring answers that are one token under
    ``tokenizer`` (``None``: every answer, e.g. to write the text a tokenizer is
    then trained on). Each request has two rephrasings and two neighbourhood
    prompts about *other* invented subjects whose expected continuation is
    their own (equally invented) true answer, so specificity on synthetic
    data measures agreement with labels the model has never seen; compare
    it with the unedited model's score.
    """
    check_positive_int(n, "n")
    rng = random.Random(seed)
    relations = {k: (p, r, _single_token_words(tokenizer, a)) for k, (p, r, a) in _RELATIONS.items()}
    names = sorted(relations)

    used: set[str] = set()

    def name() -> str:
        while True:
            first = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
            last = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
            full = f"{first} {last}"
            if full not in used:
                used.add(full)
                return full

    out = []
    for i in range(n):
        prompt, rephrases, answers = relations[names[i % len(names)]]
        subject = name()
        target_true, target_new = rng.sample(answers, 2)
        neighbors, neighbor_targets = [], []
        for _ in range(2):
            other = name()
            neighbors.append(prompt.format(other))
            neighbor_targets.append(rng.choice(answers))
        out.append(
            EditRequest(
                prompt=prompt,
                subject=subject,
                target_new=target_new,
                target_true=target_true,
                rephrase_prompts=tuple(r.format(subject) for r in rephrases),
                neighborhood_prompts=tuple(neighbors),
                neighborhood_targets=tuple(neighbor_targets),
                case_id=f"synthetic-{i}",
            )
        )
    return out
